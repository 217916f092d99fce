"""Prometheus text exposition with Triton's metric names, labelled by model and version."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dl_inference.balancer.balancer import Balancer
    from dl_inference.balancer.endpoint import Endpoint
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


_STATES = ("healthy", "unhealthy", "ejected", "down")
_ENDPOINT_SERIES: list[tuple[str, str, str, Callable[[dict[str, Any]], float]]] = [
    ("dl_inference_endpoint_weight", "gauge", "Effective weight (configured x failure penalty x slow start)",
     lambda d: d["effective_weight"]),
    ("dl_inference_endpoint_inflight", "gauge", "Requests in flight at the endpoint", lambda d: d["inflight"]),
    ("dl_inference_endpoint_latency_ewma_seconds", "gauge", "Moving average of successful request latency",
     lambda d: d["latency_ewma_ms"] / 1e3),
    ("dl_inference_endpoint_requests_total", "counter", "Attempts sent to the endpoint", lambda d: d["requests"]),
    ("dl_inference_endpoint_failures_total", "counter", "Attempts that failed there", lambda d: d["failures"]),
    ("dl_inference_endpoint_ejections_total", "counter", "Times the endpoint was ejected", lambda d: d["ejections"]),
    ("dl_inference_endpoint_retries_total", "counter", "Requests retried elsewhere after failing at the endpoint",
     lambda d: d["retries"]),
]  # fmt: skip


def render_balancer_metrics(balancer: Balancer, sets: dict[str, list[Endpoint]]) -> str:
    """Per-endpoint state, weight, load and failure counters; balancer-wide retry counters."""
    rows: dict[str, dict[str, Any]] = {}
    for endpoints in sets.values():
        for ep in endpoints:
            if ep.name not in rows:
                rows[ep.name] = balancer.describe(ep)
    lines = [
        "# HELP dl_inference_endpoint_state 1 for the endpoint's current state",
        "# TYPE dl_inference_endpoint_state gauge",
    ]
    for name, d in rows.items():
        base = f'endpoint="{_escape(name)}",kind="{d["kind"]}"'
        lines += [f'dl_inference_endpoint_state{{{base},state="{s}"}} {int(d["state"] == s)}' for s in _STATES]
    for metric, kind, help_text, value in _ENDPOINT_SERIES:
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        lines += [f'{metric}{{endpoint="{_escape(n)}",kind="{d["kind"]}"}} {value(d):g}' for n, d in rows.items()]
    for key, count in balancer.counters().items():
        metric = f"dl_inference_balancer_{key}_total"
        lines += [f"# HELP {metric} Balancer {key.replace('_', ' ')}", f"# TYPE {metric} counter", f"{metric} {count}"]
    return "\n".join(lines) + "\n"


def render_frontend_metrics(frontends: list[dict[str, Any]]) -> str:
    """Per frontend process (``serve --frontends N``): up, requests taken up, starts."""
    lines = [
        "# HELP dl_inference_frontend_up 1 while the frontend process serves (0: restarting)",
        "# TYPE dl_inference_frontend_up gauge",
        *(f'dl_inference_frontend_up{{frontend="{f["frontend"]}"}} {int(f["up"])}' for f in frontends),
        "# HELP dl_inference_frontend_requests_total Inference requests this frontend took up (as of its last count)",
        "# TYPE dl_inference_frontend_requests_total counter",
        *(f'dl_inference_frontend_requests_total{{frontend="{f["frontend"]}"}} {f["requests"]}' for f in frontends),
        "# HELP dl_inference_frontend_starts_total Times the frontend process was started",
        "# TYPE dl_inference_frontend_starts_total counter",
        *(f'dl_inference_frontend_starts_total{{frontend="{f["frontend"]}"}} {f["starts"]}' for f in frontends),
    ]
    return "\n".join(lines) + "\n"
