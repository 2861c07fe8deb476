"""Searching an index with images, shared by the command line and the server.

:class:`SearchService` pairs an index folder with the model its vectors came from (checked by
SHA-256 when loading), embeds query images, searches, and adds or removes images, persisting
every change before it returns. :meth:`SearchService.search_batch` serves many searches, each
with its own ``k`` and search parameters, with one forward pass (the server's micro-batches);
:meth:`SearchService.search_files` searches with a folder's worth of query files.

Concurrency (the server calls it from many threads): searches share a read lock, changes take
the write lock only while the in-memory index changes, so no search ever sees a half-applied
change. Changes are serialised by a writer mutex and saved (atomically, under the read lock, so
searches continue meanwhile) before the call returns: a change that was acknowledged survives a
restart. If saving fails, the in-memory index is reloaded from the folder, so memory and disk
agree again. Between processes, :func:`~retrieval.index.lock.index_lock` keeps two writers (a
server and ``retrieval index add``, say) from overwriting each other's changes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data import images
from data.datasets import BUILTIN, read_ref
from data.errors import DataError
from retrieval.errors import UserError
from retrieval.index.filters import Where, matching_ids, thaw
from retrieval.index.gallery import GalleryIndex, Hit, Item, UnknownIdError, read_manifest
from retrieval.index.lock import index_lock  # noqa: F401  re-exported: its users import it here
from retrieval.model.embed import embed_images, pick_device

logger = logging.getLogger(__name__)

#: Label given to added images when none is given.
UNLABELLED = "unlabelled"
#: Images embedded per forward pass.
EMBED_BATCH = 64
#: Images decoded at once by :meth:`SearchService.search_files`.
DECODE_THREADS = 4


@dataclass(frozen=True)
class Query:
    """One search of a batch: a preprocessed image and its own search parameters."""

    #: the image after the model's preprocessing, float ``(3, S, S)``
    image: torch.Tensor
    k: int
    nprobe: int | None = None
    ef_search: int | None = None
    #: a filter (:mod:`retrieval.index.filters`) in the hashable form of ``freeze``
    where: tuple | None = None


@dataclass(frozen=True)
class Answer:
    """The hits of one :class:`Query`, and how long its batch took (for ``Server-Timing``)."""

    hits: list[Hit]
    #: seconds of the batch's forward pass, and of the FAISS search that served this query
    embed_s: float
    search_s: float
    #: queries in the forward pass
    batch_size: int
    #: seconds this query's image took to decode, when the batch decoded it
    decode_s: float = 0.0


# ------------------------------------------------------------------------------ images


def decode_image(
    data: bytes, what: str = "the upload", draft_size: int | None = None
) -> tuple[torch.Tensor, str]:
    """Decode image bytes to a uint8 ``(3, H, W)`` RGB tensor and PIL's format name.

    The guards of :func:`data.images.decode_image` apply (decompression bombs, corrupt data);
    ``draft_size`` decodes JPEGs at a reduced scale still at least that many pixels a side.

    Raises:
        DataError: empty, not an image, corrupt or truncated, or too large.
    """
    if not data:
        raise DataError(f"{what} is empty")
    rgb, fmt = images.decode_image(io.BytesIO(data), what, draft_size)
    return images.to_tensor(rgb), fmt


def configure_threads(batched: bool) -> None:
    """Set torch's and FAISS's thread counts for a server process.

    Batched, one worker thread runs every forward pass and a second one every search: each
    gets all the cores but one, the one left to the event loop and to decoding (on 2 cores:
    one thread each; threads other than the one calling this take FAISS's count with
    :func:`apply_faiss_threads`). Unbatched, each request runs its own forward pass and
    search concurrently with the others: one thread each, so that ``n`` requests use ``n``
    cores instead of ``n x cores`` threads. Either way no parallel region waits at a barrier
    for a thread that another request's thread has pushed off its core (measured on 2 busy
    cores: a forward pass of the small CNN took ten times longer with 2 threads than with 1).
    """
    import faiss

    global _faiss_threads
    n = max(1, (os.cpu_count() or 1) - 1) if batched else 1
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    _faiss_threads = n


#: FAISS's thread count set by :func:`configure_threads` (``None``: never set).
_faiss_threads: int | None = None


def apply_faiss_threads() -> None:
    """Give the calling thread the FAISS thread count of :func:`configure_threads`. OpenMP keeps
    the count per thread: a thread that has not run a parallel torch operation (which sets it
    from torch's) would search with one OpenMP thread per core, spinning on the cores the
    forward pass needs."""
    if _faiss_threads is not None:
        import faiss

        faiss.omp_set_num_threads(_faiss_threads)


# ------------------------------------------------------------------------------ locks


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


# ------------------------------------------------------------------------------ the service


class SearchService:
    """An index folder and the model that embeds its queries; safe to share between threads.

    Args:
        index_dir: folder from ``retrieval index build``.
        model_path: checkpoint; default the one recorded in the index's manifest.
        device: where the model runs (``auto`` | ``cpu`` | ``cuda`` | ``mps``).
        mmap: memory-map the index (read-only).
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        model_path: str | os.PathLike | None = None,
        device: str = "cpu",
        mmap: bool = False,
    ):
        self.index_dir = Path(index_dir)
        from retrieval.model.resolve import resolve_for_index

        manifest = read_manifest(self.index_dir)
        # the index's model (a checkpoint or a named one) at the size the gallery was embedded
        embedder = resolve_for_index(manifest.model_path, manifest.preprocessing, model_path)
        self.embedder = embedder
        self.model = embedder.model
        self.model_path = embedder.spec
        self.transform = embedder.transform()
        self.image_size = embedder.image_size
        self.device = pick_device(device)
        self.index = GalleryIndex.load(
            self.index_dir, model_sha256=embedder.sha256, dim=embedder.dim, mmap=mmap
        )
        self._rw = ReadWriteLock()
        self._writer = threading.Lock()

    @property
    def read_only(self) -> bool:
        return self.index.read_only

    # ---------------------------------------------------------------------------- reading

    def embed(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """Embeddings ``(n, dim)`` of uint8 ``(3, H, W)`` images (any sizes)."""
        out = []
        for start in range(0, len(images), EMBED_BATCH):
            batch = torch.stack(
                [self.transform(img) for img in images[start : start + EMBED_BATCH]]
            )
            out.append(embed_images(self.model, batch, self.device))
        if not out:
            return np.zeros((0, self.index.manifest.dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def search_vectors(
        self,
        xq: np.ndarray,
        k: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
        where: Where | None = None,
    ) -> list[list[Hit]]:
        """Hits per query vector (one batched FAISS search); ``where``: only items matching
        this filter (:meth:`GalleryIndex.search`)."""
        with self._rw.read():
            d, i = self.index.search(xq, k, nprobe=nprobe, ef_search=ef_search, where=where)
            return [self.index.hits(d[q], i[q]) for q in range(len(xq))]

    def search(
        self,
        images: Sequence[torch.Tensor],
        k: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
        where: Where | None = None,
    ) -> list[list[Hit]]:
        """Hits per query image."""
        return self.search_vectors(self.embed(images), k, nprobe, ef_search, where)

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """The model's preprocessing of one uint8 ``(3, H, W)`` image: float ``(3, S, S)``."""
        return self.transform(image)

    def search_batch(self, queries: Sequence[Query]) -> list[Answer | UserError]:
        """Serve many searches with one forward pass and one FAISS call per distinct
        ``(k, nprobe, ef_search, where)``.

        Each query gets the hits :meth:`search` gives it alone: queries are grouped by their
        exact parameters rather than searched at the largest ``k`` and cut, because an HNSW
        search explores ``max(efSearch, k)`` candidates (a larger ``k`` can change the top
        results). A group whose parameters are invalid (``nprobe`` on an HNSW index, say)
        gets its :class:`~retrieval.errors.UserError` in place of answers; the other groups
        are served.
        """
        xq, embed_s = self.embed_queries(queries)
        return self.search_embedded(queries, xq, embed_s)

    def embed_queries(self, queries: Sequence[Query]) -> tuple[np.ndarray, float]:
        """The first half of :meth:`search_batch`: the queries' embeddings ``(n, dim)`` from one
        forward pass, and its duration in seconds."""
        if not queries:
            return np.zeros((0, self.index.manifest.dim), np.float32), 0.0
        t0 = time.perf_counter()
        x = torch.stack([q.image for q in queries])  # (batch, 3, S, S)
        xq = embed_images(self.model, x, self.device).astype(np.float32, copy=False)
        return xq, time.perf_counter() - t0

    def search_embedded(
        self, queries: Sequence[Query], xq: np.ndarray, embed_s: float = 0.0
    ) -> list[Answer | UserError]:
        """The second half of :meth:`search_batch`: search with the embeddings ``xq`` of
        ``queries`` (from :meth:`embed_queries`), one FAISS call per distinct parameters."""
        groups: dict[tuple, list[int]] = {}
        for pos, q in enumerate(queries):
            groups.setdefault((q.k, q.nprobe, q.ef_search, q.where), []).append(pos)
        out: list[Answer | UserError] = [None] * len(queries)  # type: ignore[list-item]
        for (k, nprobe, ef_search, where), positions in groups.items():
            t1 = time.perf_counter()
            try:
                hits = self.search_vectors(xq[positions], k, nprobe, ef_search, thaw(where))
            except UserError as exc:
                for pos in positions:
                    out[pos] = exc
                continue
            search_s = time.perf_counter() - t1
            for pos, h in zip(positions, hits, strict=True):
                out[pos] = Answer(h, embed_s, search_s, len(queries))
        return out

    def warm_up(self, batch_sizes: Sequence[int] = (1, 8)) -> None:
        """Run the model and the index once per batch size, and read one indexed image, so that
        the first real search is as fast as the tenth (lazy allocations, kernel selection, page
        faults, a built-in data set's arrays)."""
        s = self.image_size
        for n in batch_sizes:
            x = torch.zeros((n, 3, s, s), dtype=torch.uint8)
            self.search_batch([Query(self.prepare(img), 1) for img in x])
        with self._rw.read():
            first = self.index.first_id()
        if first is not None:  # "more like this" reads items: a built-in set is loaded once
            try:
                self.image(first)
            except DataError as exc:
                logger.warning("the indexed image %d cannot be read: %s", first, exc)

    def search_files(
        self,
        paths: Sequence[str],
        k: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
        read: Callable[[str], torch.Tensor] | None = None,
        where: Where | None = None,
    ) -> tuple[list[str], list[list[Hit]], list[tuple[str, str]]]:
        """Search with many query files (a folder's): decoded by :data:`DECODE_THREADS`
        threads, embedded :data:`EMBED_BATCH` at a time, searched in one FAISS call per batch.
        Unreadable files are skipped and reported, as ``index add`` does.

        Args:
            paths: query files (or references ``read`` understands).
            k, nprobe, ef_search, where: as for :meth:`search`.
            read: reads one query as a uint8 ``(3, H, W)`` tensor; default: an image file,
                JPEGs decoded at a reduced scale (as when the index was built).

        Returns:
            ``(searched, hits, skipped)``: the paths searched, their hits in the same order,
            and ``(path, reason)`` for each file skipped.
        """
        self.check_where(where)  # an unknown field or label fails before any image is read
        if read is None:

            def read(path: str) -> torch.Tensor:
                return images.read_image(path, draft_size=self.image_size)

        def load(path: str) -> torch.Tensor | DataError:
            try:
                return self.prepare(read(path))
            except DataError as exc:
                return exc

        searched: list[str] = []
        hits: list[list[Hit]] = []
        skipped: list[tuple[str, str]] = []
        with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode") as pool:
            for start in range(0, len(paths), EMBED_BATCH):
                chunk = list(paths[start : start + EMBED_BATCH])
                good, x = [], []
                for path, img in zip(chunk, pool.map(load, chunk), strict=True):
                    if isinstance(img, DataError):
                        skipped.append((path, str(img)))
                    else:
                        good.append(path)
                        x.append(img)
                if not x:
                    continue
                xq = embed_images(self.model, torch.stack(x), self.device)
                searched += good
                xq = xq.astype(np.float32, copy=False)
                hits += self.search_vectors(xq, k, nprobe, ef_search, where)
        if skipped:
            logger.warning(
                "skipped %d unreadable query file(s): %s",
                len(skipped),
                "; ".join(reason for _, reason in skipped[:5]),
            )
        return searched, hits, skipped

    def item(self, item_id: int) -> Item:
        """The item with this id.

        Raises:
            UnknownIdError: no such item.
        """
        with self._rw.read():
            it = self.index.items.get(int(item_id))
            if it is None:
                raise UnknownIdError(f"no item with id {item_id} in this index")
            return Item(it.id, it.ref, it.label, it.added)

    def label_name(self, label: int) -> str:
        with self._rw.read():
            return self.index.class_names[label]

    def image(self, item_id: int) -> torch.Tensor:
        """Pixels of an indexed item, uint8 ``(3, H, W)`` (read from its reference)."""
        return read_ref(self.item(item_id).ref)

    def image_pil(self, item_id: int, draft_size: int | None = None) -> Image.Image:
        """An indexed item as an RGB PIL image; ``draft_size``: JPEGs are decoded at a reduced
        scale still at least that many pixels a side (thumbnails of large photos)."""
        ref = self.item(item_id).ref
        if ref.startswith(BUILTIN + ":"):
            return Image.fromarray(read_ref(ref).permute(1, 2, 0).numpy())
        return images.open_image(ref, draft_size)

    def check_where(self, where: Where | None) -> None:
        """Raise the error a search with this filter would (unknown field or label)."""
        if where:
            with self._rw.read():
                matching_ids(self.index, where)

    def label_counts(self) -> dict[str, int]:
        """How many live items carry each label, by class name (labels without items left
        out)."""
        with self._rw.read():
            return self.index.label_counts()

    def stats(self) -> dict:
        with self._rw.read():
            out = self.index.describe()
            out["model_sha256"] = self.index.manifest.model_sha256
            out["model_path"] = str(self.model_path)
            out["updated"] = self.index.manifest.updated
            return out

    def __len__(self) -> int:
        return len(self.index)

    # ---------------------------------------------------------------------------- changes

    def add(
        self,
        images: Sequence[torch.Tensor],
        refs: Sequence[str],
        labels: Sequence[str],
        sha256: Sequence[str | None] | None = None,
    ) -> list[int]:
        """Embed and add images; returns their ids once the index folder is saved."""
        return self.add_vectors(self.embed(images), refs, labels, sha256)

    def add_vectors(
        self,
        xb: np.ndarray,
        refs: Sequence[str],
        labels: Sequence[str],
        sha256: Sequence[str | None] | None = None,
        fields: Sequence[dict[str, str]] | None = None,
    ) -> list[int]:
        """Add embeddings with their references, label names and (optionally) the content
        hash and user fields of each; saved before returning."""
        if not (len(xb) == len(refs) == len(labels)):
            raise ValueError("xb, refs and labels must have the same length")
        with self._writer:
            with self._rw.write():
                label_ids = [self.index.label_id(name) for name in labels]
                ids = self.index.add(xb, refs, label_ids, sha256=sha256, fields=fields)
            self._persist()
        return ids.tolist()

    def remove(self, ids: Sequence[int]) -> int:
        """Remove items by id; saved before returning.

        Raises:
            UserError: an unknown id (nothing is removed).
        """
        with self._writer:
            with self._rw.write():
                n = self.index.remove(ids)
            self._persist()
        return n

    def _persist(self) -> None:
        """Commit the change to the index folder (its journal, or a new snapshot); on failure
        reload the folder, so memory matches disk again."""
        t0 = time.perf_counter()
        try:
            with self._rw.read():
                self.index.commit(self.index_dir)
        except BaseException:
            logger.exception("saving %s failed; reloading the last saved state", self.index_dir)
            with self._rw.write():  # the store's staged change is dropped before reloading
                self.index.discard()
                reloaded = GalleryIndex.load(self.index_dir)
                self.index, old = reloaded, self.index
                old.close()
            raise
        logger.debug("saved %s in %.3f s", self.index_dir, time.perf_counter() - t0)
