"""The execution path of one model instance: queue, batch, run, answer.

Requests are prepared (parsed, validated, decoded) on the event loop as they arrive, queued by
priority (:mod:`dl_inference.worker.queues`), and run one batch at a time — one instance executes
one batch at a time, as in Triton. Batches run on a dedicated thread so the loop keeps reading
frames, queueing (which is what lets batches grow under load) and answering health checks. When
batches take well under a millisecond (the tiny-model case, where two thread hand-offs would cost
as much as the model) they run inline on the loop instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from dl_inference.errors import ServerError
from dl_inference.protocol.framing import ExecStats
from dl_inference.worker.queues import BatchPolicy, Pending, RequestQueue, timeout_error
from dl_inference.worker.runner import ExecTimes, ModelRunner, Outcome

log = logging.getLogger(__name__)

# (request id, serialized response or None, stats, error or None) -> None, called on the event loop.
Done = Callable[[int, "bytes | None", ExecStats, "ServerError | None"], None]

INLINE_BELOW_NS = 400_000  # run inline while the recent average batch takes less than this


class InstanceExecutor:
    """Queues, batches and runs the requests of one model instance."""

    def __init__(self, runner: ModelRunner, loop: asyncio.AbstractEventLoop, inline: bool = True) -> None:
        self.runner = runner
        self.policy = BatchPolicy.from_config(runner.config)
        self.queue = RequestQueue(self.policy)
        self._loop = loop
        self._inline = inline
        self._avg_ns = float(INLINE_BELOW_NS)  # start on the thread until a few batches are measured
        self._running = False  # a batch is executing (one at a time)
        self._by_rid: dict[int, Pending] = {}
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: int | None = None
        self._schedule_soon = False
        # preserve_ordering: answers held until every earlier request has been answered.
        self._next_release = 0
        self._held: dict[int, tuple[Pending, bytes | None, ExecStats, ServerError | None]] = {}
        self._work: queue.SimpleQueue[list[Pending] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._thread_main, name=f"exec-{runner.name}", daemon=True)
        self._thread.start()

    # -- entry points (event loop) --------------------------------------------------------------
    def submit(self, rid: int, payload: bytes, done: Done) -> None:
        now = time.monotonic_ns()
        try:
            prepared = self.runner.prepare(payload)
            level = self.queue.level_of(prepared)
        except ServerError as exc:
            done(rid, None, ExecStats(), exc)
            return
        deadline = self.policy.level_policies[level - 1].deadline(now, prepared.timeout_us)
        item = Pending(rid, next(self._seq), prepared, now, deadline, level, done)
        try:
            self.queue.admit(item)
        except ServerError as exc:  # full queue: answered at once, even when ordering is kept
            done(rid, None, ExecStats(), exc)
            self._release(item, None, ExecStats(), None, silent=True)
            return
        self._by_rid[rid] = item
        if self.policy.dynamic:
            # Let every frame that arrived together be queued before forming a batch.
            if not self._schedule_soon:
                self._schedule_soon = True
                self._loop.call_soon(self._schedule)
        else:
            self._schedule()

    def cancel(self, rid: int) -> None:
        """Drop ``rid`` if it is still queued; its ``done`` is then never called."""
        item = self._by_rid.pop(rid, None)
        if item is not None:
            item.cancelled = True
            self._release(item, None, ExecStats(), None, silent=True)

    def close(self) -> None:
        self._work.put(None)
        self._thread.join(timeout=5)

    # -- scheduling (event loop) ----------------------------------------------------------------
    def _schedule(self) -> None:
        """Answer expired requests, then start the next batch or arm a timer for when to look again.

        A loop, not recursion: inline batches finish before the next one is formed.
        """
        self._schedule_soon = False
        while True:
            now = time.monotonic_ns()
            rejected, next_deadline = self.queue.expire(now)
            for item in rejected:
                self._by_rid.pop(item.rid, None)
                self._release(item, None, ExecStats(queue_ns=now - item.arrival_ns), timeout_error())
            if self._running:
                self._arm(next_deadline, now)
                return
            batch, wait_until = self.queue.take_batch(now)
            if not batch:
                wakes = [t for t in (wait_until, next_deadline) if t is not None]
                self._arm(min(wakes) if wakes else None, now)
                return
            for item in batch:
                self._by_rid.pop(item.rid, None)
            self._running = True
            if self._inline and self._avg_ns < INLINE_BELOW_NS:
                outcomes, times = self._execute(batch)
                self._finish(batch, outcomes, times, now, reschedule=False)
                continue
            self._work.put(batch)
            return

    def _arm(self, wake: int | None, now: int) -> None:
        if wake is None or wake == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = wake
        self._timer = self._loop.call_later(max(wake - now, 0) / 1e9, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._schedule()

    def _execute(self, batch: list[Pending]) -> tuple[list[Outcome], ExecTimes]:
        start = time.monotonic_ns()
        outcomes, times = self.runner.execute([p.prepared for p in batch])
        self._avg_ns += (time.monotonic_ns() - start - self._avg_ns) * 0.1
        return outcomes, times

    def _thread_main(self) -> None:
        call_soon = self._loop.call_soon_threadsafe
        while True:
            batch = self._work.get()
            if batch is None:
                return
            started = time.monotonic_ns()
            outcomes, times = self._execute(batch)
            try:
                call_soon(self._finish, batch, outcomes, times, started)
            except RuntimeError:  # loop closed: shutting down
                return

    def _finish(
        self,
        batch: Sequence[Pending],
        outcomes: list[Outcome],
        times: ExecTimes,
        started: int,
        reschedule: bool = True,
    ) -> None:
        self._running = False
        total = sum(p.prepared.rows for p in batch)
        counted = False
        for item, (body, error) in zip(batch, outcomes):
            stats = ExecStats(
                # the queue starts once the request is parsed; parsing is compute input, as in Triton
                queue_ns=max(started - item.arrival_ns - item.prepared.prepare_ns, 0),
                compute_input_ns=item.prepared.prepare_ns + times.input_ns,
                compute_infer_ns=times.infer_ns,
                compute_output_ns=times.output_ns,
                rows=item.prepared.rows,
                batch_size=total,
                counts_execution=error is None and not counted,
            )
            counted = counted or error is None
            if not item.cancelled:
                self._release(item, body, stats, error)
        if reschedule:
            self._schedule()

    def _release(
        self, item: Pending, body: bytes | None, stats: ExecStats, error: ServerError | None, silent: bool = False
    ) -> None:
        """Answer ``item`` now, or hold it until the requests before it are answered."""
        if not self.policy.preserve_ordering:
            if not silent:
                item.reply(item.rid, body, stats, error)  # type: ignore[operator]
            return
        self._held[item.seq] = (item, body, stats, None if silent else error)
        if silent:
            item.reply = None
        while self._next_release in self._held:
            held, h_body, h_stats, h_error = self._held.pop(self._next_release)
            self._next_release += 1
            if held.reply is not None and not held.cancelled:
                held.reply(held.rid, h_body, h_stats, h_error)  # type: ignore[operator]
