"""Fixtures of the model tests: photo-like JPEGs, a small checkpoint, no network."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from data.datasets import FileStore, ImageDataset
from retrieval.model.checkpoint import save_checkpoint
from retrieval.model.networks import build_model

#: (width, height) of the generated photos: landscape, portrait, square, small and large.
PHOTO_SIZES = [(640, 480), (480, 640), (500, 500), (300, 200), (800, 600), (256, 384)]


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field with a few filled shapes and lines, slightly blurred, with
    sensor-like noise: it decodes and resizes like a photo and has edges and objects for a
    network's features to see, and differs from every other one."""
    coarse = rng.integers(0, 256, size=(rng.integers(2, 5), rng.integers(2, 5), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(rng.integers(6, 12)):
        x0, y0 = rng.uniform(-0.1, 1.0) * width, rng.uniform(-0.1, 1.0) * height
        w, h = rng.uniform(0.05, 0.4) * side, rng.uniform(0.05, 0.4) * side
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 2:
            draw.polygon(
                [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(3)], fill=colour
            )
        else:
            draw.line([x0, y0, x0 + w, y0 + h], fill=colour, width=int(rng.integers(2, 12)))
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(side / 300)), dtype=np.float32)
    pixels = pixels + rng.normal(0, 4, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    """Photo-like JPEGs of different sizes in ``tmp_path/photos`` (two per size)."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    for i, (w, h) in enumerate(PHOTO_SIZES * 2):
        path = folder / f"p{i:02d}.jpg"
        photo_like(rng, w, h).save(path, quality=92)
        paths.append(path)
    return paths


def file_dataset(paths, transform=None, draft_size: int | None = None) -> ImageDataset:
    """An unlabelled dataset decoding ``paths`` on demand."""
    paths = [str(p) for p in paths]
    return ImageDataset(
        FileStore(paths, draft_size), np.zeros(len(paths)), paths, ["all"], transform
    )


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    """A checkpoint of the ``small`` network (random weights), 20 px inputs, 32-d head."""
    torch.manual_seed(0)
    model = build_model("small", 32, "head").eval()
    config = {
        "arch": "small",
        "head_dim": 32,
        "embedding": "head",
        "embedding_dim": 32,
        "image_size": 20,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    path = tmp_path / "small.pt"
    save_checkpoint(path, model, config, class_names=["a", "b"], epoch=1)
    return path


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """torchvision's download fails as it does offline (and nothing is cached)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def fail(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
