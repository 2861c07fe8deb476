"""The gallery index: FAISS vectors with stable ids, their metadata, and a manifest.

On disk an index is a folder, written atomically (:func:`retrieval.atomic.atomic_dir`):

- ``index.faiss``: the FAISS index; its ids are the item ids;
- ``metadata.json``: per item its id, reference (image path or built-in reference), label and
  time added; the class names, the next free id and (HNSW only) the removed ids;
- ``manifest.json``: format version, metric, dimension, index type (FAISS factory string), item
  count, the SHA-256 and path of the model checkpoint that produced the vectors, the
  preprocessing, and the SHA-256 of the other files;
- ``journal.jsonl`` (after :meth:`GalleryIndex.commit`): the additions and removals made since
  ``index.faiss`` and ``metadata.json`` were written, one checksummed line each, fsync'd before
  the change is acknowledged and replayed on load; folded into a new snapshot once it outgrows
  :data:`JOURNAL_COMPACT_FRACTION` of ``index.faiss``. Adding one image to a large index so
  appends a line instead of rewriting the index. A line torn by a crash (never acknowledged) is
  dropped;
- ``index.ivfdata`` (IVF indexes built with ``on_disk``): the inverted lists, which FAISS
  memory-maps (``OnDiskInvertedLists``), so neither building nor searching holds them in memory;
  ``index.faiss`` then holds only the quantizer and the lists' directory.

Loading verifies the checksums, and — when given the model the caller will embed queries with —
refuses an index built with another model or dimension: mixing embedding spaces gives
meaningless results silently, so it is an error.

Index types are FAISS factory strings (``Flat``, ``HNSW32``, ``IVF1024,Flat``, ``IVF1024,PQ16``,
``OPQ16,IVF1024,PQ16``, ``SQ8``, ...) or ``auto`` (:func:`choose_index_type`). They fall in three
families that differ in how ids and removal work:

- *flat codes* (``Flat``, ``SQ8``, ``PQ16``): wrapped in ``IndexIDMap2``; removal compacts;
- *IVF* (anything with an inverted file, with or without an ``OPQ`` transform): the inverted
  lists store our ids themselves, and removal deletes from them (wrapping IVF in an
  ``IndexIDMap2`` would be wrong: its ``remove_ids`` assumes the sub-index renumbers its
  entries, which IVF does not, so ids and vectors would drift apart);
- *HNSW*: the graph cannot delete nodes, so a removed id becomes a *tombstone* filtered out of
  every search with an ``IDSelector``; once tombstones exceed :data:`HNSW_COMPACT_FRACTION` of
  the graph it is rebuilt from the remaining vectors.

A gallery too large to embed or hold at once is built from parts (:class:`GalleryPart`, e.g. the
shards of ``retrieval embed --shards``, :mod:`retrieval.index.shards`) with
:meth:`GalleryIndex.build_in_parts`: one training sample, then for IVF one index per part sharing
the trained coarse quantizer, whose inverted lists are merged — in memory, or with ``on_disk``
into ``index.ivfdata`` (FAISS's ``merge_ondisk``), one part in memory at a time.

Scores: for ``cosine`` the inner product of unit vectors (higher is closer); for ``l2`` the
Euclidean distance (lower is closer). Approximate index types return approximate scores.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from retrieval.atomic import atomic_dir, ensure_present, file_sha256, fsync_dir, real_path
from retrieval.errors import UserError

logger = logging.getLogger(__name__)

#: Version 2 added index types, stable ids with add/remove, and the time each item was added.
FORMAT_VERSION = 2
METRICS = ("cosine", "l2")
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"
#: Inverted lists of an on-disk IVF index (FAISS ``OnDiskInvertedLists``).
IVFDATA_FILE = "index.ivfdata"
#: Changes since the snapshot (see the module docstring).
JOURNAL_FILE = "journal.jsonl"
#: Every file an index folder may hold; a folder with anything else is not replaced.
INDEX_FILES = frozenset({INDEX_FILE, METADATA_FILE, MANIFEST_FILE, IVFDATA_FILE, JOURNAL_FILE})
#: :meth:`GalleryIndex.commit` writes a new snapshot instead of appending once the journal is
#: larger than this fraction of ``index.faiss`` and than :data:`JOURNAL_MIN_BYTES`.
JOURNAL_COMPACT_FRACTION = 0.25
JOURNAL_MIN_BYTES = 16 * 1024**2

#: Index type used when none is given: exact search.
DEFAULT_INDEX_TYPE = "Flat"
#: ``--index auto``: memory the index may use when no budget is given, in bytes.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3
#: ``auto``: galleries smaller than this are searched exactly (brute force over 10,000 vectors
#: takes about a millisecond per query; an approximate index would gain nothing).
FLAT_THRESHOLD = 10_000
#: ``auto``: HNSW neighbours per node are chosen between these (memory ~ n * (4 dim + 8 M)).
HNSW_MIN_M, HNSW_MAX_M = 8, 32
#: HNSW graph construction depth (FAISS's default is 40).
HNSW_EF_CONSTRUCTION = 80
#: Default HNSW search depth stored in new indexes (FAISS's default, 16, loses recall).
DEFAULT_EF_SEARCH = 64
#: Default number of IVF lists visited per query stored in new indexes (capped at nlist).
DEFAULT_NPROBE = 32
#: IVF/PQ/OPQ are trained on at most this many gallery vectors (a seeded random sample).
MAX_TRAINING_VECTORS = 100_000
#: IVF training wants this many vectors per list; nlist is capped at n / this.
VECTORS_PER_LIST = 39
#: HNSW is rebuilt once removed-but-still-in-the-graph items exceed this fraction of it.
HNSW_COMPACT_FRACTION = 0.25
#: Bytes FAISS stores per vector id in inverted lists and id maps.
ID_BYTES = 8
#: :meth:`GalleryIndex.build_in_parts` reads and adds at most this many vectors at a time
#: (32 MB of 128-d float32), so a gallery held in memory-mapped parts is never loaded whole.
ADD_BLOCK = 65_536

FAMILIES = ("flat", "ivf", "hnsw")

#: Exact search block: FAISS computes query x gallery similarities in blocks of this many
#: queries x gallery vectors (64 MB of float32). FAISS's default gallery block, 1,024, makes
#: exact batch search about half as fast as one torch matmul + topk; 16,384 makes it faster.
BLAS_QUERY_BLOCK, BLAS_DATABASE_BLOCK = 1024, 16384
faiss.cvar.distance_compute_blas_query_bs = BLAS_QUERY_BLOCK
faiss.cvar.distance_compute_blas_database_bs = BLAS_DATABASE_BLOCK


class UnknownIdError(UserError):
    """An id that is not (or no longer) in the index."""


class ReadOnlyIndexError(UserError):
    """A change asked of an index opened memory-mapped."""


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what C code prints on stdout to stderr for the duration.

    FAISS prints notices about on-disk inverted lists with ``printf``; on stdout they would spoil
    machine-readable output (``retrieval search --json``).
    """
    sys.stdout.flush()
    try:
        libc = ctypes.CDLL(None)
        saved = os.dup(1)
    except (OSError, AttributeError, TypeError):  # no C library to flush, or no fd 1
        yield
        return
    os.dup2(2, 1)
    try:
        yield
    finally:
        libc.fflush(None)  # C's buffer, before fd 1 is stdout again
        os.dup2(saved, 1)
        os.close(saved)


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


