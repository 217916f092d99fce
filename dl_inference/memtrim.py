"""Give freed heap memory back to the operating system now and then (glibc ``malloc_trim``).

A burst of queued calls (a stalled event loop, a traffic spike) makes gRPC core and CPython allocate
for thousands of requests at once; after the burst the memory is free inside the process but glibc
keeps it, so the gateway's RSS steps up with each larger burst and never comes down (load_tests
README, soak finding 2). ``malloc_trim(0)`` hands free pages at the top and in the middle of the heap
back. It takes milliseconds on a heap of this size, so calling it every minute costs nothing
measurable. Elsewhere than glibc (musl, macOS) it is not available and this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _load_trim() -> Callable[[int], int] | None:
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_TRIM = _load_trim()

# glibc's mallopt parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Request and response buffers (a 602 KB image, a few MB of batch) come from the heap and stay there
# between requests; larger ones (64 MiB tensors) are mapped and unmapped as before. Without this,
# glibc maps each buffer above 128 KiB afresh or trims the heap under it as soon as it is freed, and
# every request pays page faults on fresh pages: a 602 KB request over HTTP cost 2.8 ms of server CPU
# instead of 1.1 ms on the dev VM (load_tests/README.md). What stays is given back by trim_every.
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 256 << 20


def tune_malloc() -> bool:
    """Keep request-sized buffers in the heap (see above); True when set. Nothing when the user set
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (theirs wins), or outside glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None or _TRIM is None:  # without malloc_trim nothing would ever give the memory back
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def available() -> bool:
    return _TRIM is not None


def trim() -> bool:
    """One ``malloc_trim(0)``; True when glibc released some memory."""
    return bool(_TRIM(0)) if _TRIM is not None else False


async def trim_every(interval_s: float) -> None:
    """Trim every ``interval_s`` seconds until cancelled (nothing when unavailable or interval <= 0)."""
    if interval_s <= 0 or _TRIM is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        trim()
