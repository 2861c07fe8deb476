"""The micro-batcher: batches form, one bad item fails alone, a cancelled caller never stalls."""

from __future__ import annotations

import threading

import pytest

from retrieval.serving.batching import MicroBatcher

WAIT = 10.0  # seconds a test waits for a result before failing (never reached when it works)


class Gated:
    """``run_batch`` that records its batches and blocks until ``open`` is set."""

    def __init__(self, fail_on=None):
        self.batches: list[list] = []
        self.open = threading.Event()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items):
        self.entered.set()
        self.open.wait(WAIT)
        self.batches.append(list(items))
        return [ValueError(f"bad {x}") if x == self.fail_on else x * 10 for x in items]


def test_waiting_items_are_served_together_up_to_max_batch():
    run = Gated()
    batcher = MicroBatcher(run, max_batch=4, max_wait=0.0)
    first = batcher.submit(0)
    assert run.entered.wait(WAIT)  # the worker is busy with [0]; the next ones queue up
    futures = [batcher.submit(i) for i in range(1, 7)]
    run.open.set()
    assert first.result(WAIT) == 0
    assert [f.result(WAIT) for f in futures] == [10, 20, 30, 40, 50, 60]
    assert run.batches == [[0], [1, 2, 3, 4], [5, 6]]
    batcher.close(WAIT)


def test_a_failing_item_fails_alone():
    run = Gated(fail_on=2)
    run.open.set()
    batcher = MicroBatcher(run, max_batch=8, max_wait=0.05)
    futures = [batcher.submit(i) for i in range(4)]
    assert [f.result(WAIT) for f in futures if f is not futures[2]] == [0, 10, 30]
    with pytest.raises(ValueError, match="bad 2"):
        futures[2].result(WAIT)
    batcher.close(WAIT)


def test_a_failing_batch_fails_its_items_and_the_worker_goes_on():
    calls = []

    def run(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("the model fell over")
        return items

    batcher = MicroBatcher(run, max_batch=8, max_wait=0.0)
    with pytest.raises(RuntimeError, match="fell over"):
        batcher.submit(1).result(WAIT)
    assert batcher.submit(2).result(WAIT) == 2
    batcher.close(WAIT)


def test_a_cancelled_caller_does_not_stall_its_batch():
    run = Gated()
    batcher = MicroBatcher(run, max_batch=8, max_wait=0.0)
    busy = batcher.submit(0)
    assert run.entered.wait(WAIT)
    gone, stays = batcher.submit(1), batcher.submit(2)
    assert gone.cancel()  # the client went away before its batch ran
    run.open.set()
    assert busy.result(WAIT) == 0 and stays.result(WAIT) == 20
    assert run.batches == [[0], [2]]  # the cancelled item was left out
    assert batcher.submit(3).result(WAIT) == 30  # and the worker is still serving
    batcher.close(WAIT)


def test_a_lone_item_is_served_after_the_window_and_close_drains():
    seen = []
    batcher = MicroBatcher(lambda items: seen.append(items) or items, max_batch=8, max_wait=0.01)
    assert batcher.submit("x").result(WAIT) == "x"
    pending = [batcher.submit(i) for i in range(3)]
    batcher.close(WAIT)
    assert [f.result(0) for f in pending] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(4)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda items: items, max_batch=0)
    with pytest.raises(ValueError, match="max_wait"):
        MicroBatcher(lambda items: items, max_wait=-1)


def test_a_batch_waits_only_for_announced_items():
    seen = []
    batcher = MicroBatcher(lambda items: seen.append(items) or items, max_batch=8, max_wait=30.0)
    assert batcher.submit("alone").result(WAIT) == "alone"  # nobody announced: no 30 s wait
    announced, submitted = threading.Event(), threading.Event()

    def late_companion():
        with batcher.arriving():
            announced.set()
            submitted.wait(WAIT)  # decoding while the first item is already queued
            batcher.submit("second")

    thread = threading.Thread(target=late_companion)
    thread.start()
    assert announced.wait(WAIT)
    first = batcher.submit("first")
    submitted.set()
    assert first.result(WAIT) == "first"
    thread.join(WAIT)
    batcher.close(WAIT)
    assert seen == [["alone"], ["first", "second"]]


def test_two_stages_overlap_and_a_failing_second_stage_fails_its_batch_alone():
    """With ``finish_batch`` and items waiting, the worker hands a batch's second stage to the
    second thread and runs the next batch meanwhile; with none waiting, it finishes the batch
    itself."""
    first_gate = Gated()  # holds the first batch's first stage until the next item is queued
    stuck, release = threading.Event(), threading.Event()
    finished_by: dict[int, str] = {}

    def run(items):
        if items == [0]:
            first_gate(items)
        return ["stage1", *items]

    def finish(staged):
        finished_by[staged[1]] = threading.current_thread().name
        if staged == ["stage1", 0]:
            stuck.set()
            release.wait(WAIT)
            raise RuntimeError("the index fell over")
        return [x * 10 for x in staged[1:]]

    batcher = MicroBatcher(run, max_batch=8, max_wait=0.0, name="w", finish_batch=finish)
    first = batcher.submit(0)
    assert first_gate.entered.wait(WAIT)
    second = batcher.submit(1)  # waiting when the first batch's first stage ends
    first_gate.open.set()
    assert stuck.wait(WAIT)
    assert second.result(WAIT) == 10  # served while the first batch is stuck in its 2nd stage
    assert not first.done()
    release.set()
    with pytest.raises(RuntimeError, match="fell over"):
        first.result(WAIT)  # the failure stayed in its batch
    assert finished_by == {0: "w-finish", 1: "w"}
    assert batcher.submit(2).result(WAIT) == 20 and finished_by[2] == "w"  # alone: no hand-off
    late = batcher.submit(3)
    batcher.close(WAIT)  # stops both threads, serving what was queued
    assert late.result(0) == 30
    assert not batcher._thread.is_alive() and not batcher._finisher.is_alive()
