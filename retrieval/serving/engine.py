"""What the server's endpoints share: the search service (possibly still loading), the
micro-batcher that serves searches, the bound on concurrent decodes and the thumbnail cache.

The micro-batcher runs in two stages (:mod:`retrieval.serving.batching`): the first decodes the
uploads a batch carries (:class:`Upload`; a bad one fails alone) and runs one forward pass, the
second searches the index, so that consecutive batches overlap on two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING

from fastapi import HTTPException

from data.errors import DataError
from retrieval.errors import UserError
from retrieval.serving.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT, MicroBatcher
from retrieval.serving.thumbnails import DEFAULT_CACHE_BYTES, ByteLRU

if TYPE_CHECKING:
    from retrieval.serving.service import Answer, SearchService

#: Decodes (uploads, thumbnails) running at once; each may hold a large image in memory.
DEFAULT_MAX_DECODES = max(2, os.cpu_count() or 1)
#: Uploads up to this size are decoded by the batch's worker thread, with the rest of its batch;
#: larger ones (photos, whose decode takes milliseconds) in a thread of their own first, so that
#: they do not hold up the searches they are batched with. Bytes.
WORKER_DECODE_BYTES = 64 * 1024
#: ... and up to this many pixels: a few kilobytes of lossless WebP or PNG can hold 8000 x 8000
#: pixels, seconds of decoding that would stall every search of the batch.
WORKER_DECODE_PIXELS = 1024 * 1024

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Upload:
    """A search whose image is still encoded: the batch's worker decodes it (see
    :meth:`Engine.search_upload`)."""

    data: bytes
    #: how error messages name the image ("the upload q.png")
    what: str
    k: int
    nprobe: int | None = None
    ef_search: int | None = None
    #: a filter in the hashable form of :func:`retrieval.index.filters.freeze`
    where: tuple | None = None


@dataclasses.dataclass
class _Embedded:
    """A batch between the micro-batcher's two stages: its items, the answers (or errors)
    known so far, and the queries embedded (their positions in the batch, their decode
    times, their embeddings ``xq`` and the forward pass's duration)."""

    items: list
    out: list
    queries: list = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)
    decode_s: list[float] = dataclasses.field(default_factory=list)
    xq: object = None
    embed_s: float = 0.0


