"""Image transforms: uint8 ``(3, H, W)`` tensors in, normalised float tensors out."""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

#: Random-resized-crop area range used by training augmentation (fraction of the image).
CROP_SCALE = (0.7, 1.0)


class EvalTransform:
    """Resize the shorter side to ``image_size``, centre-crop a square, scale to [0, 1] and
    normalise: uint8 ``(3, H, W)`` in, float32 ``(3, S, S)`` out.

    The same numbers as torchvision's ``v2.Compose([Resize(S, antialias=True), CenterCrop(S),
    ToDtype(float32, scale=True), Normalize(mean, std)])`` (a test compares them), written with
    torch alone: importing torchvision costs about 1.5 s, which a one-image search would pay.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.size = int(image_size)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self._resize(image)
        height, width = image.shape[-2:]
        top = int(round((height - self.size) / 2.0))
        left = int(round((width - self.size) / 2.0))
        image = image[..., top : top + self.size, left : left + self.size]
        if not image.is_floating_point():
            image = image.to(torch.float32).mul_(1.0 / 255)
        return image.sub(self.mean).div_(self.std)

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        """Shorter side to ``size``, bilinear with antialiasing (torchvision's arithmetic)."""
        channels, height, width = image.shape[-3:]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_h, new_w) == (height, width) or image.numel() == 0:
            return image
        x = image.reshape(-1, channels, height, width)
        strides = x.stride()
        if (
            x.is_contiguous(memory_format=torch.channels_last)
            and x.shape[0] == 1
            and x.numel() != strides[0]
        ):  # as torchvision does: keep a channels-last (decoded HWC) image channels-last
            new_strides = list(strides)
            new_strides[0] = x.numel()
            x = x.as_strided((1, channels, height, width), new_strides)
        cast = x.dtype not in (torch.float32, torch.float64) and not (
            x.dtype == torch.uint8 and x.device.type == "cpu" and _native_uint8_bilinear()
        )
        dtype = x.dtype
        if cast:
            x = x.to(torch.float32)
        x = F.interpolate(
            x, size=[new_h, new_w], mode="bilinear", align_corners=False, antialias=True
        )
        if cast:
            x = x.round_().to(dtype) if not dtype.is_floating_point else x.to(dtype)
        return x.reshape(image.shape[:-3] + (channels, new_h, new_w))


def _native_uint8_bilinear() -> bool:
    """Whether torch resizes uint8 images natively here (as torchvision decides)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or (
        platform.machine() in ("aarch64", "arm64")
    )


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    """The evaluation transform (:class:`EvalTransform`)."""
    return EvalTransform(image_size, mean, std)


def train_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], augment: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Training transform: random resized crop and horizontal flip (when ``augment``)."""
    from torchvision.transforms import v2

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