def knn_leave_one_out(
    x: np.ndarray, k: int, metric: str = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
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


# ------------------------------------------------------------------------------ index types

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
}


def parse_memory(text: str | int) -> int:
    """Bytes from ``"512MB"``, ``"4GB"``, ``"1.5g"`` or a plain number of bytes (binary units)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise UserError(f"cannot read the memory size {text!r}; write e.g. 512MB or 4GB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UserError(f"a memory budget must be positive, got {text!r}")
    return value


def nlist_for(n: int) -> int:
    """IVF lists for ``n`` vectors: the power of two nearest ``4 sqrt(n)``, at most n / 39."""
    target = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return int(max(1, min(target, n // VECTORS_PER_LIST)))


def choose_index_type(n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """The index type ``--index auto`` picks for ``n`` vectors of ``dim`` under a memory budget.

    Follows autofaiss's reasoning (``get_optimal_index_keys_v2``), in order:

    1. fewer than :data:`FLAT_THRESHOLD` vectors: ``Flat`` (exact and already fast);
    2. HNSW if it fits: it costs about ``4 dim + 8 M`` bytes per vector, so
       :math:`M = \\lfloor (B / n - 4\\,dim - 8) / 8 \\rfloor`, capped at 32, needs ``M >= 8``;
    3. ``IVF{nlist},Flat`` if the raw vectors fit (``n (4 dim + 8)`` bytes), with ``nlist``
       the power of two nearest :math:`4\\sqrt{n}`;
    4. otherwise ``OPQ{m},IVF{nlist},PQ{m}`` with the largest ``m`` (bytes per vector, a divisor
       of ``dim``) whose ``n (m + 8)`` bytes fit.

    Raises:
        UserError: nothing fits in the budget.

    Example:
        >>> choose_index_type(5_000, 128)
        'Flat'
        >>> choose_index_type(100_000, 128, 1024**3)
        'HNSW32'
        >>> choose_index_type(1_000_000, 128, 540 * 1024**2)
        'IVF4096,Flat'
        >>> choose_index_type(1_000_000, 128, 100 * 1024**2)
        'OPQ64,IVF4096,PQ64'
    """
    if n < 1 or dim < 1:
        raise UserError("cannot choose an index type for an empty gallery")
    per_vector = memory_budget / n
    if n < FLAT_THRESHOLD and per_vector >= 4 * dim + ID_BYTES:
        return "Flat"
    m = int((per_vector - 4 * dim - ID_BYTES) // 8)
    if m >= HNSW_MIN_M:
        return f"HNSW{min(m, HNSW_MAX_M)}"
    nlist = nlist_for(n)
    centroids = nlist * dim * 4
    if n * (4 * dim + ID_BYTES) + centroids <= memory_budget:
        return f"IVF{nlist},Flat"
    for m in (64, 48, 32, 24, 16, 8, 4):
        if m < dim and dim % m == 0 and n * (m + ID_BYTES) + centroids <= memory_budget:
            return f"OPQ{m},IVF{nlist},PQ{m}"
    raise UserError(
        f"{n:,} vectors of dimension {dim} do not fit in {memory_budget / 1024**2:,.0f} MB even "
        "with product quantization; raise --memory-budget"
    )


def _inner(index: faiss.Index) -> faiss.Index:
    """The index under an ``IndexIDMap``/``IndexIDMap2`` wrapper (or the index itself)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index)
    return index


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def index_family(index: faiss.Index) -> str:
    """``flat`` | ``ivf`` | ``hnsw``: how ids, removal and search parameters work (see module)."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if _ivf(inner) is not None:
        return "ivf"
    return "flat"


def make_index(index_type: str, dim: int, metric: str) -> faiss.Index:
    """An empty FAISS index of a factory string, with ids (see the module docstring).

    Raises:
        UserError: FAISS cannot make this type for this dimension.
    """
    _check_metric(metric)
    if "IDMap" in index_type:
        raise UserError(f"{index_type!r}: leave out IDMap, every index gets stable ids already")
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    try:
        index = faiss.index_factory(dim, index_type, faiss_metric)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "invalid"
        raise UserError(
            f"FAISS cannot make an index of type {index_type!r} for {dim}-dimensional vectors "
            f"({reason}). Examples: Flat, HNSW32, IVF1024,Flat, IVF1024,PQ16, "
            "OPQ16,IVF1024,PQ16, SQ8, or auto; PQ's m must divide the dimension."
        ) from None
    family = index_family(index)
    # Polysemous training (on by default for PQ) costs far more than the PQ itself and only
    # serves polysemous search, which we do not use.
    for part in (faiss.downcast_index(index), _ivf(index)):
        if isinstance(part, faiss.IndexPreTransform):
            part = faiss.downcast_index(part.index)
        if part is not None and hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    if family == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        faiss.downcast_index(index).hnsw.efSearch = DEFAULT_EF_SEARCH
    elif family == "ivf":
        ivf = _ivf(index)
        ivf.nprobe = min(DEFAULT_NPROBE, ivf.nlist)
    if family != "ivf":
        index = faiss.IndexIDMap2(index)
    return index


def _faiss_search(
    index: faiss.Index, xq: np.ndarray, k: int, params: faiss.SearchParameters | None
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` with per-query parameters. ``faiss.contrib.torch_utils`` (imported by
    pytorch-metric-learning) replaces ``search`` with a version without ``params`` and keeps
    FAISS's own as ``search_numpy``."""
    search = getattr(index, "search_numpy", index.search)
    return search(xq, k, params=params)


