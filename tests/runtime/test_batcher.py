"""DynamicBatcher: batching, limits, back-pressure, timeouts, isolation, close, asyncio API."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from zreward_fast.imaging import ImageError
from zreward_fast.runtime.batcher import (
    BatcherClosedError,
    DynamicBatcher,
    QueueFullError,
    RequestTimeoutError,
)
from zreward_fast.runtime.testing import FakeScorer, make_image_bytes

IMAGES = [make_image_bytes(i) for i in range(8)]


def _submit_concurrently(batcher, n, prompt="p", dims=None, timeout=10.0):
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        return batcher.submit(IMAGES[i % len(IMAGES)], f"{prompt}{i}", dims, timeout=timeout)

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(one, range(n)))


def _wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


class _Blocking:
    """A score_fn that blocks until released; records its batches."""

    def __init__(self):
        self.release = threading.Event()
        self.batches = []

    def __call__(self, images, prompts, dims):
        self.batches.append(list(prompts))
        assert self.release.wait(10)
        return [{"prompt": p} for p in prompts]


def test_batches_form_under_concurrency_and_results_match():
    scorer = FakeScorer(latency_s=0.05)
    with DynamicBatcher(scorer.score, max_batch_size=16, max_wait_ms=20) as b:
        results = _submit_concurrently(b, 16)
    assert max(scorer.batch_sizes) > 1
    assert sum(scorer.batch_sizes) == 16
    direct = FakeScorer()
    for i, r in enumerate(results):
        assert r == direct.score([IMAGES[i % len(IMAGES)]], [f"p{i}"])[0]
    st = b.stats()
    assert st.completed == 16 and st.failed == 0 and st.max_batch_size_seen > 1


def test_max_batch_size_respected():
    scorer = FakeScorer(latency_s=0.03)
    with DynamicBatcher(scorer.score, max_batch_size=4, max_wait_ms=50) as b:
        _submit_concurrently(b, 20)
    assert max(scorer.batch_sizes) == 4
    assert sum(scorer.batch_sizes) == 20


def test_lone_request_served_after_max_wait():
    scorer = FakeScorer()
    with DynamicBatcher(scorer.score, max_batch_size=8, max_wait_ms=150) as b:
        b.submit(IMAGES[0], "warm")  # first call pays one-off costs
        t = time.perf_counter()
        b.submit(IMAGES[0], "alone")
        dt = time.perf_counter() - t
    assert 0.14 <= dt < 0.5, dt
    with DynamicBatcher(scorer.score, max_batch_size=8, max_wait_ms=0) as b:
        b.submit(IMAGES[0], "warm")
        t = time.perf_counter()
        b.submit(IMAGES[0], "alone")
        assert time.perf_counter() - t < 0.1


def test_full_batch_dispatches_before_max_wait():
    scorer = FakeScorer()
    with DynamicBatcher(scorer.score, max_batch_size=4, max_wait_ms=2000) as b:
        t = time.perf_counter()
        _submit_concurrently(b, 4)
        assert time.perf_counter() - t < 1.0
    assert scorer.batch_sizes == [4]


def test_full_queue_refuses_at_once():
    fn = _Blocking()
    b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0, max_queue=2)
    with ThreadPoolExecutor(3) as ex:
        running = ex.submit(b.submit, "img", "running")
        _wait_until(lambda: b.stats().in_flight == 1)
        queued = [ex.submit(b.submit, "img", f"queued{i}") for i in range(2)]
        _wait_until(lambda: b.queue_depth == 2)
        t = time.perf_counter()
        with pytest.raises(QueueFullError):
            b.submit("img", "refused")
        with pytest.raises(QueueFullError):  # a group that does not fit is refused whole
            b.submit_many(["img"], ["refused too"])
        assert time.perf_counter() - t < 0.25  # no waiting for room
        fn.release.set()
        assert running.result(5) == {"prompt": "running"}
        assert [q.result(5) for q in queued] == [{"prompt": "queued0"}, {"prompt": "queued1"}]
    assert b.stats().rejected == 2
    b.close()


def test_request_timeout_drops_the_request():
    fn = _Blocking()
    b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0, max_queue=8)
    with ThreadPoolExecutor(2) as ex:
        running = ex.submit(b.submit, "img", "running", None, 0.2)  # times out while running
        _wait_until(lambda: b.stats().in_flight == 1)
        t = time.perf_counter()
        with pytest.raises(RequestTimeoutError):
            b.submit("img", "queued", timeout=0.1)  # times out in the queue
        assert 0.09 <= time.perf_counter() - t < 0.5
        assert b.queue_depth == 0  # taken out of the queue, never scored
        with pytest.raises(RequestTimeoutError):
            running.result(5)
        fn.release.set()
        assert b.submit("img", "after", timeout=5) == {"prompt": "after"}
    assert ["queued"] not in fn.batches
    assert b.stats().timed_out == 2
    b.close()


def test_default_timeout_applies():
    fn = _Blocking()
    b = DynamicBatcher(fn, max_wait_ms=0, default_timeout=0.05)
    with pytest.raises(RequestTimeoutError):
        b.submit("img", "x")
    fn.release.set()
    b.close()


def test_bad_item_fails_only_its_request():
    scorer = FakeScorer(latency_s=0.05)
    bad_image = make_image_bytes(0)[:40]  # truncated PNG
    cases = [(IMAGES[i], f"good {i}") for i in range(6)] + [(IMAGES[0], "bad __fail__ prompt"), (bad_image, "bad image")]
    barrier = threading.Barrier(len(cases))
    with DynamicBatcher(scorer.score, max_batch_size=16, max_wait_ms=50) as b:

        def one(case):
            barrier.wait()
            try:
                return b.submit(*case, timeout=10)
            except Exception as e:
                return e

        with ThreadPoolExecutor(len(cases)) as ex:
            outs = list(ex.map(one, cases))
    assert all(isinstance(o, dict) and len(o) == 4 for o in outs[:6])
    assert isinstance(outs[6], ValueError) and "__fail__" in str(outs[6])
    assert isinstance(outs[7], ImageError)
    assert max(scorer.batch_sizes) > 1 and scorer.batch_sizes.count(1) >= len(cases)  # retried one by one
    st = b.stats()
    assert st.completed == 6 and st.failed == 2


def test_score_fn_returning_wrong_length_fails_cleanly():
    b = DynamicBatcher(lambda images, prompts, dims: [], max_wait_ms=0)
    with pytest.raises(RuntimeError, match="0 results for 1"):
        b.submit("img", "x")
    b.close()


def test_groups_by_dimension_selection():
    scorer = FakeScorer(latency_s=0.03)
    calls = []

    def score_fn(images, prompts, dims):
        calls.append((len(images), dims))
        return scorer.score(images, prompts, dims)

    barrier = threading.Barrier(12)
    with DynamicBatcher(score_fn, max_batch_size=16, max_wait_ms=50) as b:

        def one(i):
            dims = ("realism",) if i % 2 else None
            barrier.wait()
            return b.submit(IMAGES[i % 8], f"p{i}", dims, timeout=10)

        with ThreadPoolExecutor(12) as ex:
            outs = list(ex.map(one, range(12)))
    assert all(set(o) == ({"realism"} if i % 2 else set(FakeScorer().dimensions)) for i, o in enumerate(outs))
    assert {d for _, d in calls} == {None, ("realism",)}
    assert sum(n for n, _ in calls) == 12 and max(n for n, _ in calls) > 1


def test_close_drain_finishes_in_flight_and_queued():
    scorer = FakeScorer(latency_s=0.1)
    b = DynamicBatcher(scorer.score, max_batch_size=2, max_wait_ms=0)
    with ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(b.submit, IMAGES[i], f"p{i}") for i in range(6)]
        _wait_until(lambda: b.stats().submitted == 6)
        b.close(drain=True)
        assert all(len(f.result(5)) == 4 for f in futs)
    with pytest.raises(BatcherClosedError):
        b.submit(IMAGES[0], "late")
    assert b.closed and b.stats().completed == 6


def test_close_without_drain_fails_queued_requests():
    fn = _Blocking()
    b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0)
    with ThreadPoolExecutor(3) as ex:
        running = ex.submit(b.submit, "img", "running")
        _wait_until(lambda: b.stats().in_flight == 1)
        queued = [ex.submit(b.submit, "img", f"q{i}") for i in range(2)]
        _wait_until(lambda: b.queue_depth == 2)
        threading.Timer(0.1, fn.release.set).start()
        b.close(drain=False)
        assert running.result(5) == {"prompt": "running"}
        for q in queued:
            with pytest.raises(BatcherClosedError):
                q.result(5)


def test_asyncio_api():
    scorer = FakeScorer(latency_s=0.05)

    async def main():
        with DynamicBatcher(scorer.score, max_batch_size=16, max_wait_ms=20) as b:
            outs = await asyncio.gather(*(b.asubmit(IMAGES[i % 8], f"p{i}") for i in range(16)))
            many = await b.asubmit_many(IMAGES[:3], ["a", "b", "c __fail__"], ["alignment"], return_exceptions=True)
            with pytest.raises(ValueError):
                await b.asubmit_many(IMAGES[:2], ["a", "b __fail__"])
            return outs, many

    outs, many = asyncio.run(main())
    assert len(outs) == 16 and all(len(o) == 4 for o in outs)
    assert max(scorer.batch_sizes) > 1
    assert set(many[0]) == {"alignment"} and set(many[1]) == {"alignment"} and isinstance(many[2], ValueError)


def test_asyncio_timeout_and_cancellation_abandon_requests():
    fn = _Blocking()

    async def main(b):
        t = time.perf_counter()
        with pytest.raises(RequestTimeoutError):
            await b.asubmit("img", "slow", timeout=0.1)
        assert time.perf_counter() - t < 0.5
        task = asyncio.ensure_future(b.asubmit("img", "cancelled"))
        await asyncio.sleep(0.05)
        assert b.queue_depth == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert b.queue_depth == 0

    b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0)
    asyncio.run(main(b))
    fn.release.set()
    assert b.submit("img", "after", timeout=5) == {"prompt": "after"}
    assert ["cancelled"] not in fn.batches
    b.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"max_batch_size": 0}, {"max_wait_ms": -1}, {"max_queue": 0}, {"num_workers": 0}, {"default_timeout": 0},
     {"max_batch_size": True}],
)
def test_constructor_validates(kwargs):
    with pytest.raises(ValueError):
        DynamicBatcher(lambda i, p, d: [], **kwargs)


def test_submit_validates():
    with DynamicBatcher(lambda i, p, d: [None] * len(i)) as b:
        with pytest.raises(ValueError, match="2 images but 1 prompts"):
            b.submit_many(["a", "b"], ["x"])
        with pytest.raises(ValueError, match="nothing to score"):
            b.submit_many([], [])
        with pytest.raises(ValueError, match="timeout"):
            b.submit("a", "x", timeout=-1)


def test_multiple_workers():
    scorer = FakeScorer(latency_s=0.05)
    with DynamicBatcher(scorer.score, max_batch_size=4, max_wait_ms=10, num_workers=3) as b:
        t = time.perf_counter()
        outs = _submit_concurrently(b, 12)
        dt = time.perf_counter() - t
    assert len(outs) == 12 and sum(scorer.batch_sizes) == 12
    assert dt < 1.0


def test_score_isolating_is_the_one_isolation_policy():
    """Shared by the batcher and the Ray Serve deployment (issue 12): a failing batch is retried
    item by item, so only the bad item fails; expired items are not retried."""
    from zreward_fast.runtime.batcher import RequestTimeoutError, score_isolating

    calls = []

    def score(images, prompts, key):
        calls.append(list(images))
        if "bad" in images:
            raise ValueError("bad image")
        return [f"{key}:{x}" for x in images]

    out, retried = score_isolating(score, ["a", "b"], ["p", "q"], "k")
    assert out == [("k:a", None), ("k:b", None)] and not retried and calls == [["a", "b"]]
    out, retried = score_isolating(score, ["a", "bad", "c", "d"], list("pqrs"), "k", expired=lambda i: i == 3)
    assert retried and out[0] == ("k:a", None) and out[2] == ("k:c", None)
    assert isinstance(out[1][1], ValueError) and isinstance(out[3][1], RequestTimeoutError)
    assert ["d"] not in calls  # the expired item was not scored again
    out, retried = score_isolating(lambda i, p, k: [], ["a"], ["p"], "k")
    assert not retried and isinstance(out[0][1], RuntimeError)  # a wrong result count fails too