class Engine:
    """What the endpoints share: the service (possibly still loading), the micro-batcher, the
    bound on concurrent decodes and the thumbnail cache.

    Args:
        service: the service, or a future of it (the server answers 503 until it is done).
        max_batch: most searches per forward pass; 1 runs each search alone, in its request
            thread.
        max_wait: seconds a search waits for others to join its batch.
        max_decodes: decodes running at once.
        cache_bytes: bytes of encoded images kept by the thumbnail cache.
    """

    def __init__(
        self,
        service: SearchService | Future,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait: float = DEFAULT_MAX_WAIT,
        max_decodes: int = DEFAULT_MAX_DECODES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        if max_batch < 1 or max_decodes < 1:
            raise UserError("the batch size and the number of decodes must be at least 1")
        if isinstance(service, Future):
            self._future = service
        else:
            self._future = Future()
            self._future.set_result(service)
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.decodes = threading.BoundedSemaphore(max_decodes)
        self.thumbnails = ByteLRU(cache_bytes)
        self._batcher: MicroBatcher | None = None
        self._lock = threading.Lock()

    @property
    def loading(self) -> bool:
        return not self._future.done()

    @property
    def ready(self) -> bool:
        """Loaded, and without error: searches can be served."""
        return self._future.done() and self._future.exception() is None

    @property
    def service(self) -> SearchService:
        """The loaded service; 503 while it loads."""
        if not self._future.done():
            raise HTTPException(
                503,
                "the index and model are still loading; try again in a moment",
                headers={"Retry-After": "1"},
            )
        exc = self._future.exception()
        if exc is not None:
            raise HTTPException(503, f"the index could not be loaded: {exc}")
        return self._future.result()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce a search being prepared (decoded) inside this block: the batch being
        collected waits for it, at most ``max_wait``."""
        batcher = self._get_batcher()
        with batcher.arriving() if batcher is not None else contextlib.nullcontext():
            yield

    def submit(self, queries: list) -> list[Future]:
        """Futures of the answers (or errors) of :class:`~retrieval.serving.service.Query`
        objects: queued for the micro-batcher, or, unbatched, answered here and now."""
        batcher = self._get_batcher()
        if batcher is not None:
            return [batcher.submit(q) for q in queries]
        out = []
        for q in queries:
            fut: Future = Future()
            fut.set_result(self.service.search_batch([q])[0])
            out.append(fut)
        return out

    @staticmethod
    def results(futures: list[Future]) -> list[Answer | BaseException]:
        """Wait for :meth:`submit`'s futures: each answer, or the exception in its place."""
        out: list[Answer | BaseException] = []
        for fut in futures:
            try:
                out.append(fut.result())
            except Exception as exc:  # noqa: BLE001 - returned in place of the answer
                out.append(exc)
        return out

    def answer(self, queries: list) -> list[Answer | BaseException]:
        """:meth:`submit` and wait for the :meth:`results`."""
        return self.results(self.submit(queries))

    async def search_upload(self, upload: Upload) -> Answer:
        """Serve one uploaded image, awaited from the event loop without a request thread:
        batched, a small upload is queued as it is and decoded by the batch's worker with the
        rest of its batch (one thread hand-off each way); a large one is decoded in a thread
        first. Unbatched, decode and search run together in a thread, as a request thread
        would.

        Raises:
            DataError: the upload is not a readable image.
            UserError: invalid search parameters (``nprobe`` on an HNSW index, say).
        """
        batcher = self._get_batcher()
        if batcher is None:
            return await asyncio.to_thread(self._search_alone, upload)
        if decodes_quickly(upload.data):
            item: object = upload
        else:
            t0 = time.perf_counter()
            item = await asyncio.to_thread(self._prepare, upload, self.service)
            decode_s = time.perf_counter() - t0
        answer = await asyncio.wrap_future(batcher.submit(item))
        if item is not upload:
            answer = dataclasses.replace(answer, decode_s=decode_s)
        return answer

    def _prepare(self, upload: Upload, service: SearchService):
        """The upload decoded (JPEGs at a reduced scale), preprocessed and made a query; holds
        a decode slot meanwhile."""
        from retrieval.serving.service import Query, decode_image

        with self.decodes:
            image, _ = decode_image(upload.data, upload.what, draft_size=service.image_size)
            image = service.prepare(image)
        return Query(image, upload.k, upload.nprobe, upload.ef_search, upload.where)

    def _search_alone(self, upload: Upload) -> Answer:
        service = self.service
        t0 = time.perf_counter()
        query = self._prepare(upload, service)
        decode_s = time.perf_counter() - t0
        (answer,) = service.search_batch([query])
        if isinstance(answer, BaseException):
            raise answer
        return dataclasses.replace(answer, decode_s=decode_s)

    def _embed_batch(self, items: list) -> _Embedded:
        """The micro-batcher's first stage: decode the :class:`Upload` items (one that cannot
        be read fails alone), then one forward pass for all."""
        service = self.service
        staged = _Embedded(items, [None] * len(items))
        for pos, item in enumerate(items):
            t0 = time.perf_counter()
            if isinstance(item, Upload):
                try:
                    item = self._prepare(item, service)
                except DataError as exc:
                    staged.out[pos] = exc
                    continue
                except Exception as exc:  # a decoder bug on a crafted file: this upload only
                    logger.warning("%s: the decoder failed: %r", item.what, exc)
                    staged.out[pos] = DataError(f"{item.what} could not be decoded ({exc})")
                    continue
            staged.queries.append(item)
            staged.positions.append(pos)
            staged.decode_s.append(time.perf_counter() - t0)
        staged.xq, staged.embed_s = service.embed_queries(staged.queries)
        return staged

    def _search_batch(self, staged: _Embedded) -> list[Answer | BaseException]:
        """The micro-batcher's second stage (its own thread): the index searches of a batch
        the first stage embedded."""
        from retrieval.serving.service import apply_faiss_threads

        apply_faiss_threads()
        answers = self.service.search_embedded(staged.queries, staged.xq, staged.embed_s)
        for pos, answer, seconds in zip(staged.positions, answers, staged.decode_s, strict=True):
            if isinstance(staged.items[pos], Upload) and not isinstance(answer, BaseException):
                answer = dataclasses.replace(answer, decode_s=seconds)
            staged.out[pos] = answer
        return staged.out

    def _get_batcher(self) -> MicroBatcher | None:
        if self.max_batch == 1:
            return None
        self.service  # noqa: B018 - 503 while loading
        with self._lock:
            if self._batcher is None:
                self._batcher = MicroBatcher(
                    self._embed_batch,
                    self.max_batch,
                    self.max_wait,
                    name="search-batcher",
                    finish_batch=self._search_batch,
                )
            return self._batcher

    @contextlib.contextmanager
    def decoding(self):
        """Hold one of the decode slots."""
        with self.decodes:
            yield

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close(timeout=5)


def decodes_quickly(data: bytes) -> bool:
    """Whether an upload is small enough, in bytes and in pixels (read from its header only),
    to be decoded by the batch's worker (:data:`WORKER_DECODE_BYTES`,
    :data:`WORKER_DECODE_PIXELS`). Data that is not an image is: its decode fails at once."""
    if len(data) > WORKER_DECODE_BYTES:
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # not an image, or a header PIL cannot parse: the decode will say so
        return True
    return width * height <= WORKER_DECODE_PIXELS