def training_positions(n: int, seed: int) -> np.ndarray | None:
    """Sorted positions of the seeded training sample of a gallery of ``n`` vectors, or
    ``None`` when all ``n <= MAX_TRAINING_VECTORS`` are used. A gallery built in parts
    (:meth:`GalleryIndex.build_in_parts`) trains on the same sample as one built in one go."""
    if n <= MAX_TRAINING_VECTORS:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, MAX_TRAINING_VECTORS, replace=False))


def _train(index: faiss.Index, xb: np.ndarray, seed: int) -> None:
    """Train IVF / PQ / OPQ / SQ on a seeded sample of at most MAX_TRAINING_VECTORS."""
    if index.is_trained:
        return
    ivf = _ivf(_inner(index))
    if ivf is not None and len(xb) < ivf.nlist:
        raise UserError(
            f"an IVF index with {ivf.nlist} lists needs at least {ivf.nlist} vectors to train "
            f"(better {VECTORS_PER_LIST * ivf.nlist}); the gallery has {len(xb)}. Use fewer "
            "lists, Flat, or --index auto"
        )
    positions = training_positions(len(xb), seed)
    if positions is not None:
        xb = xb[positions]
    logger.info("training the index on %d vectors", len(xb))
    try:
        index.train(xb)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:200]
        raise UserError(
            f"could not train the index on {len(xb)} vectors ({reason}); product quantization "
            "needs at least 256 vectors (better 10,000): use Flat, HNSW32 or SQ8"
        ) from None


def search_parameters(
    index: faiss.Index,
    nprobe: int | None = None,
    ef_search: int | None = None,
    exclude: np.ndarray | None = None,
) -> faiss.SearchParameters | None:
    """Per-query FAISS search parameters (nothing global is changed: safe across threads).

    Args:
        index: the index to search.
        nprobe: IVF lists visited per query (IVF indexes only), ``1 <= nprobe <= nlist``.
        ef_search: HNSW search depth (HNSW indexes only), ``>= 1``.
        exclude: ids never to return (tombstones).

    Raises:
        UserError: a parameter that does not apply to this index type, or out of range.
    """
    family = index_family(index)
    if nprobe is not None and family != "ivf":
        raise UserError(f"nprobe applies to IVF indexes; this one is {family}")
    if ef_search is not None and family != "hnsw":
        raise UserError(f"efSearch applies to HNSW indexes; this one is {family}")
    sel = None
    if exclude is not None and len(exclude):
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(exclude, dtype=np.int64)))
    if family == "hnsw":
        if ef_search is not None and ef_search < 1:
            raise UserError(f"efSearch must be at least 1, got {ef_search}")
        if ef_search is None and sel is None:
            return None
        stored = _inner(index).hnsw.efSearch
        params = faiss.SearchParametersHNSW(efSearch=ef_search or stored)
        if sel is not None:
            params.sel = sel
        return params
    if family == "ivf":
        if nprobe is None and sel is None:
            return None
        ivf = _ivf(index)
        if nprobe is not None and not 1 <= nprobe <= ivf.nlist:
            raise UserError(f"nprobe must be between 1 and {ivf.nlist} (the lists), got {nprobe}")
        params = faiss.SearchParametersIVF(nprobe=nprobe or ivf.nprobe)
        if sel is not None:
            params.sel = sel
        if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
            return faiss.SearchParametersPreTransform(index_params=params)
        return params
    if sel is None:
        return None
    return faiss.SearchParameters(sel=sel)


