"""Load from outside the benchmark's process: ``load_tests.loadgen`` in a subprocess (one or
``--processes`` of them, merged by loadgen itself), and the send schedule of open-loop senders."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.lib.server import DEFAULT_MODEL, REPO_ROOT, BenchError


def run_loadgen(
    url: str,
    protocol: str,
    concurrency: int,
    duration: float,
    warmup: float,
    out: Path,
    model: str = DEFAULT_MODEL,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One loadgen run in a fresh process; its report. BenchError if it could not run at all."""
    cmd = [
        sys.executable,
        "-m",
        "load_tests.loadgen",
        *extra,
        "--url",
        url,
        "--protocol",
        protocol,
        "--model",
        model,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=duration + warmup + 120)
    if not out.exists():
        raise BenchError(f"loadgen failed (status {proc.returncode}) on {url}:\n{proc.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return report


def arrival_times(rate: float, arrival: str, t0: float, rng: np.random.Generator) -> Iterable[float]:
    """Intended send times: every 1/rate s (constant), or exponential gaps of mean 1/rate (poisson)."""
    gap = 1.0 / rate
    if arrival == "constant":
        k = 0
        while True:
            yield t0 + k * gap
            k += 1
    t = t0
    while True:
        t += float(rng.exponential(gap))
        yield t
