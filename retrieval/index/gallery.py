"""The gallery index: FAISS vectors with stable ids, their metadata, a manifest and a journal.

:class:`GalleryIndex` is the map; each idea it uses has its own module in this package:

- :mod:`retrieval.index.knn`: exact k-nearest-neighbour search (also used by the evaluation);
- :mod:`retrieval.index.factory`: index types (FAISS factory strings, ``auto``), their families,
  training and search parameters;
- :mod:`retrieval.index.manifest`: the folder's files and its manifest;
- :mod:`retrieval.index.store`: the items' metadata (SQLite), looked up by id and filtered in
  SQL, never read whole;
- :mod:`retrieval.index.journal`: the write-ahead journal of additions and removals;
- :mod:`retrieval.index.lock`: the writer lock between processes;
- :mod:`retrieval.index.shards`: building an index from the shards of ``retrieval embed``.

Loading verifies the checksums, cross-checks the manifest against the FAISS file (metric,
dimension, count), and — when given the model the caller will embed queries with — refuses an
index built with another model or dimension: mixing embedding spaces gives meaningless results
silently, so it is an error.

A gallery too large to embed or hold at once is built from parts (:class:`GalleryPart`, e.g. the
shards of ``retrieval embed --shards``) with :meth:`GalleryIndex.build_in_parts`: one training
sample, then for IVF one index per part sharing the trained coarse quantizer, whose inverted
lists are merged — in memory, or with ``on_disk`` into ``index.ivfdata`` (FAISS's
``merge_ondisk``), one part in memory at a time; FAISS then memory-maps the lists
(``OnDiskInvertedLists``), so neither building nor searching holds them in memory.

Scores (:meth:`GalleryIndex.search`, :class:`Hit`): for ``cosine`` the inner product of unit
vectors (higher is closer); for ``l2`` the Euclidean distance (lower is closer). Approximate
index types return approximate scores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retrieval.atomic import real_path
from retrieval.errors import UserError
from retrieval.index import journal as wal
from retrieval.index.factory import (
    DEFAULT_INDEX_TYPE,
    DEFAULT_MEMORY_BUDGET,
    choose_index_type,
    faiss_search,
    index_family,
    inner,
    ivf_of,
    nlist_for,
    parse_memory,
    rebuild_hnsw,
    search_parameters,
)
from retrieval.index.filters import Where, id_selector, matching_ids
from retrieval.index.knn import (
    as_faiss,
    blas_blocks,
    knn,
    knn_leave_one_out,
    normalize,
    user_scores,
)
from retrieval.index.lock import may_write
from retrieval.index.manifest import (
    INDEX_FILE,
    IVFDATA_FILE,
    JOURNAL_FILE,
    METRICS,
    STORE_FILE,
    Manifest,
    is_index_folder,
    read_manifest,
)
from retrieval.index.snapshot import (
    Item,
    Snapshot,
    migrate_folder,
    read_snapshot,
    write_snapshot,
)
from retrieval.index.store import MetadataStore, Record

logger = logging.getLogger(__name__)

#: Names other modules import from here; each lives in the module named above.
__all__ = [
    "DEFAULT_INDEX_TYPE",
    "DEFAULT_MEMORY_BUDGET",
    "INDEX_FILE",
    "JOURNAL_FILE",
    "METRICS",
    "GalleryIndex",
    "GalleryPart",
    "Hit",
    "Item",
    "Manifest",
    "ReadOnlyIndexError",
    "UnknownIdError",
    "choose_index_type",
    "is_index_folder",
    "knn",
    "knn_leave_one_out",
    "nlist_for",
    "normalize",
    "parse_memory",
    "read_manifest",
]

#: HNSW is rebuilt once removed-but-still-in-the-graph items exceed this fraction of it.
HNSW_COMPACT_FRACTION = 0.25
#: A filter keeping at most this fraction of an HNSW graph's vectors is searched exactly, by a
#: scan of the graph's stored vectors restricted to the matching ones (an ``IDSelector`` on
#: the storage index), rather than by the graph: a graph walk finds few of so rare nodes
#: (recall@10 0.50 at efSearch 256 for 1 %, 0.98 for 3 %; docs/search.md) while the restricted
#: scan is exact and about as fast.
HNSW_EXACT_FILTER_FRACTION = 0.03


def _scannable(storage: faiss.Index) -> bool:
    """Whether an HNSW graph's storage can be searched with an ``IDSelector`` (flat and
    scalar-quantized vectors can; FAISS refuses search parameters for PQ storage)."""
    return isinstance(faiss.downcast_index(storage), faiss.IndexFlat | faiss.IndexScalarQuantizer)


class UnknownIdError(UserError):
    """An id that is not (or no longer) in the index."""


class ReadOnlyIndexError(UserError):
    """A change asked of an index opened memory-mapped, or in a folder that cannot be written."""


@dataclass
class GalleryPart:
    """A contiguous slice of a gallery, e.g. one rank's shard of ``retrieval embed --shards``.

    Args:
        xb: vectors ``(n, dim)``; may be memory-mapped (``np.load(..., mmap_mode="r")``).
        refs: a reference per vector.
        labels: a label (index into the class names) per vector, ``(n,)``.
        sha256: the content hash of each item's file (None where there is no file), or None.
        fields: the user fields of each item (a mapping of name to value), or None.
    """

    xb: np.ndarray
    refs: Sequence[str]
    labels: np.ndarray
    sha256: Sequence[str | None] | None = None
    fields: Sequence[dict[str, str]] | None = None


@dataclass
class Hit:
    """One search result."""

    rank: int
    id: int
    score: float
    label: str
    ref: str


class ItemsView(Mapping[int, Item]):
    """The live items of a :class:`GalleryIndex` as a read-only mapping ``id -> Item``, read
    from its store on demand: ``id in items`` and ``items[id]`` look one row up; iterating
    (``values()``, ``list(items)``) reads every row, for exports and maintenance."""

    def __init__(self, owner: GalleryIndex):
        self._owner = owner

    def __getitem__(self, item_id: int) -> Item:
        try:
            (record,) = self._owner.store.get([int(item_id)])
        except (ValueError, TypeError):
            raise KeyError(item_id) from None
        return self._owner._item(record.id, record.ref, record.label, record.added)

    def __contains__(self, item_id: object) -> bool:
        try:
            return bool(self._owner.store.live([int(item_id)]))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return False

    def __iter__(self) -> Iterator[int]:
        return (row[0] for row in self._owner.store.scan())

    def __len__(self) -> int:
        return len(self._owner)

    def values(self) -> list[Item]:  # type: ignore[override]
        return [self._owner._item(*row) for row in self._owner.store.scan()]

    def items(self) -> list[tuple[int, Item]]:  # type: ignore[override]
        return [(it.id, it) for it in self.values()]


class GalleryIndex:
    """A FAISS index of gallery embeddings with stable ids and each item's metadata.

    Not thread-safe by itself: :class:`retrieval.serving.service.SearchService` adds the locking.

    The metadata lives in a :class:`~retrieval.index.store.MetadataStore`: the folder's
    ``metadata.sqlite`` once loaded or saved, a private in-memory one for an index just built.
    Changes are staged in the store's open transaction and committed with the journal
    (:meth:`commit`); until then :meth:`discard` forgets them.

    Args:
        index: a FAISS index whose ids are item ids (see :func:`make_index`).
        store: the items' metadata; None for a new, empty in-memory store.
        class_names: name of each label.
        manifest: see :class:`Manifest`.
        next_id: the id the next added item gets (ids are never reused).
        tombstones: removed ids still in an HNSW graph.
        read_only: memory-mapped indexes cannot change.
        count: live items in the store (counted when not given).
    """

    def __init__(
        self,
        index: faiss.Index,
        store: MetadataStore | None,
        class_names: Sequence[str],
        manifest: Manifest,
        next_id: int | None = None,
        tombstones: Iterable[int] = (),
        read_only: bool = False,
        count: int | None = None,
    ):
        self.index = index
        self._store: MetadataStore | None = MetadataStore(None) if store is None else store
        self._store_path: Path | None = None  # the store to open on first use (see save)
        self._store_guard = threading.Lock()
        self.class_names = list(class_names)
        self.manifest = manifest
        if count is None or next_id is None:
            ids = [row[0] for row in self.store.scan()]
            count = len(ids) if count is None else count
            next_id = max(ids, default=-1) + 1 if next_id is None else next_id
        self._count = count
        self.next_id = next_id
        self.tombstones: set[int] = set(tombstones)
        self.read_only = read_only
        self.family = index_family(index)
        #: ``index.ivfdata`` of an on-disk index (its inverted lists), else None.
        self.lists_file: Path | None = None
        self._pending: list[dict] = []  # journal entries of changes not yet committed
        self._folder: Path | None = None  # the folder this index was loaded from / saved to
        self._journal_bytes = 0  # length of that folder's journal up to its last good line
        self._label_counts: dict[str, int] | None = None  # see label_counts()
        self._numbers: dict[str, int] = {}  # class name -> label number

    def __len__(self) -> int:
        return self._count

    @property
    def store(self) -> MetadataStore:
        """The items' metadata; after :meth:`save`, the new folder's store, opened on first
        use (so a folder just written holds only its snapshot's files)."""
        if self._store is None:
            with self._store_guard:
                if self._store is None:
                    opened = MetadataStore(self._store_path)
                    opened.view = self._journal_bytes
                    self._store = opened
        return self._store

    @store.setter
    def store(self, store: MetadataStore) -> None:
        self._store = store

    @property
    def items(self) -> ItemsView:
        """The live items, ``id -> Item``, looked up in the store (:class:`ItemsView`)."""
        return ItemsView(self)

    def _item(self, item_id: int, ref: str, label: str, added: float) -> Item:
        return Item(int(item_id), ref, self._label_number(label), float(added))

    def _label_number(self, name: str) -> int:
        number = self._numbers.get(name)
        if number is None:
            self._numbers = {n: i for i, n in enumerate(self.class_names)}
            number = self._numbers[name]
        return number

    @property
    def ids(self) -> np.ndarray:
        """Ids ``(n,)`` of the live items, ascending (reads every row)."""
        return np.fromiter((row[0] for row in self.store.scan()), dtype=np.int64)

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, labels)`` of the live items as arrays ``(n,)``, by id (reads every row;
        filters use SQL instead: :meth:`matching_ids`)."""
        rows = list(self.store.scan())
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        return ids, np.array([self._label_number(r[2]) for r in rows], dtype=np.int64)

    @property
    def refs(self) -> list[str]:
        return [row[1] for row in self.store.scan()]

    @property
    def labels(self) -> np.ndarray:
        return self.columns()[1]

    def first_id(self) -> int | None:
        """The smallest live id (None for an empty index), without reading every row."""
        return self.store.first_id()

    def label_counts(self) -> dict[str, int]:
        """Live items per class name, in class order, labels without items left out: counted
        by SQL once, then kept up to date by :meth:`add_prepared` and :meth:`remove`."""
        if self._label_counts is None:
            self._label_counts = self.store.label_counts()
        counts = self._label_counts
        return {name: counts[name] for name in self.class_names if counts.get(name)}

    def matching_ids(self, where: Mapping[str, object]) -> np.ndarray:
        """Sorted ids of the live items matching a checked filter (SQL, by the store's
        indexes; see :func:`retrieval.index.filters.matching_ids`)."""
        return self.store.matching_ids(where)

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
        sha256: Sequence[str | None] | None = None,
        fields: Sequence[dict[str, str]] | None = None,
    ) -> GalleryIndex:
        """Index the vectors ``xb`` ``(n, dim)``; item ids are ``0 .. n-1``.

        Args:
            sha256: the content hash of each item's file
                (:func:`retrieval.atomic.content_hashes`), or None.
            fields: the user fields of each item, or None.
            index_type: a FAISS factory string or ``auto`` (:func:`choose_index_type`).
            memory_budget: bytes the index may use, for ``auto``.
            seed: of the training sample.
            on_disk: work folder for IVF lists kept on disk (see :meth:`build_in_parts`).
        """
        return cls.build_in_parts(
            [GalleryPart(np.asarray(xb), refs, labels, sha256, fields)],
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
        sample :meth:`build` would draw (:func:`~retrieval.index.factory.training_positions`,
        gathered from the parts).
        For IVF types every part is then added to its own copy of the trained index — the parts
        share one coarse quantizer — and its inverted lists are appended to the result's
        (``IndexIVF.merge_from``), so the lists hold the same entries in the same order as an
        index built in one go, and search returns the same results. Other types add the parts
        to one index. Vectors are read :data:`~retrieval.index.build.ADD_BLOCK` at a time:
        besides the index itself, memory holds one block and the training sample, never the
        whole gallery.

        With ``on_disk`` (a work folder; IVF types only) the index itself stays out of memory
        too: each part's index is written to the folder, then their lists are merged into
        ``index.ivfdata`` there (``faiss.contrib.ondisk.merge_ondisk``), which :meth:`save`
        moves into the index folder. Such an index is read-only: rebuild it to change it.

        Raises:
            UserError: no vectors, parts of different dimensions, or ``on_disk`` for a type
                without inverted lists.
        """
        from retrieval.index.build import build_in_parts  # it builds instances of this class

        return build_in_parts(
            cls,
            parts,
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

    # ---------------------------------------------------------------------------- changes

    def label_id(self, name: str) -> int:
        """The label number of a class name, adding the class when it is new."""
        if name not in self.class_names:
            self.class_names.append(name)
        return self.class_names.index(name)

    def add(
        self,
        xb: np.ndarray,
        refs: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        sha256: Sequence[str | None] | None = None,
        fields: Sequence[dict[str, str]] | None = None,
    ) -> np.ndarray:
        """Add vectors ``(n, dim)`` with their references and labels (and, optionally, the
        content hash and user fields of each); returns their new ids. The change is staged:
        :meth:`commit` makes it durable."""
        self._check_writable()
        xb = as_faiss(xb)
        if xb.shape[1] != self.manifest.dim:
            raise UserError(f"vectors have dimension {xb.shape[1]}, the index {self.manifest.dim}")
        if not (len(xb) == len(refs) == len(labels)):
            raise ValueError("xb, refs and labels must have the same length")
        for extra in (sha256, fields):
            if extra is not None and len(extra) != len(xb):
                raise ValueError("sha256 and fields must have one entry per vector")
        if self.manifest.metric == "cosine":
            xb = normalize(xb)
        added = time.time()
        ids = self.add_prepared(xb, refs, labels, added=added, sha256=sha256, fields=fields)
        names = [self.class_names[int(y)] for y in labels]
        self._pending.append(wal.add_entry(ids, refs, names, added, xb, sha256, fields))
        return ids

    def add_prepared(
        self,
        xb: np.ndarray,
        refs: Sequence[str],
        labels,
        into: faiss.Index | None = None,
        added: float | None = None,
        sha256: Sequence[str | None] | None = None,
        fields: Sequence[dict[str, str]] | None = None,
        record: bool = True,
    ) -> np.ndarray:
        """Add vectors already prepared for the metric (unit-norm for cosine) under new ids, to
        ``into`` (default: this index), without a journal entry (building, replaying); with
        ``record`` their rows are staged in the store (replaying a change the store has
        already applied passes False)."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)})")
        ids = np.arange(self.next_id, self.next_id + len(xb), dtype=np.int64)
        (self.index if into is None else into).add_with_ids(xb, ids)
        names = [self.class_names[int(y)] for y in labels]
        if record:
            now = time.time() if added is None else added
            hashes = [None] * len(ids) if sha256 is None else list(sha256)
            extra = [{}] * len(ids) if fields is None else list(fields)
            self.store.stage_add(
                [
                    Record(int(i), str(r), name, now, h, dict(f))
                    for i, r, name, h, f in zip(ids, refs, names, hashes, extra, strict=True)
                ]
            )
        if self._label_counts is not None:
            for name in names:
                self._label_counts[name] = self._label_counts.get(name, 0) + 1
        self._count += len(ids)
        self.next_id += len(xb)
        return ids

    def remove(self, ids: Iterable[int], record: bool = True) -> int:
        """Remove items by id; returns how many were removed. The change is staged:
        :meth:`commit` makes it durable (``record``: as for :meth:`add_prepared`).

        Raises:
            UserError: an id that is not in the index (nothing is removed then).
        """
        self._check_writable()
        ids = sorted({int(i) for i in ids})
        live = self.store.live(ids)
        unknown = [i for i in ids if i not in live]
        if unknown:
            shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise UnknownIdError(f"no item with id {shown} in this index")
        if not ids:
            return 0
        if self._label_counts is not None:
            for rec in self.store.get(ids):
                self._label_counts[rec.label] -= 1
        if self.family == "hnsw":
            self.tombstones.update(ids)
        else:
            removed = self.index.remove_ids(faiss.IDSelectorBatch(np.array(ids, dtype=np.int64)))
            if removed != len(ids):
                raise RuntimeError(f"FAISS removed {removed} vectors instead of {len(ids)}")
        if record:
            self.store.stage_remove(ids)
        self._count -= len(ids)
        if self.family == "hnsw" and len(self.tombstones) > HNSW_COMPACT_FRACTION * max(
            1, self.index.ntotal
        ):
            self.index = rebuild_hnsw(
                self.index, self.tombstones, self.manifest.index_type, self.manifest.metric
            )
            self.tombstones.clear()
        self._pending.append({"op": "remove", "ids": ids})
        return len(ids)

    # ---------------------------------------------------------------------------- journal

    def commit(self, directory: str | os.PathLike) -> None:
        """Make the folder ``directory`` hold this index, durably.

        When the folder is the one this index was loaded from or last saved to, the changes
        since then are appended to its journal (fsync'd), then committed in its store with
        the journal's new length in the same transaction — milliseconds, whatever the index
        size; otherwise, or once the journal has grown past
        :data:`~retrieval.index.journal.JOURNAL_COMPACT_FRACTION` of
        ``index.faiss``, the whole folder is written anew (:meth:`save`).
        """
        directory = Path(directory)
        journal = directory / JOURNAL_FILE
        appendable = (
            self._folder is not None
            and self._folder == real_path(directory)
            and (directory / INDEX_FILE).is_file()
            and (self._store is None or self._store.path is not None)
        )
        if appendable:
            limit = max(
                wal.JOURNAL_MIN_BYTES,
                wal.JOURNAL_COMPACT_FRACTION * (directory / INDEX_FILE).stat().st_size,
            )
            appendable = self._journal_bytes <= limit
        if not appendable:
            self.save(directory)
            return
        if not self._pending:
            return
        ends = wal.append_entries(journal, self._pending, self._journal_bytes)
        self._journal_bytes = ends[-1]
        self.store.commit(list(zip(self._pending, ends, strict=True)), ends[-1])  # sets view
        self._pending.clear()

    def discard(self) -> None:
        """Forget the store's staged changes (those not committed). The FAISS index keeps
        them: reload the folder to continue."""
        self.store.discard()
        self._pending.clear()

    def close(self) -> None:
        """Close the store (staged changes are discarded)."""
        if self._store is not None:
            self._store.close()

    def _replay(self, journal: Path, may_write: bool, fresh: bool = False) -> int:
        """Apply the journal's changes to the FAISS index, and those the store has not
        applied yet to the store too when ``may_write`` (else stop where the store is: the
        writer holding the folder will); returns the journal position reached, in bytes.
        ``fresh``: the store was just made from ``metadata.json`` (it follows the journal
        from its start, as expected, not after a writer stopped)."""
        entries, ends = wal.read_journal_ends(journal)
        applied = self.store.applied
        may_write = may_write or self.store.path is None  # a private store follows the journal
        if may_write and applied != (ends[-1] if ends else 0):
            # decided inside the store's write transaction: a writer may be committing these
            # very lines now (its transaction is waited for), or may have appended more
            applied = self.store.begin_catch_up()
            entries, ends = wal.read_journal_ends(journal)
            good = ends[-1] if ends else 0
            if applied > good:  # the journal was cut short (repair)
                logger.warning(
                    "%s: the store reflected %d bytes of the journal, which now has %d; "
                    "rolled it back to match",
                    journal,
                    applied,
                    good,
                )
                self.store.rollback_to(good)
                applied = good
            elif applied == good:
                self.store.discard()
        caught: list[tuple[dict, int]] = []
        position = 0
        for n, (entry, end) in enumerate(zip(entries, ends, strict=True), start=1):
            if end > applied and not may_write:
                break
            self.store.view = position  # the state before this line
            record = end > applied
            self._apply(entry, journal, n, record=record)
            if record:
                caught.append((entry, end))
            position = end
        if caught:  # in one transaction with the journal position
            self.store.commit(caught, position)
        if caught and (fresh or self.store.path is None):
            logger.info("%s: %d change(s) applied to the metadata", journal, len(caught))
        elif caught:
            logger.warning(
                "%s: applied %d change(s) the metadata store lacked (a writer stopped between "
                "the journal and the store)",
                journal,
                len(caught),
            )
        self.store.view = position
        self._pending.clear()
        return position

    def _apply(self, entry: dict, journal: Path, line: int, record: bool) -> None:
        try:
            if entry["op"] == "add":
                xb = wal.entry_vectors(entry, self.manifest.dim)
                labels = [self.label_id(name) for name in entry["labels"]]
                ids = self.add_prepared(
                    xb,
                    entry["refs"],
                    labels,
                    added=float(entry["added"]),
                    sha256=entry.get("sha256"),
                    fields=entry.get("fields"),
                    record=record,
                )
                ok = ids.tolist() == entry["ids"]
            elif entry["op"] == "remove":
                ok = self.remove(entry["ids"], record=record) == len(entry["ids"])
            else:
                ok = False
        except (KeyError, TypeError, ValueError, UserError, RuntimeError):
            ok = False
        if not ok:
            raise UserError(
                f"{journal}, line {line} does not fit the index (a journal of "
                "another index?); rebuild the index"
            )

    def set_search_defaults(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the search parameters stored in the index (used when a query gives none)."""
        if nprobe is not None or ef_search is not None:
            search_parameters(self.index, nprobe, ef_search)  # validates both
        if nprobe is not None:
            ivf_of(self.index).nprobe = nprobe
        if ef_search is not None:
            inner(self.index).hnsw.efSearch = ef_search

    @property
    def read_only_reason(self) -> str:
        """Why images cannot be added or removed ('' when they can)."""
        if self.lists_file is not None:
            return (
                "this index keeps its inverted lists on disk (built with --on-disk) and is "
                "read-only; rebuild it to add or remove images"
            )
        folder = self._folder
        if self.read_only and folder is not None and not os.access(folder, os.W_OK):
            return (
                f"{folder} cannot be written here (a read-only mount?); copy the index to a "
                "folder you can write to add or remove images"
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
        where: Where | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(D, I)`` ``(nq, k')`` of the best items per query, ``k' = min(k, m)`` for the ``m``
        items searched (all, or those matching ``where``); ``I`` holds item ids (-1 = none).

        Args:
            xq: query vectors ``(nq, dim)``; a batch is searched in one call.
            k: results per query.
            nprobe, ef_search: per-query search parameters (:func:`search_parameters`).
            where: only items matching this filter (:mod:`retrieval.index.filters`, e.g.
                ``{"label": "Sneaker"}``) are searched: FAISS visits only their ids (an
                ``IDSelector``). Flat and IVF with ``nprobe = nlist`` then return exactly the
                brute-force neighbours among them; HNSW explores the whole graph but keeps
                only them, so a filter matching a small share of the gallery needs a larger
                ``ef_search`` for the same recall — and one matching at most
                :data:`HNSW_EXACT_FILTER_FRACTION` of the graph is searched exactly instead
                (:meth:`_search_hnsw_storage`).

        Raises:
            UserError: bad ``k``, dimension or search parameter; an unknown filter field or
                label.
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
        select, searched = None, len(self)
        if where:
            allowed = matching_ids(self, where)  # live items only: tombstones are excluded too
            select, searched = id_selector(allowed, self.next_id), len(allowed)
            exclude = None
        else:
            exclude = np.fromiter(self.tombstones, dtype=np.int64) if self.tombstones else None
        params = search_parameters(self.index, nprobe, ef_search, exclude, select)
        k = min(k, searched)
        if k == 0:
            return np.zeros((len(xq), 0), np.float32), np.zeros((len(xq), 0), np.int64)
        if (
            where
            and self.family == "hnsw"
            and searched <= HNSW_EXACT_FILTER_FRACTION * self.index.ntotal
            and _scannable(inner(self.index).storage)
        ):
            d, i = self._search_hnsw_storage(xq, k, allowed)
            return user_scores(d, self.manifest.metric), i
        with blas_blocks():
            d, i = faiss_search(self.index, xq, k, params)
        return user_scores(d, self.manifest.metric), i

    def _search_hnsw_storage(
        self, xq: np.ndarray, k: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of the HNSW graph's stored vectors (FAISS distances, our ids),
        restricted to the ids ``allowed`` by an ``IDSelector`` on their positions."""
        positions_to_ids = faiss.vector_to_array(faiss.downcast_index(self.index).id_map)
        wanted = np.zeros(self.next_id, dtype=bool)
        wanted[allowed] = True
        positions = np.flatnonzero(wanted[positions_to_ids])
        storage = faiss.downcast_index(inner(self.index).storage)
        params = faiss.SearchParameters(sel=id_selector(positions, len(positions_to_ids)))
        d, pos = faiss_search(storage, xq, k, params)
        return d, np.where(pos >= 0, positions_to_ids[np.maximum(pos, 0)], -1)

    def hits(self, d_row: np.ndarray, i_row: np.ndarray) -> list[Hit]:
        """Turn one row of :meth:`search` output into :class:`Hit` records (ranks from 1); the
        rows of the hits are looked up in the store in one query."""
        found = {rec.id: rec for rec in self.store.get(int(i) for i in i_row if i >= 0)}
        out = []
        for score, item in zip(d_row, i_row, strict=True):
            if item < 0:
                continue
            rec = found.get(int(item))
            if rec is None:
                raise RuntimeError(f"the FAISS index returned id {item}, unknown to the metadata")
            out.append(Hit(len(out) + 1, rec.id, float(score), rec.label, rec.ref))
        return out

    def describe(self) -> dict:
        """What the index holds, for ``index info`` and the server's ``/stats``."""
        base = inner(self.index)
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
            out["ef_search"] = int(base.hnsw.efSearch)
            out["removed_pending_rebuild"] = len(self.tombstones)
        if self.family == "ivf":
            ivf = ivf_of(self.index)
            out["nlist"], out["nprobe"] = int(ivf.nlist), int(ivf.nprobe)
        return out

    # ---------------------------------------------------------------------------------- disk

    def save(self, directory: str | os.PathLike) -> None:
        """Write the index folder atomically: the old folder stays whole until the new one is
        complete. The store is copied by SQLite's backup API, with the staged changes; this
        index then uses the new folder's store.

        Raises:
            UserError: ``directory`` is a file, or a folder that is not an index folder
                (:func:`is_index_folder`); it is left untouched.
        """
        directory = real_path(directory)  # through a link: the folder itself is replaced
        snap = Snapshot(
            self.index,
            self.store,
            self.class_names,
            self.manifest,
            self.next_id,
            sorted(self.tombstones),
            self._count,
            self.lists_file,
        )
        write_snapshot(directory, snap, list(self._pending) if self.store.staging else [])
        if self.lists_file is not None:
            self.lists_file = directory / IVFDATA_FILE
        old, self._store, self._store_path = self.store, None, directory / STORE_FILE
        old.close()  # its staged changes are in the new folder now
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

        Only the manifest, the FAISS file and the store's snapshot record are read: items are
        looked up in the store when needed. When this process holds the folder's writer lock
        or can take it, a store behind the journal (a writer killed between the two) catches
        up, and a folder of format 2 is migrated to the store; otherwise (another process is
        writing it) the index is read as of the store's position.

        Args:
            mmap: memory-map the FAISS file instead of reading it (``IO_FLAG_MMAP``): the
                vectors stay on disk and are paged in on demand, for indexes larger than
                memory. The index is then read-only and nothing in the folder is written
                (so it is when this process cannot write the folder).

        Raises:
            UserError: not an index folder, damaged files, or built with another model.
        """
        directory = Path(directory)
        snap = read_snapshot(directory, model_sha256, dim, mmap)
        unwritable = not os.access(directory, os.W_OK)  # e.g. a read-only mount
        out = cls(
            snap.index,
            snap.store,
            snap.class_names,
            snap.manifest,
            snap.next_id,
            snap.tombstones,
            read_only=mmap or unwritable or snap.lists_file is not None,
            count=snap.count,
        )
        out.lists_file = snap.lists_file
        journal = directory / JOURNAL_FILE
        pending = journal.is_file() and journal.stat().st_size > 0
        if pending and mmap:
            out.close()
            raise UserError(
                f"{directory} has changes in {JOURNAL_FILE} not yet in {INDEX_FILE}; "
                f"run `retrieval index compact {directory}` before opening it memory-mapped"
            )
        # the writer lock is needed (and taken) only when there is something to write
        behind = pending and journal.stat().st_size != out.store.applied
        needs_writing = not (mmap or unwritable) and (snap.legacy or behind)
        try:
            with may_write(directory) if needs_writing else _no_writing() as writable:
                if snap.legacy and writable:
                    out.store = migrate_folder(directory, snap)
                    snap.store.close()
                    logger.info("%s: moved metadata.json into %s", directory, STORE_FILE)
                if pending:
                    out._journal_bytes = out._replay(journal, writable, fresh=snap.legacy)
        except (RuntimeError, KeyError, TypeError, ValueError, sqlite3.DatabaseError) as exc:
            out.close()
            raise UserError(
                f"{directory} is damaged ({str(exc)[:200]}); rebuild the index"
            ) from None
        except BaseException:
            out.close()
            raise
        out._folder = real_path(directory)
        if out.index.ntotal != len(out) + len(out.tombstones):
            out.close()
            raise UserError(
                f"{directory} is damaged: the FAISS index holds {out.index.ntotal} vectors, "
                f"the metadata {len(out)} items; rebuild the index"
            )
        return out


@contextlib.contextmanager
def _no_writing() -> Iterator[bool]:
    yield False
