"""Dynamic batching in front of a scorer. Torch-free.

A model scores a batch of B images in much less than B times the time of one, but HTTP clients
send one image at a time. :class:`DynamicBatcher` turns concurrent single requests into batches:
worker threads take the oldest waiting request, wait at most ``max_wait_ms`` (counted from that
request's arrival) for up to ``max_batch_size`` requests with the same dimension selection, and
call ``score_fn`` once for all of them.

Service behaviour, on purpose:

- **Back-pressure**: the queue is bounded; a request that does not fit is refused at once with
  :class:`QueueFullError` (an HTTP server answers 429) rather than queued into a latency spiral.
- **Timeouts**: a request that is not answered within its timeout raises
  :class:`RequestTimeoutError`; it is taken out of the queue if still there, and its result is
  dropped if it is already being computed. Expired requests are never sent to ``score_fn``.
- **Isolation**: if ``score_fn`` raises on a batch, each of its requests is retried alone, so one
  bad input fails only its own request.
- **Graceful close**: ``close(drain=True)`` refuses new requests and finishes the queued and
  running ones; ``drain=False`` fails the queued ones with :class:`BatcherClosedError`.

``score_fn(images, prompts, dimensions)`` has the signature of ``Scorer.score``: it gets lists of
equal length and the dimension selection (``None`` for the scorer's default) and returns one
result per item, in order. It runs in the worker threads only.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from ..checks import positive_int

logger = logging.getLogger(__name__)

ScoreFn = Callable[[list, list, Any], Sequence[Any]]


class BatcherError(RuntimeError):
    """Base class of the batcher's own errors (not the scorer's)."""


class QueueFullError(BatcherError):
    """The queue has no room for the request: back off and retry (HTTP 429)."""


class RequestTimeoutError(BatcherError, TimeoutError):
    """The request was not answered within its timeout; its result, if any, is dropped (HTTP 504)."""


class BatcherClosedError(BatcherError):
    """The batcher is closing or closed and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class BatchInfo:
    """What one ``score_fn`` batch did; given to the ``on_batch`` callback (e.g. for metrics)."""

    size: int
    dimensions: tuple[str, ...] | None
    queue_wait_s: tuple[float, ...]  # per request: enqueue -> batch start
    inference_s: float  # score_fn time, including one-by-one retries after a batch failure
    failed: int  # requests that ended with an exception
    retried: bool  # the batch failed as a whole and was retried one by one


@dataclass
class BatcherStats:
    """A snapshot of the counters, for metrics and tests."""

    queue_depth: int
    in_flight: int
    submitted: int
    completed: int
    failed: int
    rejected: int
    timed_out: int
    batches: int
    batch_size_counts: dict[int, int] = field(default_factory=dict)

    @property
    def max_batch_size_seen(self) -> int:
        return max(self.batch_size_counts, default=0)

    @property
    def mean_batch_size(self) -> float:
        n = sum(self.batch_size_counts.values())
        return sum(k * v for k, v in self.batch_size_counts.items()) / n if n else 0.0


class _Request:
    __slots__ = ("image", "prompt", "key", "future", "enqueued", "deadline")

    def __init__(self, image: Any, prompt: Any, key: Hashable, enqueued: float, deadline: float | None) -> None:
        self.image = image
        self.prompt = prompt
        self.key = key
        self.future: cf.Future = cf.Future()
        self.enqueued = enqueued
        self.deadline = deadline


