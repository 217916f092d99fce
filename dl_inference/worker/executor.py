"""The execution path of one model instance.

Requests run one at a time, in arrival order: one instance executes one request (later: one batch)
at a time, as in Triton. Long requests run on a dedicated thread so the event loop keeps reading
frames and answering health checks while the model computes. Requests that take well under a
millisecond (the tiny-model case, where two thread hand-offs would cost as much as the model) run
inline on the event loop, but only while the thread is idle, so there is still one execution at a
time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

from dl_inference.errors import ServerError
from dl_inference.protocol.framing import ExecStats
from dl_inference.worker.runner import ModelRunner

log = logging.getLogger(__name__)

# (request id, serialized response or None, stats, error or None) -> None, called on the event loop.
Done = Callable[[int, "bytes | None", ExecStats, "ServerError | None"], None]

INLINE_BELOW_NS = 400_000  # run inline while the recent average request takes less than this


class InstanceExecutor:
    """Feeds requests to a :class:`ModelRunner`, inline or on one dedicated thread."""

    def __init__(self, runner: ModelRunner, loop: asyncio.AbstractEventLoop, inline: bool = True) -> None:
        self.runner = runner
        self._loop = loop
        self._inline = inline
        self._avg_ns = float(INLINE_BELOW_NS)  # start on the thread until a few requests are measured
        # Requests handed to the thread and finished by it; each counter has one writer (loop, thread).
        self._queued = 0
        self._finished = 0
        self._queue: queue.SimpleQueue[tuple[int, bytes, int, Done] | None] = queue.SimpleQueue()
        self._waiting: set[int] = set()  # queued for the thread, not started
        self._cancelled: set[int] = set()
        self._thread = threading.Thread(target=self._work, name=f"exec-{runner.name}", daemon=True)
        self._thread.start()

    def submit(self, rid: int, payload: bytes, done: Done) -> None:
        now = time.monotonic_ns()
        if self._inline and self._queued == self._finished and self._avg_ns < INLINE_BELOW_NS:
            response, stats, error = self._run(payload, now)
            done(rid, response, stats, error)
            return
        self._queued += 1
        self._waiting.add(rid)
        self._queue.put((rid, payload, now, done))

    def cancel(self, rid: int) -> None:
        """Skip ``rid`` if it has not started; its ``done`` is then never called."""
        if rid in self._waiting:
            self._cancelled.add(rid)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self, payload: bytes, enqueued: int) -> tuple[bytes | None, ExecStats, ServerError | None]:
        start = time.monotonic_ns()
        result = self.runner.run(payload, enqueued)
        self._avg_ns += (time.monotonic_ns() - start - self._avg_ns) * 0.1
        return result

    def _work(self) -> None:
        call_soon = self._loop.call_soon_threadsafe
        while True:
            item = self._queue.get()
            if item is None:
                return
            rid, payload, enqueued, done = item
            self._waiting.discard(rid)
            if rid in self._cancelled:
                self._cancelled.discard(rid)
                self._finished += 1
                continue
            response, stats, error = self._run(payload, enqueued)
            self._finished += 1
            try:
                call_soon(done, rid, response, stats, error)
            except RuntimeError:  # loop closed: shutting down
                return
