"""Reading one image file safely and correctly, with bounded memory.

Safety: missing, non-image, corrupt and truncated files raise :class:`DataError`, and so do
images whose decoding would cost too much memory — above :data:`MAX_IMAGE_PIXELS` pixels or
:data:`MAX_DECODED_BYTES` bytes once decoded, or more elongated than :data:`MAX_ASPECT_RATIO`
(a 469-byte PNG of 400,000 x 1 pixels passes any pixel limit, but resizing its short side to
the model's size would take gigabytes). The limits are checked on the header, before decoding.

Correctness: every image becomes 8-bit RGB the way it is meant to be seen:

- the EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`);
- 16-bit grey (``I;16``, and ``I``, read as 16-bit values) keeps its high byte, as Pillow
  itself reads 16-bit colour PNGs; floating-point images (``F``) are taken as 0-1 when all
  their values lie in that range (the usual convention), else stretched from their own
  minimum-maximum range;
- transparency (an alpha channel, or a palette's or grey/colour key's ``transparency``) is
  composited on **white**: a cut-out product photo is meant to be seen on a page, and white is
  what browsers and file viewers show; black, what dropping the alpha channel gives, turns
  every cut-out into a dark silhouette;
- CMYK, palette, grey, 1-bit, YCbCr, LAB and HSV images are converted by Pillow;
- animated GIF / WebP / multi-page TIFF: the first frame.

Memory: when the caller says the size the image will be shrunk to (``draft_size``, the
shorter side), JPEGs are decoded at a reduced scale (:meth:`PIL.Image.Image.draft`) and other
large images are box-reduced (:meth:`PIL.Image.Image.reduce`) to no less than
``REDUCE_GAP * draft_size`` on the shorter side before anything else is done with them (the
same two steps as :meth:`PIL.Image.Image.thumbnail`, which itself cannot be used because it
bounds the longer side). Without ``draft_size`` an 8-bit RGB image comes back exactly as
decoded. A server bounds how many decodes run at once with :class:`DecodeLimiter`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from data.errors import DataError, DecodeBusyError

logger = logging.getLogger(__name__)

#: Images above this many pixels (as decoded) are refused: 8,192 x 8,192.
MAX_IMAGE_PIXELS = 8192 * 8192
#: Images whose decoded pixel values take more than this many bytes are refused (192 MiB: an
#: 8,192 x 8,192 RGB image; RGBA, 16-bit or floating-point images must be smaller).
MAX_DECODED_BYTES = 3 * 8192 * 8192
#: Images more elongated than this (longer side / shorter side) are refused: wider than any
#: camera's panorama mode (about 10:1), and resizing the short side of a 400,000 x 1 image to
#: the model's size would take gigabytes.
MAX_ASPECT_RATIO = 20.0
#: With ``draft_size``, large images are reduced to no less than this many times the size on
#: the shorter side (the final resize then has room to antialias), as Pillow's thumbnail does.
REDUCE_GAP = 2
#: The most memory one :func:`read_image` can hold at its peak, in bytes (768 MiB). Measured on
#: images at the limits (8,192 x 8,192 RGB, 16-bit grey, grey+alpha, palette+transparency;
#: 7,090 x 7,090 RGBA; 6,900 x 6,900 float): at most 580 MiB with ``draft_size``, 650 MiB
#: without; without ``draft_size`` the caller's resize of the full-size image comes on top.
PEAK_DECODE_BYTES = 4 * MAX_DECODED_BYTES
#: Waiting longer than this for a decode slot (seconds) gives up (:class:`DecodeLimiter`).
DECODE_WAIT_SECONDS = 30.0

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = 255


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has a known image extension."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decoded_bytes(size: tuple[int, int], mode: str) -> int:
    """Bytes of the pixel values of an image of ``size`` and ``mode`` (bands x bytes a value).

    Pillow stores 8-bit images of two or three bands with 4 bytes a pixel, so it holds up to
    a third more than this.
    """
    desc = ImageMode.getmode(mode)
    return size[0] * size[1] * len(desc.bands) * max(1, np.dtype(desc.typestr).itemsize)


def _check_limits(img: Image.Image, original: tuple[int, int], what: str) -> None:
    """Refuse, before decoding, an image whose decoding would cost too much memory."""
    w, h = original
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise DataError(
            f"{what} is {w}x{h} pixels: too elongated (more than {MAX_ASPECT_RATIO:g}:1); "
            "crop it to the part that matters first"
        )
    dw, dh = img.size  # after a JPEG draft: what will really be decoded
    if dw * dh > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{what} is {w}x{h} pixels: too large (the limit is {MAX_IMAGE_PIXELS:,} "
            "pixels); shrink the image first"
        )
    need = decoded_bytes(img.size, img.mode)
    if need > MAX_DECODED_BYTES:
        raise DataError(
            f"{what} is {w}x{h} pixels of mode {img.mode}: {need / 2**20:,.0f} MiB once decoded "
            f"(the limit is {MAX_DECODED_BYTES / 2**20:,.0f} MiB); shrink the image first"
        )


def _apply_orientation(img: Image.Image, what: str) -> None:
    """Apply the EXIF orientation in place; a malformed EXIF block is ignored (logged)."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as exc:
        logger.debug("%s: EXIF orientation ignored (%s)", what, exc)


