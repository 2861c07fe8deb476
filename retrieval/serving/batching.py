"""Dynamic micro-batching: requests that arrive together are served by one call.

A :class:`MicroBatcher` owns one worker thread. Callers :meth:`~MicroBatcher.submit` an item and
get a :class:`concurrent.futures.Future`; the worker takes the first waiting item and everything
else already queued (up to ``max_batch``), and runs ``run_batch`` once on all of them. Under
load the queue is already full when the worker comes back, so batches form without waiting.

The worker waits for more (at most ``max_wait`` seconds) only while other items are on their
way: a caller announces one with :meth:`~MicroBatcher.arriving` while it prepares it (decodes
an upload, say). A lone request therefore never waits for companions that are not coming, and
on a busy machine every avoided sleep is a scheduler wake-up saved.

Written here rather than taken from a library: the serving libraries that batch (Triton, Ray
Serve, TorchServe) are whole servers; this is the 100 lines the FastAPI server needs.

With ``finish_batch``, a batch is served in two stages, like a pipeline: the worker runs
``run_batch`` (the forward pass, say) and, when more items are waiting, hands what it returned
to a second thread, which runs ``finish_batch`` on it (the index search) and delivers the
results while the worker already runs the next batch's first stage. Both stages spend most of
their time in native code that releases the GIL, so on two cores they overlap. When nothing is
waiting, the worker finishes the batch itself: a lone request is not handed from thread to
thread for nothing.

- A result that is an exception fails that item alone; ``run_batch`` (or ``finish_batch``)
  raising fails the whole batch (its items get the exception), and the worker carries on.
- A future cancelled before its batch runs (the caller gave up) is left out of the batch: a
  cancelled client never stalls or fails its neighbours.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Longest a batch waits for announced companions, seconds.
DEFAULT_MAX_WAIT = 0.002
#: Most requests served by one call.
DEFAULT_MAX_BATCH = 32

_STOP = object()  # queued by close()
_WAKE = object()  # queued when the last announced item has been submitted


class MicroBatcher(Generic[T, R]):
    """Collect concurrently submitted items into batches for ``run_batch``.

    Args:
        run_batch: maps a list of items to one result (or exception) per item, in order.
        max_batch: most items per call (``>= 1``; 1 serves items one at a time).
        max_wait: seconds the first item of a batch waits for announced items (``>= 0``).
        name: the worker thread's name.
        finish_batch: when given, ``run_batch`` returns anything and ``finish_batch`` maps
            that to the results, in a second thread (see the module docstring).
    """

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R | BaseException]],
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait: float = DEFAULT_MAX_WAIT,
        name: str = "micro-batcher",
        finish_batch: Callable[[object], Sequence[R | BaseException]] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be at least 0, got {max_wait}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._arriving = 0
        self._arriving_lock = threading.Lock()
        self.finish_batch = finish_batch
        self._finishing: queue.SimpleQueue = queue.SimpleQueue()
        self._finisher = None
        if finish_batch is not None:
            self._finisher = threading.Thread(
                target=self._finish, name=f"{name}-finish", daemon=True
            )
            self._finisher.start()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future:
        """Queue ``item``; the future gets its result (or exception) once its batch ran."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        fut: Future = Future()
        self._queue.put((item, fut))
        return fut

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce an item that is being prepared and will be submitted inside this block: the
        batch being collected waits for it (at most ``max_wait``)."""
        with self._arriving_lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._arriving_lock:
                self._arriving -= 1
                if self._arriving == 0:
                    self._queue.put(_WAKE)  # a worker waiting for it stops waiting

    def close(self, timeout: float | None = None) -> None:
        """Serve what is queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._finisher is not None:  # the worker queued _STOP for it when it stopped
            self._finisher.join(timeout)

    # ---------------------------------------------------------------------------- worker

    def _collect(self) -> tuple[list[tuple[T, Future]], bool]:
        """One batch of live items (blocks for the first); and whether to stop afterwards."""
        first = self._queue.get()
        while first is _WAKE:
            first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get_nowait()  # already waiting: no need to sleep
            except queue.Empty:
                left = deadline - time.perf_counter()
                if left <= 0 or self._arriving == 0:
                    break
                try:
                    nxt = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if nxt is _WAKE:
                continue
            if nxt is _STOP:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _work(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._collect()
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                out = self.run_batch([item for item, _ in live])
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                self._fail(live, exc)
                continue
            if self.finish_batch is None:
                self._deliver(live, out)
            elif self._queue.empty():  # no batch waits for this thread: no hand-off
                self._finish_one(live, out)
            else:
                self._finishing.put((live, out))
        self._finishing.put(_STOP)

    def _finish(self) -> None:
        while (job := self._finishing.get()) is not _STOP:
            self._finish_one(*job)

    def _finish_one(self, live: list[tuple[T, Future]], staged: object) -> None:
        try:
            out = self.finish_batch(staged)
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
            self._fail(live, exc)
            return
        self._deliver(live, out)

    @staticmethod
    def _fail(live: list[tuple[T, Future]], exc: BaseException) -> None:
        logger.exception("a batch of %d failed", len(live), exc_info=exc)
        for _, fut in live:
            fut.set_exception(exc)

    def _deliver(self, live: list[tuple[T, Future]], results: Sequence[R | BaseException]) -> None:
        if len(results) != len(live):
            self._fail(
                live, RuntimeError(f"a batch gave {len(results)} results for {len(live)} items")
            )
            return
        for (_, fut), res in zip(live, results, strict=True):
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)
