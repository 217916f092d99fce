"""This machine's CPU: its model name and flags (``/proc/cpuinfo``; Linux, else unknown), and the reduced
precisions it computes natively rather than emulating."""

from __future__ import annotations

import functools
from pathlib import Path

# CPU flags that make a reduced precision native rather than emulated.
NATIVE_FLAGS = {"bf16": "avx512_bf16 or amx_bf16", "fp16": "avx512_fp16 or amx_fp16"}


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU listed; ("unknown CPU", no flags) without /proc/cpuinfo."""
    model, flags = "unknown CPU", frozenset[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def native_precisions() -> set[str]:
    """Reduced precisions this CPU computes natively: a subset of {"bf16", "fp16"}."""
    flags = cpu_info()[1]
    native = set()
    if flags & {"avx512_bf16", "amx_bf16"}:
        native.add("bf16")
    if flags & {"avx512_fp16", "amx_fp16"}:
        native.add("fp16")
    return native
