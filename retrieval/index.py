"""The gallery index: FAISS vectors with stable ids, their metadata, and a manifest.

On disk an index is a folder, written atomically (:func:`retrieval.atomic.atomic_dir`):

- ``index.faiss``: the FAISS index (an ``IndexIDMap2`` over a flat index), ids = item ids;
- ``metadata.json``: per item its id, reference (image path or built-in reference) and label,
  plus the class names;
- ``manifest.json``: format version, metric, dimension, item count, the SHA-256 and path of the
  model checkpoint that produced the vectors, the preprocessing, and the SHA-256 of the two files
  above.

Loading verifies the checksums, and — when given the model the caller will embed queries with —
refuses an index built with another model or dimension: mixing embedding spaces gives
meaningless results silently, so it is an error.

Scores: for ``cosine`` the inner product of unit vectors (higher is closer); for ``l2`` the
Euclidean distance (lower is closer).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from retrieval.atomic import atomic_dir
from retrieval.errors import UserError

FORMAT_VERSION = 1
METRICS = ("cosine", "l2")
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"


def as_faiss(x: np.ndarray) -> np.ndarray:
    """float32, C-contiguous, 2-D: what FAISS wants."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    return x


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = as_faiss(x).copy()
    faiss.normalize_L2(x)
    return x


