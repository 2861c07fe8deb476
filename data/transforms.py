"""Image transforms: uint8 ``(3, H, W)`` tensors in, normalised float tensors out."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

#: Random-resized-crop area range used by training augmentation (fraction of the image).
CROP_SCALE = (0.7, 1.0)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize the shorter side to ``image_size``, centre-crop a square, scale and normalise."""
    return v2.Compose(
        [
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def train_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], augment: bool = True
) -> v2.Compose:
    """Training transform: random resized crop and horizontal flip (when ``augment``)."""
    if not augment:
        return eval_transform(image_size, mean, std)
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=CROP_SCALE, ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
