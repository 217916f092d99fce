"""Prometheus text exposition with Triton's metric names, labelled by model and version."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dl_inference.gateway.models import ModelVersion
    from dl_inference.stats import ModelStats

_COUNTERS: list[tuple[str, str, Callable[[ModelStats], int]]] = [
    ("nv_inference_request_success", "Number of successful inference requests", lambda s: s.success.count),
    ("nv_inference_count", "Number of inferences performed (a batch of n counts n)", lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions (batches)", lambda s: s.execution_count),
    (
        "nv_inference_request_duration_us",
        "Cumulative end-to-end inference request duration in microseconds",
        lambda s: (s.success.ns + s.fail.ns) // 1000,
    ),
    ("nv_inference_queue_duration_us", "Cumulative queue duration in microseconds", lambda s: s.queue.ns // 1000),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds",
        lambda s: s.compute_input.ns // 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds",
        lambda s: s.compute_infer.ns // 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative compute output duration in microseconds",
        lambda s: s.compute_output.ns // 1000,
    ),
]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(versions: Iterable[ModelVersion]) -> str:
    versions = sorted(versions, key=lambda v: (v.name, v.version))
    labels = {id(v): f'model="{_escape(v.name)}",version="{v.version}"' for v in versions}
    lines: list[str] = []
    for name, help_text, value in _COUNTERS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines += [f"{name}{{{labels[id(v)]}}} {value(v.stats)}" for v in versions]
    lines += [
        "# HELP nv_inference_request_failure Number of failed inference requests",
        "# TYPE nv_inference_request_failure counter",
    ]
    for v in versions:
        for reason in sorted({"REJECTED", "CANCELED", "BACKEND", "OTHER"} | set(v.stats.failures_by_reason)):
            count = v.stats.failures_by_reason.get(reason, 0)
            lines.append(f'nv_inference_request_failure{{{labels[id(v)]},reason="{reason}"}} {count}')
    lines += [
        "# HELP nv_inference_pending_request_count Instantaneous number of pending requests",
        "# TYPE nv_inference_pending_request_count gauge",
    ]
    lines += [f"nv_inference_pending_request_count{{{labels[id(v)]}}} {v.stats.pending}" for v in versions]
    lines += [
        "# HELP nv_model_load_duration_secs Model load time in seconds",
        "# TYPE nv_model_load_duration_secs gauge",
    ]
    lines += [f"nv_model_load_duration_secs{{{labels[id(v)]}}} {v.load_seconds:.3f}" for v in versions]
    return "\n".join(lines) + "\n"
