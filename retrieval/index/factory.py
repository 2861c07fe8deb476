"""Index types: the ``auto`` policy, FAISS factory strings, training and search parameters.

Index types are FAISS factory strings (``Flat``, ``HNSW32``, ``IVF1024,Flat``, ``IVF1024,PQ16``,
``OPQ16,IVF1024,PQ16``, ``SQ8``, ...) or ``auto`` (:func:`choose_index_type`). They fall in three
families that differ in how ids and removal work:

- *flat codes* (``Flat``, ``SQ8``, ``PQ16``): wrapped in ``IndexIDMap2``; removal compacts;
- *IVF* (anything with an inverted file, with or without an ``OPQ`` transform): the inverted
  lists store our ids themselves, and removal deletes from them (wrapping IVF in an
  ``IndexIDMap2`` would be wrong: its ``remove_ids`` assumes the sub-index renumbers its
  entries, which IVF does not, so ids and vectors would drift apart);
- *HNSW*: the graph cannot delete nodes, so a removed id becomes a *tombstone* filtered out of
  every search with an ``IDSelector``; once tombstones exceed
  :data:`retrieval.index.gallery.HNSW_COMPACT_FRACTION` of the graph it is rebuilt.

FAISS aborts the whole process (no exception) on some factory parameters, e.g. ``HNSW0`` or
``PQ4x0``: :func:`check_index_type` refuses them before FAISS sees them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator

import faiss
import numpy as np

from retrieval.errors import UserError
from retrieval.index.manifest import DEFAULT_INDEX_TYPE, check_metric

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_INDEX_TYPE"]

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
#: Bytes FAISS stores per vector id in inverted lists and id maps.
ID_BYTES = 8

FAMILIES = ("flat", "ivf", "hnsw")

#: Numbered parts of a factory string and the least value FAISS survives (HNSW0 aborts, HNSW1
#: crashes, PQ4x0 divides by zero, NSG0 never returns); ``x`` bits of PQ/IVF-PQ codes.
_NUMBERED = re.compile(r"(HNSW|NSG|IVF|OPQ|PQ|PCAW?R?|RQ|LSH|SQ)(\d+)(?:x(\d+))?")
_LEAST = {"HNSW": 2, "NSG": 2}
#: Largest number accepted in a factory string (FAISS reads them as C ints).
_MOST = 1 << 24
#: Bits per PQ code FAISS can train.
PQ_BITS = (1, 16)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
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


def inner(index: faiss.Index) -> faiss.Index:
    """The index under an ``IndexIDMap``/``IndexIDMap2`` wrapper (or the index itself)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index)
    return index


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def check_index_type(index_type: str) -> None:
    """Refuse a factory string FAISS would accept but then abort or hang on (module docstring).

    Raises:
        UserError: ``IDMap`` in it, or a numbered part out of range (``HNSW0``, ``PQ4x0``...).
    """
    if "IDMap" in index_type:
        raise UserError(f"{index_type!r}: leave out IDMap, every index gets stable ids already")
    for match in _NUMBERED.finditer(index_type):
        name, number, bits = match.group(1), int(match.group(2)), match.group(3)
        least = _LEAST.get(name, 1)
        if not least <= number <= _MOST:
            raise UserError(
                f"index type {index_type!r}: {name}{number} is out of range ({name} takes "
                f"{least} to {_MOST:,}), e.g. HNSW32, IVF1024,Flat, PQ16"
            )
        if bits is not None and not PQ_BITS[0] <= int(bits) <= PQ_BITS[1]:
            raise UserError(
                f"index type {index_type!r}: {match.group(0)} asks for {bits}-bit codes; "
                f"use {PQ_BITS[0]} to {PQ_BITS[1]} bits (8 is usual)"
            )


def index_family(index: faiss.Index) -> str:
    """``flat`` | ``ivf`` | ``hnsw``: how ids, removal and search parameters work (see module)."""
    base = inner(index)
    if isinstance(base, faiss.IndexHNSW):
        return "hnsw"
    if ivf_of(base) is not None:
        return "ivf"
    return "flat"


