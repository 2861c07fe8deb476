"""Reading one image: refusals, the colour conversions of every mode, bounded memory."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from data.errors import DataError, DecodeBusyError
from data.images import (
    MAX_ASPECT_RATIO,
    MAX_DECODED_BYTES,
    MAX_IMAGE_PIXELS,
    PEAK_DECODE_BYTES,
    DecodeLimiter,
    decode_image,
    read_image,
)
from data.transforms import eval_transform
from tests.conftest import REPO

EXIF_ORIENTATION = 0x0112
MIB = 2**20


def _pixels(path, draft_size=None) -> np.ndarray:
    """``(H, W, 3)`` uint8 of :func:`read_image`."""
    return read_image(path, draft_size).permute(1, 2, 0).numpy()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth photo-like ``(h, w, 3)`` uint8 image (noise alone defeats JPEG)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 6, size=3)
    chans = [127 + 100 * np.sin(x / (37 + 9 * c) + y / (23 + 5 * c) + phase[c]) for c in range(3)]
    return np.clip(np.stack(chans, axis=-1), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- refusals


def test_read_image_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_image(tmp_path / "x.png")
    (tmp_path / "t.png").write_text("text")
    with pytest.raises(DataError, match="not an image"):
        read_image(tmp_path / "t.png")
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    Image.new("L", (side, side)).save(tmp_path / "huge.png")
    with pytest.raises(DataError, match="limit"):
        read_image(tmp_path / "huge.png")
    Image.new("L", (5, 4), 200).save(tmp_path / "grey.png")
    img = read_image(tmp_path / "grey.png")
    assert img.shape == (3, 4, 5) and int(img.max()) == 200


@pytest.mark.parametrize("error", [TypeError("bad tag"), OverflowError("too big"), EOFError()])
def test_a_decoder_that_crashes_is_a_data_error(monkeypatch, error):
    def crash(self, *args, **kwargs):  # as PIL's decoders on some crafted files
        raise error

    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", crash)
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    png.seek(0)
    with pytest.raises(DataError, match="the upload x.png"):
        decode_image(png, "the upload x.png")


def test_elongated_image_is_refused_before_decoding(tmp_path):
    """A few hundred bytes of PNG, 400,000 x 1 pixels: within the pixel limit, but resizing
    its short side to the model's size would take gigabytes."""
    Image.new("L", (400_000, 1)).save(tmp_path / "line.png")
    assert (tmp_path / "line.png").stat().st_size < 1000
    with pytest.raises(DataError, match="too elongated"):
        read_image(tmp_path / "line.png")
    with pytest.raises(DataError, match="too elongated"):
        read_image(tmp_path / "line.png", draft_size=28)
    # a panorama within the limit is read
    Image.new("RGB", (int(40 * MAX_ASPECT_RATIO), 40)).save(tmp_path / "pano.png")
    assert read_image(tmp_path / "pano.png").shape == (3, 40, int(40 * MAX_ASPECT_RATIO))


def test_decoded_size_limit(tmp_path):
    """Within the pixel limit but more than MAX_DECODED_BYTES once decoded (4 bytes a pixel)."""
    side = int((MAX_DECODED_BYTES / 4) ** 0.5) + 8  # RGBA
    assert side * side <= MAX_IMAGE_PIXELS
    Image.new("RGBA", (side, side)).save(tmp_path / "big.png")
    with pytest.raises(DataError, match="MiB once decoded"):
        read_image(tmp_path / "big.png")
    # the same pixel count in one byte a pixel fits
    Image.new("L", (side, side), 9).save(tmp_path / "big_grey.png")
    assert int(read_image(tmp_path / "big_grey.png", draft_size=16)[0, 0, 0]) == 9


# ----------------------------------------------------------------------------- conversions


