"""Files shared by converters: the cache root, content hashes, a cross-process lock, atomic writes.

The same pattern as the Caffe cache (``dl_inference/convert/caffe/cache.py``), made reusable: results
live under ``$DL_INFERENCE_CACHE_DIR/<kind>`` (default ``~/.cache/dl_inference/<kind>``), never inside
the model repository; a result is written to a temporary file in the same directory and renamed into
place, so a reader sees a whole file or none; and builders take an exclusive ``flock`` on a ``.lock``
file beside the result, so several workers that want the same result at once build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "cache_root", "file_lock", "sha256_file"]


def cache_root(kind: str) -> Path:
    """``$DL_INFERENCE_CACHE_DIR/<kind>`` (default ``~/.cache/dl_inference/<kind>``); not created."""
    base = os.environ.get("DL_INFERENCE_CACHE_DIR") or str(Path.home() / ".cache" / "dl_inference")
    return Path(base) / kind


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    ``on_wait`` is called once if another holder makes us wait (to say so in the log). Locks belong
    to the open file, so two threads of one process exclude each other too. The lock file is left in
    place: removing it would let a third process lock a different inode.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write_bytes(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))