def make_index(index_type: str, dim: int, metric: str) -> faiss.Index:
    """An empty FAISS index of a factory string, with ids (see the module docstring).

    Raises:
        UserError: FAISS cannot make this type for this dimension.
    """
    check_metric(metric)
    check_index_type(index_type)
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
    for part in (faiss.downcast_index(index), ivf_of(index)):
        if isinstance(part, faiss.IndexPreTransform):
            part = faiss.downcast_index(part.index)
        if part is not None and hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    if family == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        faiss.downcast_index(index).hnsw.efSearch = DEFAULT_EF_SEARCH
    elif family == "ivf":
        ivf = ivf_of(index)
        ivf.nprobe = min(DEFAULT_NPROBE, ivf.nlist)
    if family != "ivf":
        index = faiss.IndexIDMap2(index)
    return index


def faiss_search(
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
    (:meth:`retrieval.index.gallery.GalleryIndex.build_in_parts`) trains on the same sample as
    one built in one go."""
    if n <= MAX_TRAINING_VECTORS:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, MAX_TRAINING_VECTORS, replace=False))


def train(index: faiss.Index, xb: np.ndarray, seed: int) -> None:
    """Train IVF / PQ / OPQ / SQ on a seeded sample of at most MAX_TRAINING_VECTORS."""
    if index.is_trained:
        return
    ivf = ivf_of(inner(index))
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
    select: faiss.IDSelector | None = None,
) -> faiss.SearchParameters | None:
    """Per-query FAISS search parameters (nothing global is changed: safe across threads).

    Args:
        index: the index to search.
        nprobe: IVF lists visited per query (IVF indexes only), ``1 <= nprobe <= nlist``.
        ef_search: HNSW search depth (HNSW indexes only), ``>= 1``.
        exclude: ids never to return (tombstones).
        select: only ids this selector accepts are returned (a filter,
            :func:`retrieval.index.filters.id_selector`); with ``exclude``, both apply.

    Raises:
        UserError: a parameter that does not apply to this index type, or out of range.
    """
    family = index_family(index)
    if nprobe is not None and family != "ivf":
        raise UserError(f"nprobe applies to IVF indexes; this one is {family}")
    if ef_search is not None and family != "hnsw":
        raise UserError(f"efSearch applies to HNSW indexes; this one is {family}")
    sel = select
    if exclude is not None and len(exclude):
        sel_not = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(exclude, dtype=np.int64)))
        sel = sel_not if sel is None else faiss.IDSelectorAnd(sel, sel_not)
    if family == "hnsw":
        if ef_search is not None and ef_search < 1:
            raise UserError(f"efSearch must be at least 1, got {ef_search}")
        if ef_search is None and sel is None:
            return None
        stored = inner(index).hnsw.efSearch
        params = faiss.SearchParametersHNSW(efSearch=ef_search or stored)
        if sel is not None:
            params.sel = sel
        return params
    if family == "ivf":
        if nprobe is None and sel is None:
            return None
        ivf = ivf_of(index)
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


def rebuild_hnsw(
    index: faiss.Index, removed: Iterable[int], index_type: str, metric: str
) -> faiss.Index:
    """A new HNSW index (of ``index_type``, same search depth) holding the vectors of ``index``
    except the ``removed`` ids: HNSW cannot delete nodes, so removed ids are tombstones until
    the graph is rebuilt."""
    old = faiss.downcast_index(index)
    all_ids = faiss.vector_to_array(old.id_map).astype(np.int64)
    vectors = inner(old).reconstruct_n(0, old.ntotal)
    gone = np.fromiter(removed, dtype=np.int64)
    keep = ~np.isin(all_ids, gone)
    new = make_index(index_type, old.d, metric)
    inner(new).hnsw.efSearch = inner(old).hnsw.efSearch
    if keep.any():
        train(new, vectors[keep], seed=0)
        new.add_with_ids(np.ascontiguousarray(vectors[keep]), all_ids[keep])
    logger.info("rebuilt the HNSW graph without %d removed items", len(gone))
    return new
