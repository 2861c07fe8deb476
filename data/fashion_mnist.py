"""Fashion-MNIST, the built-in dataset: finding it on disk and reading its IDX files.

Where it is looked up, in order:

1. an explicit ``root`` argument (``--data-root`` on the command line);
2. the environment variable ``FASHION_MNIST_DIR``;
3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
4. ``~/.cache/metric-retrieval/fashion-mnist``, filled by torchvision's downloader when a
   network exists.

Each place must hold the four IDX files (gzip-compressed or not).
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np

from data.errors import DatasetNotFoundError

logger = logging.getLogger(__name__)

ENV_VAR = "FASHION_MNIST_DIR"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path.home() / ".cache" / "metric-retrieval" / "fashion-mnist"

#: Side of the images, pixels.
IMAGE_SIZE = 28
#: The class-disjoint protocol: train on the seen classes, evaluate on the unseen ones
#: (``--classes`` syntax, :func:`data.datasets.parse_classes`).
SEEN_CLASSES = "0-4"
UNSEEN_CLASSES = "5-9"

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
SPLITS = ("train", "test")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "Fashion-MNIST was not found. Install it with `sudo apt-get install dataset-fashion-mnist` "
    f"(Debian/Ubuntu), or set {ENV_VAR} to a folder holding the four IDX .gz files "
    "(train-images-idx3-ubyte.gz, ...), or pass --data-root."
)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _complete(folder: Path) -> bool:
    return all(_find_file(folder, s) for pair in _FILES.values() for s in pair)


def _download(target: Path) -> bool:
    """Fetch the IDX files with torchvision's downloader; False when there is no network."""
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(target.parent / "_torchvision"), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - any network failure means "not available"
        logger.debug("torchvision download of Fashion-MNIST failed: %s", exc)
        return False
    raw = target.parent / "_torchvision" / "FashionMNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for pair in _FILES.values():
        for stem in pair:
            src = _find_file(raw, stem)
            if src is None:
                return False
            os.replace(src, target / src.name)
    return _complete(target)


def find_fashion_mnist(root: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return the folder holding the Fashion-MNIST IDX files.

    Args:
        root: explicit folder; when given, it must hold the files (no fallback).
        download: try torchvision's downloader when no local copy exists.

    Raises:
        DatasetNotFoundError: with instructions, when no copy can be found or fetched.
    """
    if root is not None:
        folder = Path(root).expanduser()
        if not _complete(folder):
            raise DatasetNotFoundError(
                f"{folder} does not hold the four Fashion-MNIST IDX files. " + _HOW_TO_GET
            )
        return folder
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]).expanduser())
    candidates += [SYSTEM_DIR, CACHE_DIR]
    for folder in candidates:
        if _complete(folder):
            return folder
    if download and _download(CACHE_DIR):
        return CACHE_DIR
    raise DatasetNotFoundError(_HOW_TO_GET)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into an array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values")
    return data.reshape(tuple(dims)).copy()  # writable, detached from the file buffer


def load_fashion_mnist(
    split: str, root: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split as ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)``."""
    if split not in SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose one of {SPLITS}")
    folder = find_fashion_mnist(root)
    images_stem, labels_stem = _FILES[split]
    images = read_idx(_find_file(folder, images_stem))
    labels = read_idx(_find_file(folder, labels_stem)).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    return images, labels
