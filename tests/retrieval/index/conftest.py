"""A small saved index shared by the tests of the index's files."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index.gallery import GalleryIndex


@pytest.fixture()
def saved_index(tmp_path):
    """``(folder, index)``: 50 random 8-d vectors of classes a, b, saved, ids 0-49."""
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(50, 8)).astype(np.float32)
    index = GalleryIndex.build(
        xb, [f"/img/{i}.png" for i in range(50)], np.arange(50) % 2, ["a", "b"]
    )
    folder = tmp_path / "index"
    index.save(folder)
    return folder, index
