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
from collections.abc import Callable

log = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_TRIM = _load_trim()


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