def knn(
    xq: np.ndarray, xb: np.ndarray, k: int, metric: str = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of each query in ``xb``: ``(D, I)``, each ``(nq, k)``.

    ``D`` holds scores as described in the module docstring (similarities for cosine,
    distances for l2); FAISS searches in blocks, so no ``nq x nb`` matrix is held.
    """
    _check_metric(metric)
    k = min(k, len(xb))
    if metric == "cosine":
        d, i = faiss.knn(normalize(xq), normalize(xb), k, metric=faiss.METRIC_INNER_PRODUCT)
        return d, i
    d, i = faiss.knn(as_faiss(xq), as_faiss(xb), k, metric=faiss.METRIC_L2)
    return np.sqrt(np.maximum(d, 0)), i


def knn_leave_one_out(x: np.ndarray, k: int, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of each row of ``x`` among the *other* rows: ``(D, I)``.

    Searches ``k + 1`` and removes each query's own entry wherever it ranks (a duplicate image
    may tie with it); when it is not among the ``k + 1`` the last one is dropped.
    """
    n = len(x)
    if n < 2:
        raise ValueError("leave-one-out needs at least two items")
    k = min(k, n - 1)
    d, i = knn(x, x, k + 1, metric)
    is_self = i == np.arange(n)[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    is_self &= np.cumsum(is_self, axis=1) == 1  # drop exactly one entry per row
    keep = ~is_self
    return d[keep].reshape(n, k), i[keep].reshape(n, k)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    """What an index was built from; checked on load."""

    metric: str
    dim: int
    count: int
    model_sha256: str
    model_path: str
    preprocessing: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created: float = field(default_factory=time.time)
    checksums: dict = field(default_factory=dict)


@dataclass
class Hit:
    """One search result."""

    rank: int
    id: int
    score: float
    label: str
    ref: str


class GalleryIndex:
    """A FAISS index of gallery embeddings with each item's reference and label.

    Args:
        index: a FAISS index with ids (``IndexIDMap2``).
        ids, refs, labels: per item, in the same order.
        class_names: name of each label.
        manifest: see :class:`Manifest`.
    """

    def __init__(
        self,
        index: faiss.Index,
        ids: np.ndarray,
        refs: Sequence[str],
        labels: np.ndarray,
        class_names: Sequence[str],
        manifest: Manifest,
    ):
        self.index = index
        self.ids = np.asarray(ids, dtype=np.int64)
        self.refs = list(refs)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.manifest = manifest
        self._position = {int(i): p for p, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return self.index.ntotal

    @classmethod
    def build(
        cls,
        xb: np.ndarray,
        refs: Sequence[str],
        labels: np.ndarray,
        class_names: Sequence[str],
        metric: str = "cosine",
        model_sha256: str = "",
        model_path: str = "",
        preprocessing: dict | None = None,
    ) -> GalleryIndex:
        """Index the vectors ``xb`` (shape ``(n, dim)``) exactly (flat index)."""
        _check_metric(metric)
        xb = normalize(xb) if metric == "cosine" else as_faiss(xb)
        if len(xb) == 0:
            raise UserError("cannot build an index of an empty gallery")
        if not (len(xb) == len(refs) == len(labels)):
            raise ValueError("xb, refs and labels must have the same length")
        dim = xb.shape[1]
        flat = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
        index = faiss.IndexIDMap2(flat)
        ids = np.arange(len(xb), dtype=np.int64)
        index.add_with_ids(xb, ids)
        manifest = Manifest(
            metric=metric,
            dim=dim,
            count=len(xb),
            model_sha256=model_sha256,
            model_path=model_path,
            preprocessing=dict(preprocessing or {}),
        )
        return cls(index, ids, refs, labels, class_names, manifest)

    def search(self, xq: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """``(D, I)`` of the ``k`` best items per query; ``I`` holds item ids (-1 = none)."""
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        xq = as_faiss(xq)
        if xq.shape[1] != self.manifest.dim:
            raise UserError(
                f"query vectors have dimension {xq.shape[1]}, the index {self.manifest.dim}"
            )
        if self.manifest.metric == "cosine":
            xq = normalize(xq)
        d, i = self.index.search(xq, min(k, len(self)))
        if self.manifest.metric == "l2":
            d = np.sqrt(np.maximum(d, 0))
        return d, i

    def hits(self, d_row: np.ndarray, i_row: np.ndarray) -> list[Hit]:
        """Turn one row of :meth:`search` output into :class:`Hit` records."""
        out = []
        for rank, (score, item) in enumerate(zip(d_row, i_row, strict=True), start=1):
            if item < 0:
                continue
            p = self._position[int(item)]
            out.append(
                Hit(rank, int(item), float(score), self.class_names[self.labels[p]], self.refs[p])
            )
        return out

    # ---------------------------------------------------------------------------------- disk

    def save(self, directory: str | os.PathLike) -> None:
        """Write the index folder atomically."""
        with atomic_dir(directory) as tmp:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            meta = {
                "class_names": self.class_names,
                "items": [
                    {"id": int(i), "ref": r, "label": int(y)}
                    for i, r, y in zip(self.ids, self.refs, self.labels, strict=True)
                ],
            }
            (tmp / METADATA_FILE).write_text(json.dumps(meta), encoding="utf-8")
            self.manifest.count = len(self)
            self.manifest.checksums = {
                name: _sha256(tmp / name) for name in (INDEX_FILE, METADATA_FILE)
            }
            (tmp / MANIFEST_FILE).write_text(
                json.dumps(asdict(self.manifest), indent=2) + "\n", encoding="utf-8"
            )

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        model_sha256: str | None = None,
        dim: int | None = None,
    ) -> GalleryIndex:
        """Read an index folder, verifying checksums and (when given) the model and dimension.

        Raises:
            UserError: not an index folder, damaged files, or built with another model.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        for name, digest in manifest.checksums.items():
            if not (directory / name).is_file() or _sha256(directory / name) != digest:
                raise UserError(
                    f"{directory / name} is missing or damaged (checksum mismatch); "
                    "rebuild the index with `retrieval index build`"
                )
        if dim is not None and dim != manifest.dim:
            raise UserError(
                f"{directory} holds {manifest.dim}-dimensional vectors but the model makes "
                f"{dim}-dimensional ones; rebuild the index with this model"
            )
        if model_sha256 is not None and model_sha256 != manifest.model_sha256:
            raise UserError(
                f"{directory} was built with another model (checkpoint "
                f"{manifest.model_path or '?'}, sha256 {manifest.model_sha256[:12]}); searching "
                "it with this model would compare different embedding spaces. Use that "
                "checkpoint, or rebuild the index with `retrieval index build`."
            )
        index = faiss.read_index(str(directory / INDEX_FILE))
        meta = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
        items = meta["items"]
        return cls(
            index,
            np.array([it["id"] for it in items], dtype=np.int64),
            [it["ref"] for it in items],
            np.array([it["label"] for it in items], dtype=np.int64),
            meta["class_names"],
            manifest,
        )


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of an index folder, with a clear error when it is not one."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise UserError(f"{directory}: no such index folder (build one with `retrieval index build`)")
    if not path.is_file():
        raise UserError(f"{directory} is not an index folder: it has no {MANIFEST_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest(**raw)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); rebuild the index") from None
    if manifest.format_version > FORMAT_VERSION:
        raise UserError(f"{directory} was written by a newer metric-retrieval; upgrade to read it")
    return manifest
