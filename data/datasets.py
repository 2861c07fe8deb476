"""Image datasets: the built-in Fashion-MNIST, an image folder, a CSV manifest.

Every source becomes an :class:`ImageDataset`: labels (int64), class names, and one *reference*
per image — an absolute file path, or ``fashion-mnist:SPLIT:INDEX`` for the built-in set — that
:func:`read_ref` turns back into pixels (the index stores references, the search grid reads
them).

A source is named by a string (:func:`open_source`):

- ``fashion-mnist`` or ``fashion-mnist:train`` / ``fashion-mnist:test``;
- a folder with one sub-folder per class (``root/cat/001.jpg``);
- a CSV file with a header ``path,label[,split]`` (paths relative to the CSV's folder).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data import fashion_mnist
from data.errors import DataError
from data.images import is_image_file, open_image, read_image

logger = logging.getLogger(__name__)

BUILTIN = "fashion-mnist"
Transform = Callable[[torch.Tensor], torch.Tensor]


class ArrayStore:
    """Images held in memory as a uint8 array ``(N, H, W)`` or ``(N, H, W, 3)``."""

    def __init__(self, images: np.ndarray):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError("images must be uint8 of shape (N, H, W) or (N, H, W, 3)")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> torch.Tensor:
        img = torch.from_numpy(np.ascontiguousarray(self.images[i]))
        if img.ndim == 2:  # (H, W) grey -> (3, H, W)
            return img.unsqueeze(0).expand(3, -1, -1).contiguous()
        return img.permute(2, 0, 1).contiguous()


class FileStore:
    """Images decoded from files on demand.

    Args:
        paths: image files.
        draft_size: JPEGs are decoded at a reduced scale still >= this many pixels per side.
    """

    def __init__(self, paths: Sequence[str], draft_size: int | None = None):
        self.paths = list(paths)
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> torch.Tensor:
        return read_image(self.paths[i], self.draft_size)


class ImageDataset(Dataset):
    """Labelled images; items are ``(transform(image), label)``.

    Args:
        store: where pixels come from (:class:`ArrayStore` or :class:`FileStore`).
        labels: class index of each image, shape ``(N,)``.
        refs: a reference per image (file path or ``fashion-mnist:SPLIT:INDEX``).
        class_names: name of each class index.
        transform: maps a uint8 ``(3, H, W)`` tensor to the model input.
        index: positions in ``store`` this dataset shows (for subsets).
    """

    def __init__(
        self,
        store: ArrayStore | FileStore,
        labels: np.ndarray,
        refs: Sequence[str],
        class_names: Sequence[str],
        transform: Transform | None = None,
        index: np.ndarray | None = None,
    ):
        self.store = store
        self.index = np.arange(len(store)) if index is None else np.asarray(index, dtype=np.int64)
        self._labels = np.asarray(labels, dtype=np.int64)
        self._refs = list(refs)
        self.class_names = list(class_names)
        self.transform = transform

    @property
    def labels(self) -> np.ndarray:
        return self._labels[self.index]

    @property
    def refs(self) -> list[str]:
        return [self._refs[i] for i in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def image(self, i: int) -> torch.Tensor:
        """The raw uint8 ``(3, H, W)`` image of item ``i``."""
        return self.store.read(int(self.index[i]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.image(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self._labels[self.index[i]])

    def subset(self, positions: Sequence[int] | np.ndarray) -> ImageDataset:
        """A dataset showing items ``positions`` of this one (same store, no copy)."""
        return ImageDataset(
            self.store,
            self._labels,
            self._refs,
            self.class_names,
            self.transform,
            self.index[np.asarray(positions, dtype=np.int64)],
        )

    def with_transform(self, transform: Transform | None) -> ImageDataset:
        """The same items with another transform."""
        return ImageDataset(
            self.store, self._labels, self._refs, self.class_names, transform, self.index
        )

    def filter_classes(self, classes: Sequence[int] | None) -> ImageDataset:
        """Only the items whose label is in ``classes`` (None keeps all)."""
        if classes is None:
            return self
        unknown = sorted(set(classes) - set(range(len(self.class_names))))
        if unknown:
            raise DataError(
                f"class indices {unknown} do not exist; this dataset has classes "
                f"0-{len(self.class_names) - 1}"
            )
        keep = np.flatnonzero(np.isin(self.labels, list(classes)))
        if keep.size == 0:
            raise DataError(f"no image has a class among {list(classes)}")
        return self.subset(keep)


# --------------------------------------------------------------------------------------------
# Sources


@lru_cache(maxsize=4)
def _fashion_arrays(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    return fashion_mnist.load_fashion_mnist(split, root)


def load_builtin(split: str = "train", root: str | os.PathLike | None = None) -> ImageDataset:
    """Fashion-MNIST ``split`` ('train' or 'test') as an :class:`ImageDataset`."""
    images, labels = _fashion_arrays(split, None if root is None else str(root))
    refs = [f"{BUILTIN}:{split}:{i}" for i in range(len(labels))]
    return ImageDataset(ArrayStore(images), labels, refs, fashion_mnist.CLASS_NAMES)


def _scan(paths: list[str], draft_size: int | None) -> tuple[list[int], list[str]]:
    """Decode every file once; return the positions that decode and the messages of the rest."""
    good, bad = [], []
    for i, p in enumerate(paths):
        try:
            open_image(p, draft_size)
            good.append(i)
        except DataError as exc:
            bad.append(str(exc))
    return good, bad


def _files_dataset(
    paths: list[str], names: list[str], draft_size: int | None, source: str
) -> ImageDataset:
    if not paths:
        raise DataError(f"{source}: no images found")
    good, bad = _scan(paths, draft_size)
    if bad:
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        shown = "\n  ".join(bad[:20]) + more
        logger.warning("skipping %d unreadable image(s) in %s:\n  %s", len(bad), source, shown)
    if not good:
        raise DataError(f"{source}: none of the {len(paths)} images can be read")
    class_names = sorted(set(names))
    lookup = {c: i for i, c in enumerate(class_names)}
    paths = [paths[i] for i in good]
    labels = np.array([lookup[names[i]] for i in good], dtype=np.int64)
    return ImageDataset(FileStore(paths, draft_size), labels, paths, class_names)


def load_folder(root: str | os.PathLike, draft_size: int | None = None) -> ImageDataset:
    """An image folder with one sub-folder per class; corrupt images are skipped with a warning."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    paths, names = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and is_image_file(f):
                paths.append(str(f))
                names.append(class_dir.name)
    if not paths:
        raise DataError(
            f"{root}: no images found; expected one sub-folder per class holding image "
            "files (.jpg, .png, .webp, ...)"
        )
    return _files_dataset(paths, names, draft_size, str(root))