def test_ordinary_rgb_is_unchanged(tmp_path):
    """8-bit RGB comes back exactly as Pillow decodes it (checkpoints and indexes rely on it),
    and a JPEG's draft decoding is as before."""
    arr = _photo(300, 500)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=90)
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png"), arr)
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png", draft_size=224), arr)
    with Image.open(tmp_path / "a.jpg") as im:
        full = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(_pixels(tmp_path / "a.jpg"), full)
    big = _photo(1800, 2400)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)
    with Image.open(tmp_path / "big.jpg") as im:
        im.draft("RGB", (224, 224))
        drafted = np.asarray(im.convert("RGB"))
    assert drafted.shape == (225, 300, 3)
    np.testing.assert_array_equal(_pixels(tmp_path / "big.jpg", draft_size=224), drafted)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    out = _pixels(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[..., 0], (ramp >> 8).astype(np.uint8))
    assert (out == 255).mean() < 0.01
    assert abs(out.mean() - 127.5) < 1


def test_float_tiff(tmp_path):
    unit = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    out = _pixels(tmp_path / "unit.tif")
    np.testing.assert_array_equal(out[..., 1], np.rint(unit * 255).astype(np.uint8))
    # values beyond 0-1 (e.g. raw sensor counts) are stretched from their own range
    Image.fromarray(unit * 4000 - 100).save(tmp_path / "raw.tif")
    out = _pixels(tmp_path / "raw.tif")
    assert out.min() == 0 and out.max() == 255 and abs(out.mean() - 127.5) < 1


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    full = (200, 40, 40, 255) if mode == "RGBA" else (200, 255)
    half = (200, 40, 40, 128) if mode == "RGBA" else (200, 128)
    clear = (0, 0, 0, 0) if mode == "RGBA" else (0, 0)
    img = Image.new(mode, (3, 1))
    for x, value in enumerate((full, half, clear)):
        img.putpixel((x, 0), value)
    img.save(tmp_path / "a.png")
    out = _pixels(tmp_path / "a.png").astype(int)
    opaque = (200, 40, 40) if mode == "RGBA" else (200, 200, 200)
    assert out[0, 0].tolist() == list(opaque)
    expected_half = [round(c * 128 / 255 + 255 * 127 / 255) for c in opaque]
    assert np.abs(out[0, 1] - expected_half).max() <= 1
    assert out[0, 2].tolist() == [255, 255, 255]


def test_palette_transparency_is_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 10, 200, 10])
    img.putpixel((1, 1), 1)
    img.save(tmp_path / "p.png", transparency=0)
    img.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        out = _pixels(tmp_path / name)
        assert out[0, 0].tolist() == [255, 255, 255], name
        assert out[1, 1].tolist() == [10, 200, 10], name


def test_cmyk_grey_and_bilevel(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "c.tif")
    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    Image.new("1", (4, 4), 1).save(tmp_path / "b.png")
    red = _pixels(tmp_path / "c.jpg")[0, 0].astype(int)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    assert _pixels(tmp_path / "c.tif")[0, 0].tolist() == [255, 255, 255]
    assert _pixels(tmp_path / "g.png")[0, 0].tolist() == [77, 77, 77]
    assert _pixels(tmp_path / "b.png")[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    """Orientation 6 (the camera was turned clockwise): the stored image's top-left corner
    shows at the top-right."""
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(arr).save(tmp_path / f"r{suffix}", exif=exif.tobytes())
    out = _pixels(tmp_path / f"r{suffix}")
    assert out.shape == (60, 40, 3)
    assert out[3, 36, 0] > 200 and out[3, 3, 0] < 50
    # the same with draft decoding (reduced, still upright)
    small = _pixels(tmp_path / f"r{suffix}", draft_size=8)
    assert small.shape[0] > small.shape[1] and small.shape[0] < 60


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    assert _pixels(tmp_path / "a.gif")[4, 4].tolist() == [255, 0, 0]


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".webp", ".ppm"])
def test_lossless_formats_round_trip(tmp_path, suffix):
    arr = _photo(20, 30, seed=3)
    options = {"lossless": True} if suffix == ".webp" else {}
    Image.fromarray(arr).save(tmp_path / f"x{suffix}", **options)
    np.testing.assert_array_equal(_pixels(tmp_path / f"x{suffix}"), arr)


