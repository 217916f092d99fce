"""Work that would hold the event loop too long, done in a helper process.

A thread does not help here: orjson, ``json`` and protobuf's parser are C code that keeps the GIL for
the whole call (decoding a 90 MB JSON body takes about half a second, a 90 MB ModelInferRequest of
millions of unknown fields about a second), and every other client of the process waits that long.
Bodies of at least :data:`OFFLOAD_BYTES` are therefore handled by a small pool of spawned processes,
started on first use. Smaller ones are handled inline: for them the round trip costs more than the
work.

The bytes do not travel through the pool's pipe: pickling 90 MB holds the GIL for a third of a
second. They go through a file on tmpfs instead, written and read by ``os.write``/``readinto`` on a
thread (the kernel's copy runs without the GIL), so the loop only ever waits for small pickles.
Errors raised in the pool (``ServerError`` and its code included) reach the caller as if raised here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from dl_inference.errors import InternalError

log = logging.getLogger(__name__)

OFFLOAD_BYTES = 1 << 20
POOL_PROCESSES = 2  # two large bodies are handled at once; more wait their turn, never the loop

E = TypeVar("E")
Work = Callable[..., tuple[bytes, E]]  # fn(body, *args) -> (bytes out, small picklable extras)

_lock = threading.Lock()
_pool: concurrent.futures.ProcessPoolExecutor | None = None


def _spool_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _write(data: bytes) -> str:
    fd, path = tempfile.mkstemp(prefix="dl-inference-", dir=_spool_dir())
    try:
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path


def _read(path: str) -> bytes:
    """The file's bytes, and the file removed."""
    try:
        with open(path, "rb", buffering=0) as f:
            return f.readall()
    finally:
        os.unlink(path)


def _in_helper(path: str, fn: Work[E], args: tuple[Any, ...]) -> tuple[str, E]:
    out, extras = fn(_read(path), *args)
    return _write(out), extras


def _discard(future: asyncio.Future[tuple[str, Any]]) -> None:
    if not future.cancelled() and future.exception() is None:
        os.unlink(future.result()[0])


def _executor() -> concurrent.futures.ProcessPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            processes = max(1, min(POOL_PROCESSES, os.cpu_count() or 1))
            _pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
            log.info("started %d helper process(es) for large request and response bodies", processes)
        return _pool


async def call(fn: Work[E], body: bytes, *args: Any, cost: int | None = None) -> tuple[bytes, E]:
    """``fn(body, *args)``: inline when ``cost`` (default: the body's length) is small, else in a helper.

    ``fn`` must be a module-level function; ``args`` and the extras it returns must pickle (small).
    ``cost`` is the bytes the C parsers would walk (an HTTP body's JSON part, not its binary tensors).
    """
    if (len(body) if cost is None else cost) < OFFLOAD_BYTES:
        return fn(body, *args)
    path = await asyncio.to_thread(_write, body)
    future = asyncio.get_running_loop().run_in_executor(_executor(), _in_helper, path, fn, args)
    try:
        out_path, extras = await asyncio.shield(future)
    except asyncio.CancelledError:  # the client went away: the helper's answer is removed when it comes
        future.add_done_callback(_discard)
        raise
    except concurrent.futures.process.BrokenProcessPool as exc:
        shutdown()  # a helper died (OOM-killed?): the next large body gets a fresh pool
        raise InternalError(f"the helper process handling a {len(body)}-byte body died: {exc}") from None
    finally:
        if os.path.exists(path):  # the helper removes it once read; not if it failed first
            os.unlink(path)
    return await asyncio.to_thread(_read, out_path), extras


def shutdown() -> None:
    """Stop the pool's processes (idempotent; a later :func:`call` starts a new pool)."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