def load_csv(
    csv_path: str | os.PathLike, split: str | None = None, draft_size: int | None = None
) -> ImageDataset:
    """A CSV manifest with a header ``path,label[,split]``; paths are relative to its folder.

    Args:
        csv_path: the manifest.
        split: keep only rows whose ``split`` column equals this (needs the column).
        draft_size: see :class:`FileStore`.
    """
    csv_path = Path(csv_path).expanduser().resolve()
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such file")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "path" not in fields or "label" not in fields:
            raise DataError(
                f"{csv_path}: the header must name the columns path,label[,split]; found {fields}"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if split is not None:
        if "split" not in fields:
            raise DataError(f"{csv_path} has no 'split' column, so --split {split} cannot apply")
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise DataError(f"{csv_path}: no row has split == {split!r}")
    paths, names = [], []
    for n, row in enumerate(rows, start=2):
        if not row["path"] or not row["label"]:
            raise DataError(f"{csv_path}, line {n}: empty path or label")
        p = Path(row["path"]).expanduser()
        paths.append(str(p if p.is_absolute() else (csv_path.parent / p).resolve()))
        names.append(row["label"])
    return _files_dataset(paths, names, draft_size, str(csv_path))


def open_source(
    spec: str,
    split: str | None = None,
    root: str | os.PathLike | None = None,
    draft_size: int | None = None,
) -> ImageDataset:
    """Open a dataset named by ``spec`` (see the module docstring).

    Args:
        spec: ``fashion-mnist[:SPLIT]``, a folder, or a ``.csv`` manifest.
        split: the split, for the built-in set (default 'train') or a CSV with a split column.
        root: where the built-in set lives, when not in the default places.
        draft_size: see :class:`FileStore`.
    """
    if spec == BUILTIN or spec.startswith(BUILTIN + ":"):
        _, _, spec_split = spec.partition(":")
        if spec_split and split and spec_split != split:
            raise DataError(f"{spec!r} names split {spec_split!r} but --split is {split!r}")
        chosen = spec_split or split or "train"
        if chosen not in fashion_mnist.SPLITS:
            raise DataError(f"{BUILTIN} has splits {fashion_mnist.SPLITS}, not {chosen!r}")
        return load_builtin(chosen, root)
    path = Path(spec).expanduser()
    if path.is_dir():
        if split is not None:
            raise DataError("--split applies to the built-in dataset and CSV manifests only")
        return load_folder(path, draft_size)
    if path.suffix.lower() == ".csv":
        return load_csv(path, split, draft_size)
    if not path.exists():
        raise DataError(
            f"{spec}: no such file or folder (a source is '{BUILTIN}[:train|test]', "
            "a folder of class sub-folders, or a CSV manifest path,label[,split])"
        )
    raise DataError(
        f"{spec} is neither a folder nor a .csv manifest (nor '{BUILTIN}[:train|test]')"
    )


def read_ref(ref: str, root: str | os.PathLike | None = None) -> torch.Tensor:
    """Pixels of a reference stored in an index: uint8 ``(3, H, W)``."""
    if ref.startswith(BUILTIN + ":"):
        try:
            _, split, idx = ref.split(":")
            images, _ = _fashion_arrays(split, None if root is None else str(root))
            return ArrayStore(images).read(int(idx))
        except (ValueError, IndexError):
            raise DataError(f"bad built-in reference {ref!r}") from None
    return read_image(ref)


def parse_classes(text: str | None) -> list[int] | None:
    """Parse a class selection such as ``'5-9'`` or ``'0,2,4'`` (None or '' keeps all)."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise DataError(
            f"cannot read the class selection {text!r}; write e.g. '5-9' or '0,2,4'"
        ) from None
    if min(out) < 0:
        raise DataError(f"class indices are >= 0, got {text!r}")
    return sorted(set(out))