# ------------------------------------------------------------------------------ the index


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
    index_type: str = DEFAULT_INDEX_TYPE
    updated: float = field(default_factory=time.time)


@dataclass
class GalleryPart:
    """A contiguous slice of a gallery, e.g. one rank's shard of ``retrieval embed --shards``.

    Args:
        xb: vectors ``(n, dim)``; may be memory-mapped (``np.load(..., mmap_mode="r")``).
        refs: a reference per vector.
        labels: a label (index into the class names) per vector, ``(n,)``.
    """

    xb: np.ndarray
    refs: Sequence[str]
    labels: np.ndarray


@dataclass
class Item:
    """One indexed image: its stable id, reference, label (index into class names), and when
    it was added (seconds since the epoch)."""

    id: int
    ref: str
    label: int
    added: float


@dataclass
class Hit:
    """One search result."""

    rank: int
    id: int
    score: float
    label: str
    ref: str


def _new_manifest(
    metric: str,
    dim: int,
    index_type: str,
    model_sha256: str,
    model_path: str,
    preprocessing: dict | None,
) -> Manifest:
    """The manifest of a new, still empty index."""
    return Manifest(
        metric=metric,
        dim=dim,
        count=0,
        model_sha256=model_sha256,
        model_path=model_path,
        preprocessing=dict(preprocessing or {}),
        index_type=index_type,
    )


