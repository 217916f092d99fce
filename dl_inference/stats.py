"""Per model-version inference statistics, in the shape of V2 ModelStatistics and Triton's metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dl_inference.errors import Code, ServerError
from dl_inference.protocol.framing import ExecStats
from dl_inference.protocol.generated import grpc_service_pb2 as pb

# Error code -> Triton's nv_inference_request_failure "reason" label.
_FAILURE_REASON = {
    Code.INVALID_ARGUMENT: "REJECTED",
    Code.NOT_FOUND: "REJECTED",
    Code.RESOURCE_EXHAUSTED: "REJECTED",
    Code.CANCELLED: "CANCELED",
    Code.INTERNAL: "BACKEND",
    Code.UNAVAILABLE: "BACKEND",
}


def failure_reason(error: ServerError) -> str:
    return _FAILURE_REASON.get(error.code, "OTHER")


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_proto(self, out: pb.StatisticDuration) -> None:
        out.count = self.count
        out.ns = self.ns


@dataclass(slots=True)
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    """Counters for one model version; updated on the event loop that owns them."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    batches: dict[int, BatchDurations] = field(default_factory=dict)
    pending: int = 0

    def record_success(self, total_ns: int, stats: ExecStats) -> None:
        self.success.add(total_ns)
        self.queue.add(stats.queue_ns)
        self.compute_input.add(stats.compute_input_ns)
        self.compute_infer.add(stats.compute_infer_ns)
        self.compute_output.add(stats.compute_output_ns)
        self.inference_count += max(stats.rows, 1)
        if stats.counts_execution:
            self.execution_count += 1
            batch = self.batches.get(stats.batch_size)
            if batch is None:
                batch = self.batches[stats.batch_size] = BatchDurations()
            batch.compute_input.add(stats.compute_input_ns)
            batch.compute_infer.add(stats.compute_infer_ns)
            batch.compute_output.add(stats.compute_output_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, total_ns: int, reason: str) -> None:
        self.fail.add(total_ns)
        self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1
        self.last_inference_ms = time.time_ns() // 1_000_000

    def merged(self, others: list[ModelStats]) -> ModelStats:
        """These counters plus ``others``' (several frontends' shares of one model version)."""
        if not others:
            return self
        out = ModelStats(inference_count=self.inference_count, execution_count=self.execution_count,
                         last_inference_ms=self.last_inference_ms, pending=self.pending,
                         failures_by_reason=dict(self.failures_by_reason))  # fmt: skip
        for part in (self, *others):
            for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
                mine, theirs = getattr(out, name), getattr(part, name)
                mine.add(theirs.ns, theirs.count)
            for size, batch in part.batches.items():
                into = out.batches.setdefault(size, BatchDurations())
                for name in ("compute_input", "compute_infer", "compute_output"):
                    getattr(into, name).add(getattr(batch, name).ns, getattr(batch, name).count)
        for part in others:
            out.inference_count += part.inference_count
            out.execution_count += part.execution_count
            out.last_inference_ms = max(out.last_inference_ms, part.last_inference_ms)
            out.pending += part.pending
            for reason, count in part.failures_by_reason.items():
                out.failures_by_reason[reason] = out.failures_by_reason.get(reason, 0) + count
        return out

    def to_proto(self, name: str, version: str) -> pb.ModelStatistics:
        out = pb.ModelStatistics(
            name=name,
            version=version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
        )
        s = out.inference_stats
        self.success.to_proto(s.success)
        self.fail.to_proto(s.fail)
        self.queue.to_proto(s.queue)
        self.compute_input.to_proto(s.compute_input)
        self.compute_infer.to_proto(s.compute_infer)
        self.compute_output.to_proto(s.compute_output)
        for size in sorted(self.batches):
            b = self.batches[size]
            entry = out.batch_stats.add(batch_size=size)
            b.compute_input.to_proto(entry.compute_input)
            b.compute_infer.to_proto(entry.compute_infer)
            b.compute_output.to_proto(entry.compute_output)
        return out