def _timeout_value(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
    return float(value)


def score_isolating(
    score_fn: ScoreFn, images: list, prompts: list, key: Any,
    expired: Callable[[int], bool] | None = None,
) -> tuple[list[tuple[Any, Exception | None]], bool]:
    """Score a batch; when the whole batch fails, score each item alone, so a bad item fails only
    itself. Returns ``(result, None)`` or ``(None, exception)`` per item, and whether it retried.
    ``expired(i)``: item i's caller has given up (not retried). The one home of this policy: the
    batcher and the Ray Serve deployment both use it."""

    def call(ims: list, prs: list) -> list:
        out = list(score_fn(ims, prs, key))
        if len(out) != len(ims):
            raise RuntimeError(f"score_fn returned {len(out)} results for {len(ims)} inputs")
        return out

    try:
        return [(x, None) for x in call(images, prompts)], False
    except Exception as e:
        if len(images) == 1:
            return [(None, e)], False
    outcomes: list[tuple[Any, Exception | None]] = []
    for i in range(len(images)):
        if expired is not None and expired(i):
            outcomes.append((None, RequestTimeoutError("request timed out")))
            continue
        try:
            outcomes.append((call([images[i]], [prompts[i]])[0], None))
        except Exception as e1:
            outcomes.append((None, e1))
    return outcomes, True


class DynamicBatcher:
    """Batches concurrent ``(image, prompt)`` requests into ``score_fn`` calls.

    Args:
        score_fn: ``score_fn(images, prompts, dimensions) -> list`` (e.g. ``scorer.score``).
        max_batch_size: most requests in one ``score_fn`` call.
        max_wait_ms: longest a request waits for others to join its batch; a lone request is
            served after about this long. ``0`` dispatches whatever is queued at once.
        max_queue: most requests waiting (not yet in a batch); more are refused with
            :class:`QueueFullError`.
        num_workers: threads calling ``score_fn`` (more than one only helps a thread-safe
            ``score_fn`` that releases the GIL, e.g. onnxruntime).
        default_timeout: seconds per request when ``submit`` gets no timeout (``None``: no limit).
        on_batch: called with a :class:`BatchInfo` after each batch, in the worker thread; its
            exceptions are logged and ignored.
    """

    def __init__(
        self,
        score_fn: ScoreFn,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        num_workers: int = 1,
        default_timeout: float | None = None,
        on_batch: Callable[[BatchInfo], None] | None = None,
    ) -> None:
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self._score_fn = score_fn
        self.max_batch_size = positive_int("max_batch_size", max_batch_size)
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        self.max_wait_ms = float(max_wait_ms)
        self.max_queue = positive_int("max_queue", max_queue)
        self.num_workers = positive_int("num_workers", num_workers)
        self.default_timeout = _timeout_value("default_timeout", default_timeout)
        self._on_batch = on_batch

        self._cond = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._closing = False
        self._in_flight = 0
        self._submitted = self._completed = self._failed = self._rejected = self._timed_out = 0
        self._batches = 0
        self._batch_sizes: collections.Counter[int] = collections.Counter()
        self._workers = [
            threading.Thread(target=self._worker, name=f"zreward-batcher-{i}", daemon=True)
            for i in range(self.num_workers)
        ]
        for t in self._workers:
            t.start()

    # ------------------------------------------------------------------ submitting
    def submit(self, image: Any, prompt: str, dimensions: Sequence[str] | None = None, timeout: float | None = None) -> Any:
        """Score one pair, blocking until its batch is done. Raises the scorer's error for this item."""
        return self.submit_many([image], [prompt], dimensions, timeout)[0]

    def submit_many(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        dimensions: Sequence[str] | None = None,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list:
        """Score several pairs, admitted to the queue all together or not at all.

        ``timeout`` covers all of them. With ``return_exceptions`` an item's exception is returned
        in its place; otherwise the first failing item's exception is raised. Admission errors
        (:class:`QueueFullError`, :class:`BatcherClosedError`) are always raised.
        """
        reqs, deadline = self._enqueue(images, prompts, dimensions, timeout)
        out: list = []
        for r in reqs:
            try:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                out.append(r.future.result(timeout=remaining))
            except RequestTimeoutError as e:
                out.append(e)
            except cf.TimeoutError:
                for q in reqs:
                    self._abandon(q, timed_out=True)
                raise RequestTimeoutError(f"request timed out after {self._timeout_of(timeout)} s") from None
            except cf.CancelledError:
                out.append(BatcherClosedError("request was cancelled"))
            except Exception as e:  # the scorer's error for this item
                out.append(e)
        return _finish(out, return_exceptions)

    async def asubmit(self, image: Any, prompt: str, dimensions: Sequence[str] | None = None, timeout: float | None = None) -> Any:
        """Asyncio version of :meth:`submit`; the event loop is never blocked."""
        return (await self.asubmit_many([image], [prompt], dimensions, timeout))[0]

    async def asubmit_many(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        dimensions: Sequence[str] | None = None,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list:
        """Asyncio version of :meth:`submit_many`. Cancelling the awaiting task abandons the requests."""
        reqs, _ = self._enqueue(images, prompts, dimensions, timeout)
        waiters = [asyncio.wrap_future(r.future) for r in reqs]
        try:
            out = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), self._timeout_of(timeout))
        except asyncio.TimeoutError:
            for r in reqs:
                self._abandon(r, timed_out=True)
            raise RequestTimeoutError(f"request timed out after {self._timeout_of(timeout)} s") from None
        except asyncio.CancelledError:
            for r in reqs:
                self._abandon(r)
            raise
        out = [BatcherClosedError("request was cancelled") if isinstance(x, asyncio.CancelledError) else x for x in out]
        return _finish(out, return_exceptions)

    def _timeout_of(self, timeout: float | None) -> float | None:
        return self.default_timeout if timeout is None else _timeout_value("timeout", timeout)

    def _enqueue(
        self, images: Sequence[Any], prompts: Sequence[str], dimensions: Sequence[str] | None, timeout: float | None
    ) -> tuple[list[_Request], float | None]:
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not images:
            raise ValueError("nothing to score: no images given")
        if isinstance(dimensions, str):
            dimensions = (dimensions,)
        key = None if dimensions is None else tuple(dimensions)
        t = self._timeout_of(timeout)
        now = time.monotonic()
        deadline = None if t is None else now + t
        reqs = [_Request(im, p, key, now, deadline) for im, p in zip(images, prompts)]
        with self._cond:
            if self._closing:
                raise BatcherClosedError("the batcher is closed")
            if len(self._queue) + len(reqs) > self.max_queue:
                self._rejected += len(reqs)
                raise QueueFullError(
                    f"queue full ({len(self._queue)} waiting, limit {self.max_queue}); retry later"
                )
            self._queue.extend(reqs)
            self._submitted += len(reqs)
            self._cond.notify_all()
        return reqs, deadline

    def _abandon(self, req: _Request, timed_out: bool = False) -> None:
        """Drop a request whose caller gave up (timeout or cancellation).

        It leaves the queue if still there; if it is already running, the batch finishes and the
        result is dropped.
        """
        with self._cond:
            if req.future.done() and not req.future.cancelled():
                return  # answered in time after all
            if req.future.cancel():
                try:
                    self._queue.remove(req)
                except ValueError:
                    pass
            self._timed_out += timed_out

    # ------------------------------------------------------------------ workers
    def _worker(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                try:
                    self._run_batch(batch)
                except BaseException as e:  # noqa: BLE001 - the worker must outlive any scorer failure
                    # A BaseException from the scorer (not an Exception: _run_batch isolates those per
                    # item) fails this batch only; the worker goes on with the next one, or every
                    # later request would wait for a dead thread (issue 12).
                    logger.exception("batch worker: the scorer raised %r; the batch failed, the worker goes on", e)
                    for r in batch:
                        _set(r.future, exc=BatcherError(f"batch worker failed: {e!r}"))
                    with self._cond:
                        self._failed += len(batch)
                finally:
                    with self._cond:
                        self._in_flight -= len(batch)

    @property
    def workers_alive(self) -> bool:
        """Every worker thread is running (a closed batcher has none)."""
        return not self._closing and all(t.is_alive() for t in self._workers)

    def _next_batch(self) -> list[_Request] | None:
        """Wait for a batch: the oldest request plus others of its key, up to the limits."""
        max_wait = self.max_wait_ms / 1000.0
        with self._cond:
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                first = self._queue[0]
                due = first.enqueued + max_wait
                while self._queue and self._queue[0] is first and not self._closing:
                    if sum(1 for r in self._queue if r.key == first.key) >= self.max_batch_size:
                        break
                    remaining = due - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if not self._queue or self._queue[0] is not first:
                    continue  # taken by another worker or abandoned: start over
                return self._take(first.key)

    def _take(self, key: Hashable) -> list[_Request]:
        """Remove up to max_batch_size live requests of ``key`` from the queue (lock held)."""
        batch: list[_Request] = []
        rest: collections.deque[_Request] = collections.deque()
        now = time.monotonic()
        for r in self._queue:
            if len(batch) < self.max_batch_size and r.key == key:
                if not r.future.set_running_or_notify_cancel():
                    continue  # abandoned by its caller
                if r.deadline is not None and now >= r.deadline:
                    _set(r.future, exc=RequestTimeoutError("request timed out in the queue"))
                    self._timed_out += 1
                    continue
                batch.append(r)
            else:
                rest.append(r)
        self._queue = rest
        self._in_flight += len(batch)
        return batch

    def _run_batch(self, batch: list[_Request]) -> None:
        start = time.monotonic()
        key = batch[0].key
        outcomes: list[tuple[Any, BaseException | None]]
        outcomes, retried = score_isolating(
            self._score_fn, [r.image for r in batch], [r.prompt for r in batch], key,
            expired=lambda i: batch[i].deadline is not None and time.monotonic() >= batch[i].deadline)
        inference_s = time.monotonic() - start
        failed = 0
        for r, (res, exc) in zip(batch, outcomes):
            failed += exc is not None
            _set(r.future, res, exc)
        with self._cond:
            self._batches += 1
            self._batch_sizes[len(batch)] += 1
            self._completed += len(batch) - failed
            self._failed += failed
        if self._on_batch is not None:
            info = BatchInfo(len(batch), key, tuple(start - r.enqueued for r in batch), inference_s, failed, retried)
            try:
                self._on_batch(info)
            except Exception:
                logger.exception("on_batch callback failed")


    # ------------------------------------------------------------------ lifecycle and stats
    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests. ``drain``: finish queued ones first; else fail them. Joins the workers."""
        with self._cond:
            self._closing = True
            dropped: list[_Request] = []
            if not drain:
                dropped, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for r in dropped:
            if r.future.set_running_or_notify_cancel():
                _set(r.future, exc=BatcherClosedError("the batcher was closed before this request ran"))
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._workers:
            if t is not threading.current_thread():
                t.join(None if end is None else max(end - time.monotonic(), 0.0))

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not yet running)."""
        return len(self._queue)

    def stats(self) -> BatcherStats:
        with self._cond:
            return BatcherStats(
                queue_depth=len(self._queue),
                in_flight=self._in_flight,
                submitted=self._submitted,
                completed=self._completed,
                failed=self._failed,
                rejected=self._rejected,
                timed_out=self._timed_out,
                batches=self._batches,
                batch_size_counts=dict(self._batch_sizes),
            )

    def __enter__(self) -> "DynamicBatcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(drain=True)

    def __repr__(self) -> str:
        return (
            f"DynamicBatcher(max_batch_size={self.max_batch_size}, max_wait_ms={self.max_wait_ms}, "
            f"max_queue={self.max_queue}, num_workers={self.num_workers})"
        )


def _set(fut: cf.Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Complete a running future; a future its caller cancelled meanwhile is left alone."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except cf.InvalidStateError:
        pass


def _finish(out: list, return_exceptions: bool) -> list:
    if not return_exceptions:
        for x in out:
            if isinstance(x, BaseException):
                raise x
    return out