def _to_8bit(img: Image.Image) -> Image.Image:
    """One of 8-bit ``L``, ``LA``, ``RGB``, ``RGBA``, ``CMYK``, ... (not ``P``, ``1``, 16-bit,
    float); transparency given as a key colour becomes an alpha channel."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # (H, W) uint16 or int32 -> high byte, as Pillow reads 16-bit colour PNGs; in place
        arr = np.array(img)
        if mode == "I":
            np.clip(arr, 0, 65535, out=arr)
        arr >>= 8
        return Image.fromarray(arr.astype(np.uint8), "L")
    if mode == "F":
        arr = np.array(img, dtype=np.float32)
        np.nan_to_num(arr, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:  # not the 0-1 convention: stretch the image's own range
            arr -= lo
            arr *= 255.0 / (hi - lo) if hi > lo else 0.0
        else:
            arr *= 255.0
        np.rint(arr, out=arr)
        return Image.fromarray(arr.astype(np.uint8), "L")
    if "transparency" in img.info and mode in ("1", "L", "P", "RGB"):
        return img.convert("RGBA")
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        return img.convert("RGB")
    if mode == "PA":
        return img.convert("RGBA")
    return img


def _flatten(img: Image.Image) -> Image.Image:
    """8-bit image -> RGB; an alpha channel is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "LA":  # composite in one band, then expand
        grey = Image.new("L", img.size, _WHITE)
        grey.paste(img.getchannel("L"), mask=img.getchannel("A"))
        return grey.convert("RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (_WHITE, _WHITE, _WHITE))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _reducible(mode: str) -> bool:
    """Whether :meth:`PIL.Image.Image.reduce` accepts ``mode``."""
    return mode not in ("1", "P") and not mode.startswith("I;16")


def _reduce(img: Image.Image, draft_size: int) -> Image.Image:
    """Box-reduce by an integer factor, keeping the shorter side >= ``REDUCE_GAP * draft_size``."""
    factor = min(img.size) // (REDUCE_GAP * draft_size)
    return img.reduce(factor) if factor >= 2 else img


def decode_image(
    source: str | os.PathLike | BinaryIO, what: str, draft_size: int | None = None
) -> tuple[Image.Image, str]:
    """Decode an image file or byte stream as 8-bit RGB (see the module docstring).

    Args:
        source: a path or an open binary stream (an upload).
        what: how to name the image in error messages.
        draft_size: the size (shorter side, pixels) the caller will shrink the image to; when
            given, JPEGs are decoded at a reduced scale still at least this size on each side,
            and other images larger than ``REDUCE_GAP * draft_size`` are box-reduced towards
            it (fast, and bounds the memory of what follows).

    Returns:
        ``(image, format)``: the RGB image and the file's format name (e.g. ``'PNG'``).

    Raises:
        DataError: not an image, corrupt or truncated, or beyond :data:`MAX_IMAGE_PIXELS`,
            :data:`MAX_DECODED_BYTES` or :data:`MAX_ASPECT_RATIO` (checked before decoding).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                fmt = img.format or "PNG"
                original = img.size
                if draft_size is not None and fmt == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                _check_limits(img, original, what)
                img.load()
                _apply_orientation(img, what)
                out = img
                if draft_size is not None and _reducible(out.mode):
                    out = _reduce(out, draft_size)  # before any conversion: less to convert
                out = _to_8bit(out)
                if draft_size is not None:
                    out = _reduce(out, draft_size)
                # leaving the block closes the file only: the pixels stay usable
                return _flatten(out), fmt
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{what} is not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{what} is too large to decode safely; shrink it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{what} is a corrupt or truncated image ({exc})") from None
    except (TypeError, OverflowError, IndexError, KeyError, ZeroDivisionError, struct.error) as exc:
        # PIL's decoders fail so on some crafted files (fuzzed TIFF tags, say)
        raise DataError(f"{what} could not be decoded ({type(exc).__name__}: {exc})") from None


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
    """Read an image file as a uint8 tensor of shape ``(3, H, W)`` (RGB).

    Args:
        path: the image file.
        draft_size: the size the caller will shrink the image to (see :func:`decode_image`):
            pass the model's input size when the image is only embedded, for speed and memory.
    """
    return to_tensor(open_image(path, draft_size))


class DecodeLimiter:
    """Bounds how many images are decoded at once, and so the memory decoding can take.

    Each decode holds at most :data:`PEAK_DECODE_BYTES` (less with ``draft_size``); a server
    that decodes uploads in a thread pool wraps each decode, so that N concurrent uploads of
    8,192 x 8,192 images cannot take N times that. A waiting caller gets
    :class:`~data.errors.DecodeBusyError` after ``wait_seconds`` (answer 503, retry later).
    A plain :class:`threading.BoundedSemaphore` does the counting.

    Args:
        max_concurrent: decodes allowed at once (>= 1).
        wait_seconds: how long a caller waits for a free slot.

    Example:
        >>> limiter = DecodeLimiter.for_memory(2 * PEAK_DECODE_BYTES)
        >>> limiter.max_concurrent
        2
        >>> with limiter.slot():
        ...     pass  # decode_image(...) here
    """

    def __init__(self, max_concurrent: int, wait_seconds: float = DECODE_WAIT_SECONDS):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.wait_seconds = wait_seconds
        self._slots = threading.BoundedSemaphore(max_concurrent)

    @classmethod
    def for_memory(
        cls, budget_bytes: int, wait_seconds: float = DECODE_WAIT_SECONDS
    ) -> DecodeLimiter:
        """As many slots as ``budget_bytes`` of memory allows (at least one)."""
        return cls(max(1, budget_bytes // PEAK_DECODE_BYTES), wait_seconds)

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one decode slot for the duration of the ``with`` block.

        Raises:
            DecodeBusyError: no slot came free within ``wait_seconds``.
        """
        if not self._slots.acquire(timeout=self.wait_seconds):
            raise DecodeBusyError(
                f"{self.max_concurrent} images are being decoded already; try again shortly"
            )
        try:
            yield
        finally:
            self._slots.release()
