"""The evaluation transform gives torchvision's numbers without importing torchvision."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from data.transforms import eval_transform
from tests.conftest import REPO

MEAN, STD = [0.2, 0.4, 0.6], [0.25, 0.3, 0.35]


def _torchvision(size):
    return v2.Compose(
        [
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


@pytest.mark.parametrize("shape", [(28, 28), (37, 53), (120, 31), (480, 640), (16, 16), (9, 300)])
@pytest.mark.parametrize("size", [16, 28, 112])
def test_same_numbers_as_torchvision(shape, size):
    rng = np.random.default_rng(sum(shape) + size)
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    for image in (
        pil_to_tensor(Image.fromarray(pixels)),  # a decoded image: channels-last memory
        torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
    ):
        want = _torchvision(size)(image)
        got = eval_transform(size, MEAN, STD)(image)
        assert got.shape == want.shape == (3, size, size)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_no_torchvision_import():
    code = (
        "import sys, torch; from data.transforms import eval_transform; "
        "eval_transform(8, [0.5]*3, [0.5]*3)(torch.zeros(3, 20, 10, dtype=torch.uint8)); "
        "print('torchvision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
