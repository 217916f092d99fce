"""The execution thread of one model instance.

The event loop only moves bytes; decoding, the backend call and encoding run on this thread so the
loop keeps reading frames (and answering health checks) while the model computes. Requests run in
arrival order, one at a time: one instance executes one batch at a time, as in Triton.
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

# (request id, response or None, stats, error or None) -> None, called on the event loop.
Done = Callable[[int, "bytes | None", ExecStats, "ServerError | None"], None]


class InstanceExecutor:
    """Feeds requests to a :class:`ModelRunner` on one dedicated thread."""

    def __init__(self, runner: ModelRunner, loop: asyncio.AbstractEventLoop) -> None:
        self.runner = runner
        self._loop = loop
        self._queue: queue.SimpleQueue[tuple[int, bytes, int, Done] | None] = queue.SimpleQueue()
        self._cancelled: set[int] = set()
        self._thread = threading.Thread(target=self._work, name=f"exec-{runner.name}", daemon=True)
        self._thread.start()

    def submit(self, rid: int, payload: bytes, done: Done) -> None:
        self._queue.put((rid, payload, time.monotonic_ns(), done))

    def cancel(self, rid: int) -> None:
        """Skip ``rid`` if it has not started; its ``done`` is then never called."""
        self._cancelled.add(rid)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _work(self) -> None:
        call_soon = self._loop.call_soon_threadsafe
        while True:
            item = self._queue.get()
            if item is None:
                return
            rid, payload, enqueued, done = item
            if self._cancelled:
                if rid in self._cancelled:
                    self._cancelled.discard(rid)
                    continue
            response, stats, error = self.runner.run(payload, enqueued)
            try:
                call_soon(done, rid, response, stats, error)
            except RuntimeError:  # loop closed: shutting down
                return
