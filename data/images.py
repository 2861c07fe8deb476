"""Reading one image file safely: clear errors for missing, non-image, corrupt or huge files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data.errors import DataError

#: Images above this many pixels are refused (decompression-bomb guard): 8,192 x 8,192.
MAX_IMAGE_PIXELS = 8192 * 8192

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has a known image extension."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(
    source: str | os.PathLike | BinaryIO, what: str, draft_size: int | None = None
) -> tuple[Image.Image, str]:
    """Decode an image file or byte stream as RGB, refusing what is unsafe or unreadable.

    Args:
        source: a path or an open binary stream (an upload).
        what: how to name the image in error messages.
        draft_size: when given, JPEGs are decoded at a reduced scale that is still at least
            this many pixels on each side (much faster for large photos shrunk to small inputs).

    Returns:
        ``(image, format)``: the RGB image and the file's format name (e.g. ``'PNG'``).

    Raises:
        DataError: not an image, corrupt or truncated, or larger than
            :data:`MAX_IMAGE_PIXELS` (checked before decoding: decompression bombs).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"{what} is {w}x{h} pixels: too large (the limit is "
                        f"{MAX_IMAGE_PIXELS:,} pixels); shrink the image first"
                    )
                fmt = img.format or "PNG"
                if draft_size is not None and fmt == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
                return img.convert("RGB"), fmt
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{what} is not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{what} is too large to decode safely; shrink it first") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{what} is a corrupt or truncated image ({exc})") from None


def open_image(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode an image file as RGB (see :func:`decode_image`).

    Raises:
        DataError: the file is missing, is not an image, is corrupt or is too large.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an image file")
    return decode_image(path, str(path), draft_size)[0]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 ``(3, H, W)`` tensor (torchvision's ``pil_to_tensor``, without
    importing torchvision): a view of the decoded pixels, channels-last in memory."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def read_image(path: str | os.PathLike, draft_size: int | None = None) -> torch.Tensor:
    """Read an image file as a uint8 tensor of shape ``(3, H, W)`` (RGB)."""
    return to_tensor(open_image(path, draft_size))