class GalleryIndex:
    """A FAISS index of gallery embeddings with stable ids and each item's metadata.

    Not thread-safe by itself: :class:`retrieval.serving.service.SearchService` adds the locking.

    Args:
        index: a FAISS index whose ids are item ids (see :func:`make_index`).
        items: the live items.
        class_names: name of each label.
        manifest: see :class:`Manifest`.
        next_id: the id the next added item gets (ids are never reused).
        tombstones: removed ids still in an HNSW graph.
        read_only: memory-mapped indexes cannot change.
    """

    def __init__(
        self,
        index: faiss.Index,
        items: Iterable[Item],
        class_names: Sequence[str],
        manifest: Manifest,
        next_id: int | None = None,
        tombstones: Iterable[int] = (),
        read_only: bool = False,
    ):
        self.index = index
        self.items: dict[int, Item] = {it.id: it for it in items}
        self.class_names = list(class_names)
        self.manifest = manifest
        self.next_id = max(self.items, default=-1) + 1 if next_id is None else next_id
        self.tombstones: set[int] = set(tombstones)
        self.read_only = read_only
        self.family = index_family(index)
        #: ``index.ivfdata`` of an on-disk index (its inverted lists), else None.
        self.lists_file: Path | None = None
        self._pending: list[dict] = []  # journal entries of changes not yet committed
        self._folder: Path | None = None  # the folder this index was loaded from / saved to
        self._journal_bytes = 0  # length of that folder's journal up to its last good line

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> np.ndarray:
        return np.fromiter(self.items, dtype=np.int64, count=len(self.items))

    @property
    def refs(self) -> list[str]:
        return [it.ref for it in self.items.values()]

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items.values()], dtype=np.int64)

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
        index_type: str = DEFAULT_INDEX_TYPE,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        seed: int = 0,
        on_disk: str | os.PathLike | None = None,
    ) -> GalleryIndex:
        """Index the vectors ``xb`` ``(n, dim)``; item ids are ``0 .. n-1``.

        Args:
            index_type: a FAISS factory string or ``auto`` (:func:`choose_index_type`).
            memory_budget: bytes the index may use, for ``auto``.
            seed: of the training sample.
            on_disk: work folder for IVF lists kept on disk (see :meth:`build_in_parts`).
        """
        return cls.build_in_parts(
            [GalleryPart(np.asarray(xb), refs, labels)],
            class_names,
            metric=metric,
            model_sha256=model_sha256,
            model_path=model_path,
            preprocessing=preprocessing,
            index_type=index_type,
            memory_budget=memory_budget,
            seed=seed,
            on_disk=on_disk,
        )

    @classmethod
    def build_in_parts(
        cls,
        parts: Sequence[GalleryPart],
        class_names: Sequence[str],
        metric: str = "cosine",
        model_sha256: str = "",
        model_path: str = "",
        preprocessing: dict | None = None,
        index_type: str = DEFAULT_INDEX_TYPE,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        seed: int = 0,
        on_disk: str | os.PathLike | None = None,
    ) -> GalleryIndex:
        """The index :meth:`build` makes of the parts' vectors concatenated, built part by part.

        Item ids run ``0 .. n-1`` across the parts in order. The index is trained once, on the
        sample :meth:`build` would draw (:func:`training_positions`, gathered from the parts).
        For IVF types every part is then added to its own copy of the trained index — the parts
        share one coarse quantizer — and its inverted lists are appended to the result's
        (``IndexIVF.merge_from``), so the lists hold the same entries in the same order as an
        index built in one go, and search returns the same results. Other types add the parts
        to one index. Vectors are read :data:`ADD_BLOCK` at a time: besides the index itself,
        memory holds one block and the training sample, never the whole gallery.

        With ``on_disk`` (a work folder; IVF types only) the index itself stays out of memory
        too: each part's index is written to the folder, then their lists are merged into
        ``index.ivfdata`` there (``faiss.contrib.ondisk.merge_ondisk``), which :meth:`save`
        moves into the index folder. Such an index is read-only: rebuild it to change it.

        Raises:
            UserError: no vectors, parts of different dimensions, or ``on_disk`` for a type
                without inverted lists.
        """
        _check_metric(metric)
        n = sum(len(p.xb) for p in parts)
        if n == 0:
            raise UserError("cannot build an index of an empty gallery")
        dims = sorted({p.xb.shape[1] for p in parts if p.xb.ndim == 2})
        if len(dims) != 1 or any(p.xb.ndim != 2 for p in parts):
            raise UserError(f"the parts hold vectors of different shapes (dimensions {dims})")
        for p in parts:
            if not (len(p.xb) == len(p.refs) == len(p.labels)):
                raise ValueError("each part's xb, refs and labels must have the same length")
        dim = dims[0]
        if index_type == "auto":
            index_type = choose_index_type(n, dim, memory_budget)
            logger.info("index type for %d vectors: %s", n, index_type)

        def prepare(x: np.ndarray) -> np.ndarray:
            return normalize(x) if metric == "cosine" else as_faiss(x)

        index = make_index(index_type, dim, metric)
        if not index.is_trained:
            positions = training_positions(n, seed)
            if positions is None:
                sample = np.concatenate([prepare(p.xb[:]) for p in parts])
            else:
                starts = np.cumsum([0] + [len(p.xb) for p in parts])
                sample = np.concatenate(
                    [
                        prepare(p.xb[positions[(positions >= a) & (positions < b)] - a])
                        for p, a, b in zip(parts, starts[:-1], starts[1:], strict=True)
                    ]
                )
            _train(index, sample, seed)
            del sample
        manifest = _new_manifest(metric, dim, index_type, model_sha256, model_path, preprocessing)
        out = cls(index, [], class_names, manifest, next_id=0)
        if on_disk is not None and out.family != "ivf":
            raise UserError(
                f"an on-disk index keeps IVF inverted lists on disk; {index_type} "
                "has none: choose an IVF type, e.g. IVF4096,Flat"
            )
        work = Path(on_disk) if on_disk is not None else None
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
        empty = faiss.clone_index(index) if out.family == "ivf" else None
        part_files: list[str] = []
        for n_part, part in enumerate(parts):
            # the first part goes straight in, unless every part is written out for merge_ondisk
            direct = empty is None or (n_part == 0 and work is None)
            target = out.index if direct else faiss.clone_index(empty)
            for a in range(0, len(part.xb), ADD_BLOCK):
                b = min(a + ADD_BLOCK, len(part.xb))
                out._add_normalized(
                    prepare(part.xb[a:b]), part.refs[a:b], part.labels[a:b], into=target
                )
            if work is not None:
                part_files.append(str(work / f"part-{n_part:05d}.faiss"))
                faiss.write_index(target, part_files[-1])
                del target
            elif not direct:
                out.index.merge_from(target, 0)  # shared quantizer: lists are appended
                logger.info("merged the inverted lists of %d vectors", target.ntotal)
        if work is not None:
            from faiss.contrib.ondisk import merge_ondisk

            lists = work / IVFDATA_FILE
            lists.unlink(missing_ok=True)
            with _stdout_to_stderr():
                merge_ondisk(out.index, part_files, str(lists))  # same order as merge_from
            for name in part_files:
                Path(name).unlink()
            out.lists_file = lists
            logger.info("merged the inverted lists of %d parts into %s", len(parts), lists)
        return out

    # ---------------------------------------------------------------------------- changes

    def label_id(self, name: str) -> int:
        """The label number of a class name, adding the class when it is new."""
        if name not in self.class_names:
            self.class_names.append(name)
        return self.class_names.index(name)

    def add(
        self, xb: np.ndarray, refs: Sequence[str], labels: Sequence[int] | np.ndarray
    ) -> np.ndarray:
        """Add vectors ``(n, dim)`` with their references and labels; returns their new ids."""
        self._check_writable()
        xb = as_faiss(xb)
        if xb.shape[1] != self.manifest.dim:
            raise UserError(f"vectors have dimension {xb.shape[1]}, the index {self.manifest.dim}")
        if not (len(xb) == len(refs) == len(labels)):
            raise ValueError("xb, refs and labels must have the same length")
        if self.manifest.metric == "cosine":
            xb = normalize(xb)
        ids = self._add_normalized(xb, refs, labels)
        self._pending.append(
            {
                "op": "add",
                "ids": ids.tolist(),
                "refs": [str(r) for r in refs],
                "labels": [self.class_names[int(y)] for y in labels],
                "added": self.items[int(ids[0])].added if len(ids) else time.time(),
                "dim": int(xb.shape[1]),
                "vectors": base64.b64encode(
                    np.ascontiguousarray(xb, np.float32).tobytes()
                ).decode(),
            }
        )
        return ids

    def _add_normalized(
        self, xb: np.ndarray, refs: Sequence[str], labels, into: faiss.Index | None = None
    ) -> np.ndarray:
        """Add prepared vectors under new ids, to ``into`` (default: this index)."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)})")
        ids = np.arange(self.next_id, self.next_id + len(xb), dtype=np.int64)
        (self.index if into is None else into).add_with_ids(xb, ids)
        now = time.time()
        for i, r, y in zip(ids, refs, labels, strict=True):
            self.items[int(i)] = Item(int(i), str(r), int(y), now)
        self.next_id += len(xb)
        return ids

    def remove(self, ids: Iterable[int]) -> int:
        """Remove items by id; returns how many were removed.

        Raises:
            UserError: an id that is not in the index (nothing is removed then).
        """
        self._check_writable()
        ids = sorted({int(i) for i in ids})
        unknown = [i for i in ids if i not in self.items]
        if unknown:
            shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise UnknownIdError(f"no item with id {shown} in this index")
        if not ids:
            return 0
        if self.family == "hnsw":
            self.tombstones.update(ids)
        else:
            removed = self.index.remove_ids(faiss.IDSelectorBatch(np.array(ids, dtype=np.int64)))
            if removed != len(ids):
                raise RuntimeError(f"FAISS removed {removed} vectors instead of {len(ids)}")
        for i in ids:
            del self.items[i]
        if self.family == "hnsw" and len(self.tombstones) > HNSW_COMPACT_FRACTION * max(
            1, self.index.ntotal
        ):
            self._rebuild_hnsw()
        self._pending.append({"op": "remove", "ids": ids})
        return len(ids)

    # ---------------------------------------------------------------------------- journal

    def commit(self, directory: str | os.PathLike) -> None:
        """Make the folder ``directory`` hold this index, durably.

        When the folder is the one this index was loaded from or last saved to, the changes
        since then are appended to its journal (fsync'd) — milliseconds, whatever the index
        size; otherwise, or once the journal has grown past :data:`JOURNAL_COMPACT_FRACTION` of
        ``index.faiss``, the whole folder is written anew (:meth:`save`).
        """
        directory = Path(directory)
        journal = directory / JOURNAL_FILE
        appendable = (
            self._folder is not None
            and self._folder == real_path(directory)
            and (directory / INDEX_FILE).is_file()
        )
        if appendable:
            limit = max(
                JOURNAL_MIN_BYTES,
                JOURNAL_COMPACT_FRACTION * (directory / INDEX_FILE).stat().st_size,
            )
            appendable = self._journal_bytes <= limit
        if not appendable:
            self.save(directory)
            return
        if not self._pending:
            return
        lines = b"".join(_journal_line(entry) for entry in self._pending)
        new = not journal.exists()
        if new:
            self._journal_bytes = 0
        with open(journal, "ab" if new else "r+b") as fh:
            fh.truncate(self._journal_bytes)  # drop a line torn by an earlier failure
            fh.seek(self._journal_bytes)
            try:
                fh.write(lines)
                fh.flush()
                os.fsync(fh.fileno())
            except BaseException:  # not acknowledged: leave no trace of it
                with contextlib.suppress(OSError):
                    fh.truncate(self._journal_bytes)
                raise
        if new:
            fsync_dir(directory)
        self._journal_bytes += len(lines)
        self._pending.clear()

    def _replay(self, journal: Path) -> int:
        """Apply the journal's changes; returns the length of its good part, in bytes."""
        data = journal.read_bytes()
        good = 0
        lines = data.split(b"\n")
        for n, line in enumerate(lines[:-1], start=1):  # the last piece has no newline
            entry = _parse_journal_line(line)
            if entry is None:
                if any(rest.strip() for rest in lines[n:]):
                    raise UserError(
                        f"{journal}, line {n} is damaged; the changes after it "
                        "cannot be applied: rebuild the index"
                    )
                break
            self._apply(entry, journal, n)
            good += len(line) + 1
        if good < len(data):
            logger.warning(
                "%s: dropped an incomplete last change (a crash while writing it; "
                "it was never acknowledged)",
                journal,
            )
        self._pending.clear()
        return good

    def _apply(self, entry: dict, journal: Path, line: int) -> None:
        try:
            if entry["op"] == "add":
                xb = np.frombuffer(base64.b64decode(entry["vectors"]), dtype=np.float32)
                xb = xb.reshape(-1, int(entry["dim"]))
                labels = [self.label_id(name) for name in entry["labels"]]
                ids = self._add_normalized(xb, entry["refs"], labels)
                for i in ids:
                    self.items[int(i)] = replace(self.items[int(i)], added=float(entry["added"]))
                ok = ids.tolist() == entry["ids"]
            elif entry["op"] == "remove":
                ok = self.remove(entry["ids"]) == len(entry["ids"])
            else:
                ok = False
        except (KeyError, TypeError, ValueError, UserError):
            ok = False
        if not ok:
            raise UserError(
                f"{journal}, line {line} does not fit the index (a journal of "
                "another index?); rebuild the index"
            )

    def _rebuild_hnsw(self) -> None:
        """Rebuild the HNSW graph without its tombstones (HNSW cannot delete nodes)."""
        old = faiss.downcast_index(self.index)
        all_ids = faiss.vector_to_array(old.id_map).astype(np.int64)
        vectors = _inner(old).reconstruct_n(0, old.ntotal)
        keep = ~np.isin(all_ids, np.fromiter(self.tombstones, dtype=np.int64))
        new = make_index(self.manifest.index_type, self.manifest.dim, self.manifest.metric)
        _inner(new).hnsw.efSearch = _inner(old).hnsw.efSearch
        if keep.any():
            _train(new, vectors[keep], seed=0)
            new.add_with_ids(np.ascontiguousarray(vectors[keep]), all_ids[keep])
        logger.info("rebuilt the HNSW graph without %d removed items", len(self.tombstones))
        self.index = new
        self.tombstones.clear()

    def set_search_defaults(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the search parameters stored in the index (used when a query gives none)."""
        if nprobe is not None or ef_search is not None:
            search_parameters(self.index, nprobe, ef_search)  # validates both
        if nprobe is not None:
            _ivf(self.index).nprobe = nprobe
        if ef_search is not None:
            _inner(self.index).hnsw.efSearch = ef_search

    @property
    def read_only_reason(self) -> str:
        """Why images cannot be added or removed ('' when they can)."""
        if self.lists_file is not None:
            return (
                "this index keeps its inverted lists on disk (built with --on-disk) and is "
                "read-only; rebuild it to add or remove images"
            )
        if self.read_only:
            return (
                "this index was opened memory-mapped (read-only); open it without --mmap to "
                "add or remove images"
            )
        return ""

    def _check_writable(self) -> None:
        if self.read_only or self.lists_file is not None:
            raise ReadOnlyIndexError(self.read_only_reason)

    # ---------------------------------------------------------------------------- search

    def search(
        self,
        xq: np.ndarray,
        k: int = 10,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(D, I)`` ``(nq, k')`` of the best items per query, ``k' = min(k, len(self))``;
        ``I`` holds item ids (-1 = none).

        Args:
            xq: query vectors ``(nq, dim)``; a batch is searched in one call.
            k: results per query.
            nprobe, ef_search: per-query search parameters (:func:`search_parameters`).
        """
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        xq = as_faiss(xq)
        if xq.shape[1] != self.manifest.dim:
            raise UserError(
                f"query vectors have dimension {xq.shape[1]}, the index {self.manifest.dim}"
            )
        if self.manifest.metric == "cosine":
            xq = normalize(xq)
        exclude = np.fromiter(self.tombstones, dtype=np.int64) if self.tombstones else None
        params = search_parameters(self.index, nprobe, ef_search, exclude)
        k = min(k, len(self))
        if k == 0:
            return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
        d, i = _faiss_search(self.index, xq, k, params)
        if self.manifest.metric == "l2":
            d = np.sqrt(np.maximum(d, 0))
        return d, i

    def hits(self, d_row: np.ndarray, i_row: np.ndarray) -> list[Hit]:
        """Turn one row of :meth:`search` output into :class:`Hit` records (ranks from 1)."""
        out = []
        for score, item in zip(d_row, i_row, strict=True):
            if item < 0:
                continue
            it = self.items.get(int(item))
            if it is None:
                raise RuntimeError(f"the FAISS index returned id {item}, unknown to the metadata")
            out.append(Hit(len(out) + 1, it.id, float(score), self.class_names[it.label], it.ref))
        return out

    def describe(self) -> dict:
        """What the index holds, for ``index info`` and the server's ``/stats``."""
        inner = _inner(self.index)
        out = {
            "items": len(self),
            "index_type": self.manifest.index_type,
            "family": self.family,
            "metric": self.manifest.metric,
            "dim": self.manifest.dim,
            "classes": len(self.class_names),
            "next_id": self.next_id,
            "read_only": self.read_only,
            "lists_on_disk": self.lists_file is not None,
        }
        if self.family == "hnsw":
            out["ef_search"] = int(inner.hnsw.efSearch)
            out["removed_pending_rebuild"] = len(self.tombstones)
        if self.family == "ivf":
            ivf = _ivf(self.index)
            out["nlist"], out["nprobe"] = int(ivf.nlist), int(ivf.nprobe)
        return out

    # ---------------------------------------------------------------------------------- disk

    def save(self, directory: str | os.PathLike) -> None:
        """Write the index folder atomically: the old folder stays whole until the new one is
        complete.

        Raises:
            UserError: ``directory`` is a file, or a folder that is not an index folder
                (:func:`is_index_folder`); it is left untouched.
        """
        directory = real_path(directory)  # through a link: the folder itself is replaced
        with atomic_dir(directory, owned=is_index_folder, what="an index folder") as tmp:
            files = [INDEX_FILE, METADATA_FILE]
            if self.lists_file is not None:
                # the lists move (a rename: keep the work folder on the index's file system);
                # the index file records their name, found beside it (IO_FLAG_ONDISK_SAME_DIR)
                if real_path(self.lists_file.parent) == directory:
                    raise UserError("an on-disk index cannot be saved again; rebuild it")
                os.replace(self.lists_file, tmp / IVFDATA_FILE)
                files.append(IVFDATA_FILE)
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            meta = {
                "class_names": self.class_names,
                "next_id": self.next_id,
                "tombstones": sorted(self.tombstones),
                "items": [asdict(it) for it in self.items.values()],
            }
            (tmp / METADATA_FILE).write_text(json.dumps(meta), encoding="utf-8")
            self.manifest.count = len(self)
            self.manifest.format_version = FORMAT_VERSION
            self.manifest.updated = time.time()
            self.manifest.checksums = {name: file_sha256(tmp / name) for name in files}
            (tmp / MANIFEST_FILE).write_text(
                json.dumps(asdict(self.manifest), indent=2) + "\n", encoding="utf-8"
            )
        if self.lists_file is not None:
            self.lists_file = directory / IVFDATA_FILE
        self._pending.clear()
        self._folder, self._journal_bytes = directory, 0

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        model_sha256: str | None = None,
        dim: int | None = None,
        mmap: bool = False,
    ) -> GalleryIndex:
        """Read an index folder, verifying checksums and (when given) the model and dimension.

        Args:
            mmap: memory-map the FAISS file instead of reading it (``IO_FLAG_MMAP``): the
                vectors stay on disk and are paged in on demand, for indexes larger than
                memory. The index is then read-only.

        Raises:
            UserError: not an index folder, damaged files, or built with another model.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        for name, digest in manifest.checksums.items():
            if not (directory / name).is_file() or file_sha256(directory / name) != digest:
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
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        on_disk = IVFDATA_FILE in manifest.checksums
        if on_disk:
            flags |= faiss.IO_FLAG_ONDISK_SAME_DIR  # the lists beside index.faiss, wherever
        try:
            with _stdout_to_stderr() if on_disk else contextlib.nullcontext():
                index = faiss.read_index(str(directory / INDEX_FILE), flags)
            meta = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
            items = [
                Item(
                    int(it["id"]),
                    str(it["ref"]),
                    int(it["label"]),
                    float(it.get("added", manifest.created)),
                )
                for it in meta["items"]
            ]
            tombstones = [int(i) for i in meta.get("tombstones", [])]
            out = cls(
                index,
                items,
                meta["class_names"],
                manifest,
                meta.get("next_id"),
                tombstones,
                read_only=mmap or on_disk,
            )
            if on_disk:
                out.lists_file = directory / IVFDATA_FILE
            journal = directory / JOURNAL_FILE
            if journal.is_file() and journal.stat().st_size:
                if mmap:
                    raise UserError(
                        f"{directory} has changes in {JOURNAL_FILE} not yet in {INDEX_FILE}; "
                        f"run `retrieval index compact {directory}` before opening it "
                        "memory-mapped"
                    )
                out._journal_bytes = out._replay(journal)
            out._folder = real_path(directory)
        except (RuntimeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"{directory} is damaged ({str(exc)[:200]}); rebuild the index"
            ) from None
        if index.ntotal != len(out.items) + len(out.tombstones):
            raise UserError(
                f"{directory} is damaged: the FAISS index holds {index.ntotal} vectors, the "
                f"metadata {len(out.items)} items; rebuild the index"
            )
        return out


def _journal_line(entry: dict) -> bytes:
    """``SHA256 JSON\\n``: one journal entry with the checksum of its JSON."""
    payload = json.dumps(entry, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest().encode() + b" " + payload + b"\n"


def _parse_journal_line(line: bytes) -> dict | None:
    """The entry of a journal line; None when it is torn or damaged."""
    digest, _, payload = line.partition(b" ")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        return None
    try:
        entry = json.loads(payload)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of an index folder, with a clear error when it is not one."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    ensure_present(directory)  # a swap a crash interrupted is finished first
    if not directory.is_dir():
        raise UserError(
            f"{directory}: no such index folder (build one with `retrieval index build`)"
        )
    if not path.is_file():
        raise UserError(f"{directory} is not an index folder: it has no {MANIFEST_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise TypeError("not a mapping")
        if int(raw.get("format_version", 1)) > FORMAT_VERSION:
            raise UserError(
                f"{directory} was written by a newer metric-retrieval; upgrade to read it"
            )
        manifest = Manifest(**raw)
    except (json.JSONDecodeError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); rebuild the index") from None
    return manifest


def is_index_folder(directory: str | os.PathLike) -> bool:
    """Whether a folder is an index folder written by this program: a manifest of ours, and no
    file an index does not have. Only such a folder is ever replaced by :meth:`GalleryIndex.save`
    (a user's folder given as ``--out`` by mistake is refused, not emptied)."""
    directory = Path(directory)
    try:
        names = set(os.listdir(directory))
        raw = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(raw, dict)
        and {"metric", "dim", "model_sha256"} <= set(raw)
        and names <= INDEX_FILES
        and all((directory / name).is_file() for name in names)
    )
