"""Image datasets: the built-in Fashion-MNIST, an image folder, a CSV manifest.

Every source becomes an :class:`ImageDataset`: labels (int64), class names, and one *reference*
per image — an absolute file path, or ``fashion-mnist:SPLIT:INDEX`` for the built-in set — that
:func:`read_ref` turns back into pixels (the index stores references, the search grid reads
them).

A source is named by a string (:func:`open_source`):

- ``fashion-mnist`` or ``fashion-mnist:train`` / ``fashion-mnist:test``;
- a folder of images, nested as deep as it likes (:func:`list_image_files`);
- a CSV file with a header ``path[,label][,split]`` (paths relative to the CSV's folder).

Labels are optional everywhere (``labels``, one of :data:`LABEL_MODES`):

- ``from-folders`` (the default): an image in a folder is labelled by the name of the
  first-level sub-folder it lies in (``root/cat/001.jpg`` and ``root/cat/kitten/002.jpg`` are
  both ``cat``); an image lying directly in ``root`` is labelled by ``root``'s own name, so a
  flat folder is one class and nothing is ever left out (a warning names the loose images when
  they sit beside class sub-folders, as a misplaced file usually does). A CSV's ``label``
  column labels its rows; a CSV without one is unlabelled. The built-in set keeps its classes.
- ``none``: every image is labelled :data:`UNLABELLED` (one class): a photo collection to
  search, not classes to learn or evaluate.

Hidden files and folders (names starting with ``.``, such as macOS's ``._IMG_0001.jpg``) are
not images of the collection and are not listed. Files that cannot be read are skipped, and
listed once, in one warning, by every loader (:func:`load_folder`, :func:`load_csv`,
:func:`load_files`).
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
from data.images import IMAGE_EXTENSIONS, is_image_file, read_image

logger = logging.getLogger(__name__)

BUILTIN = "fashion-mnist"
#: The label of every image when labels are not used (``labels="none"``, a CSV without labels).
UNLABELLED = "unlabelled"
#: Labels from sub-folders (or a CSV's label column).
LABELS_FROM_FOLDERS = "from-folders"
#: No labels: every image is :data:`UNLABELLED`.
LABELS_NONE = "none"
#: The ways images are labelled (see the module docstring).
LABEL_MODES = (LABELS_FROM_FOLDERS, LABELS_NONE)
#: Unreadable files named in the skip warning; the rest are counted.
SKIPPED_SHOWN = 20
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
    """Images decoded from files (or built-in references) on demand.

    Args:
        paths: image files, or ``fashion-mnist:SPLIT:INDEX`` references.
        draft_size: the size the images will be shrunk to: large images are decoded at a
            reduced scale no smaller than this (:func:`data.images.decode_image`).
    """

    def __init__(self, paths: Sequence[str], draft_size: int | None = None):
        self.paths = list(paths)
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> torch.Tensor:
        return _read_any(self.paths[i], self.draft_size)


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


def _check_labels(labels: str) -> None:
    if labels not in LABEL_MODES:
        raise DataError(f"labels must be one of {', '.join(LABEL_MODES)}; got {labels!r}")


def load_builtin(
    split: str = "train",
    root: str | os.PathLike | None = None,
    labels: str = LABELS_FROM_FOLDERS,
) -> ImageDataset:
    """Fashion-MNIST ``split`` ('train' or 'test') as an :class:`ImageDataset`.

    With ``labels="none"`` every image is :data:`UNLABELLED`.
    """
    _check_labels(labels)
    images, targets = _fashion_arrays(split, None if root is None else str(root))
    refs = [f"{BUILTIN}:{split}:{i}" for i in range(len(targets))]
    if labels == LABELS_NONE:
        return ImageDataset(
            ArrayStore(images), np.zeros(len(targets), np.int64), refs, [UNLABELLED]
        )
    return ImageDataset(ArrayStore(images), targets, refs, fashion_mnist.CLASS_NAMES)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_image_files(root: str | os.PathLike) -> list[Path]:
    """The image files under ``root``, at any depth, as absolute paths in a stable order.

    Image files are recognised by their extension (:func:`data.images.is_image_file`); hidden
    files and folders are left out; symbolic links to folders are followed, each real folder
    once (no endless loop). Within a first-level sub-folder the order is that of the paths'
    text; the images lying directly in ``root`` come first.

    Raises:
        DataError: ``root`` is not a folder.
    """
    top = Path(root).expanduser().resolve()
    if not top.is_dir():
        raise DataError(f"{top}: no such folder")
    seen: set[str] = set()
    found: list[Path] = []
    for here, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back to a folder already walked
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        found += [Path(here, f) for f in files if not _is_hidden(f) and is_image_file(f)]

    def order(path: Path) -> tuple[str, str]:
        parts = path.relative_to(top).parts
        return ("" if len(parts) == 1 else parts[0], str(path))

    return sorted(found, key=order)


def expand_image_paths(items: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given, folders replaced by their image files (:func:`list_image_files`).

    Items that are neither folders nor existing files (a missing file, a built-in reference
    ``fashion-mnist:test:3``) are kept as given, for the loader to read or to report.

    Raises:
        DataError: a folder holds no image files.
    """
    out: list[str] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = list_image_files(path)
            if not found:
                raise DataError(
                    f"{path}: no image files in this folder or below "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            out += [str(f) for f in found]
        else:
            out.append(str(item))
    return out


def _read_any(ref: str, draft_size: int | None) -> torch.Tensor:
    """Pixels of a file path or a built-in reference."""
    if ref.startswith(BUILTIN + ":"):
        return read_ref(ref)
    return read_image(ref, draft_size)


def _scan(refs: list[str], draft_size: int | None) -> tuple[list[int], list[str]]:
    """Decode every image once; return the positions that decode and the messages of the rest."""
    good, bad = [], []
    for i, ref in enumerate(refs):
        try:
            _read_any(ref, draft_size)
            good.append(i)
        except DataError as exc:
            bad.append(str(exc))
    return good, bad


def warn_skipped(problems: Sequence[str], source: str) -> None:
    """Log the one warning that lists the unreadable files of ``source`` (none: no warning).

    Args:
        problems: one message per skipped file (each names the file).
        source: what was being read (a folder, a manifest, "queries").
    """
    if not problems:
        return
    shown = "\n  ".join(problems[:SKIPPED_SHOWN])
    if len(problems) > SKIPPED_SHOWN:
        shown += f"\n  ... and {len(problems) - SKIPPED_SHOWN} more"
    logger.warning("skipping %d unreadable image(s) in %s:\n  %s", len(problems), source, shown)


def _files_dataset(
    refs: list[str], names: list[str], draft_size: int | None, source: str
) -> ImageDataset:
    if not refs:
        raise DataError(f"{source}: no images found")
    good, bad = _scan(refs, draft_size)
    warn_skipped(bad, source)
    if not good:
        raise DataError(f"{source}: none of the {len(refs)} images can be read")
    class_names = sorted({names[i] for i in good})
    lookup = {c: i for i, c in enumerate(class_names)}
    refs = [refs[i] for i in good]
    labels = np.array([lookup[names[i]] for i in good], dtype=np.int64)
    return ImageDataset(FileStore(refs, draft_size), labels, refs, class_names)


def load_folder(
    root: str | os.PathLike,
    draft_size: int | None = None,
    labels: str = LABELS_FROM_FOLDERS,
) -> ImageDataset:
    """The images of a folder at any depth, labelled by their first-level sub-folder or not
    at all (see the module docstring); unreadable images are skipped with one warning.

    Args:
        root: the folder.
        draft_size: see :class:`FileStore`.
        labels: ``from-folders`` or ``none`` (:data:`LABEL_MODES`).
    """
    _check_labels(labels)
    root = Path(root).expanduser().resolve()
    files = list_image_files(root)
    if not files:
        raise DataError(
            f"{root}: no images found (image files: {', '.join(sorted(IMAGE_EXTENSIONS))}, "
            "in the folder or any sub-folder)"
        )
    if labels == LABELS_NONE:
        names = [UNLABELLED] * len(files)
    else:
        top_name = root.name or UNLABELLED
        names = [top_name if f.parent == root else f.relative_to(root).parts[0] for f in files]
        loose = [f.name for f in files if f.parent == root]
        if loose and len(loose) < len(files):
            shown = ", ".join(loose[:5]) + (f" and {len(loose) - 5} more" if len(loose) > 5 else "")
            logger.warning(
                "%d image(s) lie directly in %s, beside its class sub-folders (%s): they are "
                "labelled %r; move them into a sub-folder to label them otherwise, or read "
                "the folder without labels",
                len(loose),
                root,
                shown,
                top_name,
            )
    return _files_dataset([str(f) for f in files], names, draft_size, str(root))


def load_files(
    items: Sequence[str | os.PathLike],
    draft_size: int | None = None,
    source: str = "the query images",
) -> ImageDataset:
    """Unlabelled images from files, folders (searched at any depth) and built-in references,
    in the order given: what a search reads its queries from.

    Files that cannot be read (missing, not images, corrupt, too large) are skipped and listed
    once in one warning; the dataset's ``refs`` are the files kept, each labelled
    :data:`UNLABELLED`.

    Args:
        items: image files, folders, or ``fashion-mnist:SPLIT:INDEX`` references.
        draft_size: see :class:`FileStore`.
        source: how to name them in messages.

    Raises:
        DataError: a folder holds no images, or no image at all can be read.
    """
    refs = expand_image_paths(items)
    return _files_dataset(refs, [UNLABELLED] * len(refs), draft_size, source)


def load_csv(
    csv_path: str | os.PathLike,
    split: str | None = None,
    draft_size: int | None = None,
    labels: str = LABELS_FROM_FOLDERS,
) -> ImageDataset:
    """A CSV manifest with a header ``path[,label][,split]``; paths are relative to its folder.

    Args:
        csv_path: the manifest.
        split: keep only rows whose ``split`` column equals this (needs the column).
        draft_size: see :class:`FileStore`.
        labels: ``from-folders`` uses the ``label`` column (every row unlabelled when there is
            none); ``none`` ignores it.
    """
    _check_labels(labels)
    csv_path = Path(csv_path).expanduser().resolve()
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such file")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "path" not in fields:
            raise DataError(
                f"{csv_path}: the header must name the columns path[,label][,split]; found {fields}"
            )
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if split is not None:
        if "split" not in fields:
            raise DataError(f"{csv_path} has no 'split' column, so --split {split} cannot apply")
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise DataError(f"{csv_path}: no row has split == {split!r}")
    use_labels = labels == LABELS_FROM_FOLDERS and "label" in fields
    paths, names = [], []
    for n, row in enumerate(rows, start=2):
        if not row["path"] or (use_labels and not row["label"]):
            what = "path or label" if use_labels else "path"
            raise DataError(f"{csv_path}, line {n}: empty {what}")
        p = Path(row["path"]).expanduser()
        paths.append(str(p if p.is_absolute() else (csv_path.parent / p).resolve()))
        names.append(row["label"] if use_labels else UNLABELLED)
    return _files_dataset(paths, names, draft_size, str(csv_path))


#: Columns of a CSV manifest with a meaning of their own; any other column is a user field.
MANIFEST_COLUMNS = ("path", "label", "split")
#: Names an index gives its own fields (:data:`retrieval.index.store.COLUMNS`): a manifest
#: column of such a name is not stored as a user field, since ``--where id=...`` means the id.
RESERVED_FIELDS = ("id", "ref", "sha256")


def manifest_fields(csv_path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """The user fields of a CSV manifest's rows (every column but ``path``, ``label`` and
    ``split``), by the resolved path of each row's image: what an index stores beside each
    item and filters on (``--where color=red``). Empty values are left out."""
    csv_path = Path(csv_path).expanduser().resolve()
    out: dict[str, dict[str, str]] = {}
    skip = set(MANIFEST_COLUMNS) | set(RESERVED_FIELDS)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        reserved = [
            c.strip() for c in reader.fieldnames or () if c and c.strip() in RESERVED_FIELDS
        ]
        if reserved:
            logger.warning(
                "%s: column(s) %s are not stored as user fields (an index has fields of those "
                "names); rename them to filter on them",
                csv_path,
                ", ".join(reserved),
            )
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            p = Path(row.get("path", "")).expanduser()
            ref = str(p if p.is_absolute() else (csv_path.parent / p).resolve())
            extra = {k: v for k, v in row.items() if k not in skip and v}
            if extra:
                out[ref] = extra
    return out


def open_source(
    spec: str,
    split: str | None = None,
    root: str | os.PathLike | None = None,
    draft_size: int | None = None,
    labels: str = LABELS_FROM_FOLDERS,
) -> ImageDataset:
    """Open a dataset named by ``spec`` (see the module docstring).

    Args:
        spec: ``fashion-mnist[:SPLIT]``, a folder, or a ``.csv`` manifest.
        split: the split, for the built-in set (default 'train') or a CSV with a split column.
        root: where the built-in set lives, when not in the default places.
        draft_size: see :class:`FileStore`.
        labels: ``from-folders`` or ``none`` (:data:`LABEL_MODES`).
    """
    _check_labels(labels)
    if spec == BUILTIN or spec.startswith(BUILTIN + ":"):
        _, _, spec_split = spec.partition(":")
        if spec_split and split and spec_split != split:
            raise DataError(f"{spec!r} names split {spec_split!r} but --split is {split!r}")
        chosen = spec_split or split or "train"
        if chosen not in fashion_mnist.SPLITS:
            raise DataError(f"{BUILTIN} has splits {fashion_mnist.SPLITS}, not {chosen!r}")
        return load_builtin(chosen, root, labels)
    path = Path(spec).expanduser()
    if path.is_dir():
        if split is not None:
            raise DataError("--split applies to the built-in dataset and CSV manifests only")
        return load_folder(path, draft_size, labels)
    if path.suffix.lower() == ".csv":
        return load_csv(path, split, draft_size, labels)
    if not path.exists():
        raise DataError(
            f"{spec}: no such file or folder (a source is '{BUILTIN}[:train|test]', "
            "a folder of images, or a CSV manifest path[,label][,split])"
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
