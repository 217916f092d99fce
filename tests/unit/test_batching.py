"""The instance executor's queueing and batching rules, with a fake runner (our logic only).

The real model, real server and real clients are exercised in tests/integration/test_batching.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
from google.protobuf import text_format

from dl_inference.errors import Code, ServerError
from dl_inference.protocol.framing import ExecStats
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.worker import executor as executor_module
from dl_inference.worker.executor import InstanceExecutor
from dl_inference.worker.runner import ExecTimes, Outcome, Prepared


class FakeRunner:
    """payload = b"rows,key,priority,timeout_us"; execution sleeps ``delay`` and records batches."""

    name = "fake"

    def __init__(self, config_text: str, delay: float = 0.0) -> None:
        self.config = text_format.Parse(config_text, mc.ModelConfig())
        self.delay = delay
        self.batches: list[list[str]] = []
        self.threads: list[str] = []

    def prepare(self, payload: bytes) -> Prepared:
        rows, key, priority, timeout = payload.decode().split(",")
        return Prepared(
            request_id=payload.decode(),
            inputs={"x": np.zeros((int(rows), 1))},
            outputs=["y"],
            rows=int(rows),
            key=(key,),
            priority=int(priority) if priority else None,
            timeout_us=int(timeout) if timeout else None,
            prepare_ns=0,
        )

    def execute(self, batch: Sequence[Prepared]) -> tuple[list[Outcome], ExecTimes]:
        self.threads.append(threading.current_thread().name)
        self.batches.append([p.request_id for p in batch])
        time.sleep(self.delay)
        return [(p.request_id.encode(), None) for p in batch], ExecTimes(1, 2, 3)


class Harness:
    def __init__(self, runner: FakeRunner, inline: bool = False) -> None:
        self.runner = runner
        self.inline = inline
        self.replies: list[tuple[int, bytes | None, ExecStats, ServerError | None]] = []

    def done(self, rid: int, body: bytes | None, stats: ExecStats, error: ServerError | None) -> None:
        self.replies.append((rid, body, stats, error))

    async def start(self) -> InstanceExecutor:
        self.ex = InstanceExecutor(self.runner, asyncio.get_running_loop(), inline=self.inline)  # type: ignore[arg-type]
        return self.ex

    def send(self, rid: int, rows: int = 1, key: str = "a", priority: str = "", timeout: str = "") -> None:
        self.ex.submit(rid, f"{rows},{key},{priority},{timeout}".encode(), self.done)

    async def wait(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.replies) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert len(self.replies) >= n, self.replies


BATCHING = "max_batch_size: 8 dynamic_batching { }"


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_without_dynamic_batching_requests_run_one_at_a_time() -> None:
    async def main() -> None:
        h = Harness(FakeRunner("max_batch_size: 8", delay=0.01))
        await h.start()
        for rid in range(4):
            h.send(rid)
        await h.wait(4)
        assert [len(b) for b in h.runner.batches] == [1, 1, 1, 1]
        assert [r[0] for r in h.replies] == [0, 1, 2, 3]
        h.ex.close()

    run(main())


def test_requests_queued_behind_a_running_batch_are_combined_up_to_max_rows() -> None:
    async def main() -> None:
        h = Harness(FakeRunner(BATCHING, delay=0.05))
        await h.start()
        h.send(0)
        await asyncio.sleep(0.02)  # request 0 is running; the rest queue up
        for rid, rows in zip(range(1, 7), (3, 3, 2, 1, 1, 4)):
            h.send(rid, rows=rows)
        h.send(9, rows=1, key="other-shape")
        await h.wait(8)
        sizes = [[int(r.split(",")[0]) for r in b] for b in h.runner.batches]
        assert sizes[0] == [1]
        assert sum(sizes[1]) == 8 and sizes[1] == [3, 3, 2]  # never over max_batch_size
        assert all("other-shape" not in r for b in h.runner.batches if len(b) > 1 for r in b)
        stats = {rid: s for rid, _, s, _ in h.replies}
        assert stats[1].batch_size == 8 and stats[1].rows == 3
        assert [stats[r].counts_execution for r in (1, 2, 3)] == [True, False, False]
        h.ex.close()

    run(main())


def test_max_queue_delay_gathers_and_preferred_size_leaves_at_once() -> None:
    async def main() -> None:
        h = Harness(
            FakeRunner(
                "max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: 200000 preferred_batch_size: [4] }"
            )
        )
        await h.start()
        start = time.monotonic()
        h.send(0, rows=1)
        await asyncio.sleep(0.02)
        h.send(1, rows=2)
        await h.wait(2)
        waited = time.monotonic() - start
        assert h.runner.batches == [["1,a,,", "2,a,,"]] and 0.18 < waited < 1.0
        start = time.monotonic()
        h.send(2, rows=1)
        h.send(3, rows=3)  # 4 rows = a preferred size: no waiting
        await h.wait(4)
        assert time.monotonic() - start < 0.15
        h.ex.close()

    run(main())


def test_priority_levels_and_preserve_ordering() -> None:
    async def main() -> None:
        config = (
            "max_batch_size: 1 dynamic_batching { priority_levels: 2 default_priority_level: 2 "
            "preserve_ordering: true }"
        )
        h = Harness(FakeRunner(config, delay=0.03))
        await h.start()
        h.send(0)
        await asyncio.sleep(0.01)
        h.send(1)  # level 2
        h.send(2, priority="1")  # level 1: runs before 1
        await h.wait(3)
        assert [b[0] for b in h.runner.batches] == ["1,a,,", "1,a,1,", "1,a,,"]  # level 1 went first
        assert [r[0] for r in h.replies] == [0, 1, 2]  # answers in arrival order regardless
        h.send(3, priority="7")
        await h.wait(4)
        assert h.replies[3][3] is not None and h.replies[3][3].code is Code.INVALID_ARGUMENT
        h.ex.close()

    run(main())


def test_priority_without_preserve_ordering_reorders() -> None:
    async def main() -> None:
        h = Harness(
            FakeRunner(
                "max_batch_size: 1 dynamic_batching { priority_levels: 2 default_priority_level: 2 }", delay=0.03
            )
        )
        await h.start()
        h.send(0)
        await asyncio.sleep(0.01)
        h.send(1)
        h.send(2, priority="1")
        await h.wait(3)
        assert [r[0] for r in h.replies] == [0, 2, 1]
        h.ex.close()

    run(main())


def test_full_queue_is_rejected_at_once() -> None:
    async def main() -> None:
        h = Harness(
            FakeRunner("max_batch_size: 1 dynamic_batching { default_queue_policy { max_queue_size: 2 } }", delay=0.05)
        )
        await h.start()
        h.send(0)
        await asyncio.sleep(0.01)
        for rid in (1, 2, 3):
            h.send(rid)
        rejected = [r for r in h.replies if r[3] is not None]
        assert [r[0] for r in rejected] == [3] and rejected[0][3].code is Code.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
        await h.wait(4)
        h.ex.close()

    run(main())


def test_queue_timeouts_reject_or_delay() -> None:
    async def main() -> None:
        reject = (
            "max_batch_size: 1 dynamic_batching { default_queue_policy { default_timeout_microseconds: 20000 "
            "allow_timeout_override: true } }"
        )
        h = Harness(FakeRunner(reject, delay=0.06))
        await h.start()
        h.send(0)
        await asyncio.sleep(0.005)
        h.send(1)  # waits ~55 ms > 20 ms: rejected while queued
        h.send(2, timeout="500000")  # may only shorten the default: still 20 ms
        await h.wait(3)
        errors = {rid: err for rid, _, _, err in h.replies}
        assert [r[0] for r in h.replies][:2] == [1, 2]  # rejected when their time was up, not after 0 ran
        assert errors[0] is None
        assert errors[1] is not None and errors[1].code is Code.UNAVAILABLE and "timeout" in errors[1].message
        assert errors[2] is not None
        h.ex.close()

        delay = (
            "max_batch_size: 1 dynamic_batching { default_queue_policy { timeout_action: DELAY "
            "default_timeout_microseconds: 20000 } }"
        )
        h = Harness(FakeRunner(delay, delay=0.05))
        await h.start()
        h.send(0)
        await asyncio.sleep(0.005)
        h.send(1)  # times out while 0 runs: delayed behind every other request
        await asyncio.sleep(0.03)
        h.send(2)
        await h.wait(3)
        assert [r[0] for r in h.replies] == [0, 2, 1] and all(r[3] is None for r in h.replies)
        h.ex.close()

    run(main())


def test_cancelled_request_leaves_the_queue() -> None:
    async def main() -> None:
        h = Harness(FakeRunner(BATCHING, delay=0.05))
        await h.start()
        h.send(0)
        await asyncio.sleep(0.01)
        h.send(1)
        h.send(2)
        h.ex.cancel(1)
        await h.wait(2)
        await asyncio.sleep(0.1)
        assert [r[0] for r in h.replies] == [0, 2]
        assert all("1,a,," != r or len(b) == 1 for b in h.runner.batches[1:] for r in b)
        assert sum(len(b) for b in h.runner.batches) == 2
        h.ex.close()

    run(main())


def test_fast_batches_run_inline_once_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake's batches take microseconds, but on a busy 2-core machine a thread's batch can measure
    # above 0.4 ms; a larger bound keeps what is tested (thread first, inline once measured fast).
    monkeypatch.setattr(executor_module, "INLINE_BELOW_NS", 50_000_000)

    async def main() -> None:
        h = Harness(FakeRunner(BATCHING), inline=True)
        await h.start()
        for rid in range(40):
            h.send(rid)
            await h.wait(rid + 1)
        assert h.runner.threads[0].startswith("exec-") and h.runner.threads[-1] == "MainThread"
        h.ex.close()

    run(main())


def test_a_long_queue_drained_inline_does_not_recurse() -> None:
    async def main() -> None:
        h = Harness(FakeRunner("max_batch_size: 1 dynamic_batching { }"), inline=True)
        ex = await h.start()
        ex._avg_ns = 0.0  # measured fast: inline from the start
        for rid in range(3000):
            h.send(rid)
        await h.wait(3000)
        assert [r[0] for r in h.replies] == list(range(3000))
        ex.close()

    run(main())