def test_draft_size_reduces_large_images(tmp_path):
    arr = _photo(1200, 1600)
    Image.fromarray(arr).save(tmp_path / "big.png")
    out = read_image(tmp_path / "big.png", draft_size=100)
    assert out.shape == (3, 200, 267)  # reduced by 6: the shorter side stays >= 2 x 100
    # what the model sees differs little from the full-size route: < 3 grey levels on average
    t = eval_transform(100, (0.0,) * 3, (1 / 255,) * 3)
    full = t(read_image(tmp_path / "big.png"))
    assert float((t(out) - full).abs().mean()) < 3


# ----------------------------------------------------------------------------- memory

_MEASURE = """
import json, sys
from data.images import read_image
from data.transforms import eval_transform


def status_mib(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith(key))


t = eval_transform(int(sys.argv[2]), (0.5,) * 3, (0.25,) * 3)
t(read_image(sys.argv[1]))  # warm up (allocator, torch kernels) on a small image
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # the peak (VmHWM) restarts from the current resident size
before = status_mib("VmRSS")
try:
    result = list(t(read_image(sys.argv[3], draft_size=int(sys.argv[2]))).shape)
except Exception as exc:
    result = type(exc).__name__
print(json.dumps({"peak_mib": status_mib("VmHWM") - before, "result": result}))
"""


def _peak_mib(tmp_path, image, size: int) -> tuple[float, object]:
    """Extra peak memory (MiB) of reading ``image`` for a model of ``size`` px, in a fresh
    process (the kernel's peak resident size: Pillow and torch allocate outside tracemalloc's
    view)."""
    Image.new("RGB", (size * 2, size * 2)).save(tmp_path / "tiny.png")
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "tiny.png"), str(size), str(image)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["peak_mib"], out["result"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_of_reading_for_a_model_is_bounded(tmp_path):
    """A 7,000 x 7,000 grey PNG (47 MiB decoded) read for a 224 px model: the decode itself,
    then a reduced image — not the RGB copy, the tensor and the float resize of the full size
    (more than 700 MiB)."""
    Image.new("L", (7000, 7000), 90).save(tmp_path / "grey.png")
    peak, result = _peak_mib(tmp_path, tmp_path / "grey.png", 224)
    assert result == [3, 224, 224]
    assert peak < 160, f"peak {peak:.0f} MiB"
    # the 400,000 x 1 PNG, for a 28 px model: refused before it costs anything
    Image.new("L", (400_000, 1)).save(tmp_path / "line.png")
    peak, result = _peak_mib(tmp_path, tmp_path / "line.png", 28)
    assert result == "DataError"
    assert peak < 50, f"peak {peak:.0f} MiB"


def test_peak_bound_covers_the_worst_decode():
    assert PEAK_DECODE_BYTES >= 2 * MAX_DECODED_BYTES


# ----------------------------------------------------------------------------- concurrency


def test_decode_limiter_bounds_concurrent_decodes():
    limiter = DecodeLimiter(1, wait_seconds=0.05)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with limiter.slot():
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    with pytest.raises(DecodeBusyError, match="try again"):
        with limiter.slot():
            pass
    release.set()
    t.join()
    with limiter.slot():  # free again
        pass
    assert DecodeLimiter.for_memory(5 * PEAK_DECODE_BYTES // 2).max_concurrent == 2
    assert DecodeLimiter.for_memory(0).max_concurrent == 1
    with pytest.raises(ValueError):
        DecodeLimiter(0)


def test_decode_image_of_a_stream():
    buf = io.BytesIO()
    Image.new("RGBA", (6, 4), (0, 0, 0, 0)).save(buf, format="PNG")
    img, fmt = decode_image(io.BytesIO(buf.getvalue()), "the upload")
    assert fmt == "PNG" and img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    assert img.size == (6, 4)
