"""What a bench reports: the machine it ran on, medians and ratios, table cells, and the result
files (JSON beside a text table)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.lib.server import REPO_ROOT

BUSY_LOADAVG = 0.5  # 1-min load average above which a report warns that the machine was busy


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": os.getloadavg(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import grpc
        import onnxruntime

        info["grpcio"] = grpc.__version__
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)
        info["git_commit"] = head.stdout.strip()
        info["git_dirty"] = bool(dirty.stdout.strip())
    except OSError:
        pass
    return info


def percentile(values: Iterable[float], p: float) -> float | None:
    arr = np.asarray(list(values), dtype=np.float64)
    if not arr.size:
        return None
    return float(np.percentile(arr, p, method="higher"))


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def round_medians(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """A table row's client numbers from loadgen reports of alternating rounds: how many rounds and
    the median throughput, p50 and p99 (rounds without a latency left out)."""
    return {
        "rounds": len(reports),
        "throughput_rps": median([r["throughput_rps"] for r in reports]),
        "p50_ms": median([r["latency_ms"]["p50"] for r in reports]),
        "p99_ms": median([r["latency_ms"]["p99"] for r in reports]),
    }


def num(v: float | None, fmt: str) -> str:
    """A table cell: ``v`` formatted, or "-" for None."""
    return "-" if v is None else format(v, fmt)


def int_list(text: str) -> list[int]:
    """A comma list of positive integers, sorted, without repeats (an option's type)."""
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"want a comma list of positive integers, got {text!r}")
    return values


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def to_json(obj: Any, indent: int = 0) -> str:
    """JSON with dicts and lists of containers indented, but each dict or list of plain values on one
    line: the per-request timelines and 50 ms endpoint series stay readable and small."""
    pad, inner = " " * indent, " " * (indent + 1)

    def flat(v: Any) -> bool:
        return not isinstance(v, (dict, list)) or (
            all(not isinstance(x, (dict, list)) for x in (v.values() if isinstance(v, dict) else v))
        )

    if flat(obj):
        return json.dumps(obj, default=str)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(str(k))}: {to_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    return "[\n" + ",\n".join(inner + to_json(v, indent + 1) for v in obj) + "\n" + pad + "]"


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def finish(result: dict[str, Any] | None, text: Callable[[dict[str, Any]], str], path: Path | None) -> int:
    """A bench's end: print its table and, given ``path``, write the result there and the table beside
    it (``.txt``); exit status 1 when the bench failed (``result`` None)."""
    if result is None:
        return 1
    table = text(result)
    print(table)
    if path is not None:
        write_json(result, path)
        path.with_suffix(".txt").write_text(table + "\n")
    return 0


def write_json_and_text(json_path: Path, json_text: str, txt_path: Path, text: str) -> None:
    """Write a report's JSON and its text table (parents created) and say so."""
    for path, content in ((json_path, json_text), (txt_path, text)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    print(f"wrote {json_path} and {txt_path}")
