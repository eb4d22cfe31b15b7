"""Dynamic batching of recommendation requests (docs/architecture.md §10), as Triton's
``dynamic_batching``: requests that arrive together are answered by one
:meth:`Recommender.recommend_batch` call, i.e. one onnxruntime run and one blocked top-k.

One worker thread drains a queue. It takes what is waiting (up to ``max_batch_size`` requests)
and, if that is less than a full batch, waits at most ``max_queue_delay_us`` for more; while it
runs a batch, new requests queue up, so under load batches form without any delay and an idle
server answers a lone request after at most the queue delay (none at all when the server knows
no other request is in flight). Per-request ``k``, exclusions,
categories, diversity, explanations and fallbacks are applied per row by ``recommend_batch``
itself, which gives each row the answer it gives the row alone.

A job is one HTTP request: one recommendation, or a whole ``:batch`` body. Jobs are batched only
with jobs on the same model object (a reload swaps the model; a request finishes on the one it
started with). If a merged batch raises (a bad request among good ones), each job is run again
alone, so every client gets exactly the answer or error it would get unbatched.

Running onnxruntime from this one thread also keeps its per-thread state, and glibc's per-thread
malloc arenas, from multiplying across the 40 threads of the route thread pool: under concurrent
load with hot reloads that multiplied RSS per reload (docs/architecture.md §10).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from recforge.serve.recommender import Recommendation, Recommender

log = logging.getLogger(__name__)


class _Job:
    __slots__ = ("model", "requests", "future", "loop")

    def __init__(self, model: Recommender, requests: Sequence[dict[str, Any]], future, loop):
        self.model, self.requests, self.future, self.loop = model, requests, future, loop


class Batcher:
    """Gathers concurrent :meth:`submit` calls into :meth:`Recommender.recommend_batch` calls."""

    def __init__(
        self,
        max_batch_size: int = 64,
        max_queue_delay_us: int = 500,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, not {max_batch_size}")
        if max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, not {max_queue_delay_us}")
        self.max_batch_size = max_batch_size
        self.delay_s = max_queue_delay_us / 1e6
        # Requests the server is handling (arrived, maybe not queued yet): the worker waits for
        # more only while there are others than those it holds, so a lone request pays no delay.
        self.in_flight = in_flight
        self._queue: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self.batches = 0  # merged recommend_batch calls, and the requests they answered
        self.batched_requests = 0
        self._thread = threading.Thread(target=self._run, name="recforge-batcher", daemon=True)
        self._thread.start()

    async def submit(
        self, model: Recommender, requests: Sequence[dict[str, Any]]
    ) -> list[Recommendation]:
        """The answers of ``requests`` on ``model``, or the exception ``recommend_batch`` raises
        for them alone."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(_Job(model, requests, future, loop))
            self._ready.notify()
        return await future

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=10)

    # --- the worker thread ---

    def _take(self) -> list[_Job] | None:
        """The next batch: the queue's head, plus what arrives within the delay (same model,
        up to max_batch_size requests). None once closed and drained."""
        with self._ready:
            while not self._queue:
                if self._closed:
                    return None
                self._ready.wait()
            jobs = [self._queue.popleft()]
            size = len(jobs[0].requests)
            deadline = time.monotonic() + self.delay_s
            while size < self.max_batch_size:
                if self._queue:
                    head = self._queue[0]
                    if head.model is not jobs[0].model or size + len(head.requests) > (
                        self.max_batch_size
                    ):
                        break  # the next batch's: it is not reordered behind later jobs
                    jobs.append(self._queue.popleft())
                    size += len(head.requests)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                if self.in_flight is not None and self.in_flight() <= len(jobs):
                    break  # nobody else is coming: do not make these wait
                self._ready.wait(left)
            return jobs

    def _run(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                self._answer(jobs)
            except BaseException as exc:  # never lose the thread: every job gets an answer
                log.exception("batcher: unexpected failure")
                for job in jobs:
                    _resolve(job, None, exc)

    def _answer(self, jobs: list[_Job]) -> None:
        if len(jobs) == 1:
            job = jobs[0]
            try:
                _resolve(job, job.model.recommend_batch(job.requests), None)
            except Exception as exc:
                _resolve(job, None, exc)
            return
        merged = [r for job in jobs for r in job.requests]
        try:
            results = jobs[0].model.recommend_batch(merged)
        except Exception:
            # One job's bad request fails the merged call: answer each alone, so each gets its
            # own result or error (with its own request numbers), as unbatched.
            for job in jobs:
                self._answer([job])
            return
        self.batches += 1
        self.batched_requests += len(merged)
        start = 0
        for job in jobs:
            _resolve(job, results[start : start + len(job.requests)], None)
            start += len(job.requests)


def _resolve(job: _Job, result: Any, error: BaseException | None) -> None:
    def settle() -> None:
        if job.future.done():  # the client went away (cancelled)
            return
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed (shutdown): nobody is waiting
        pass
