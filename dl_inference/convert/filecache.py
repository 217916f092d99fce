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

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "cache_root",
    "file_lock",
    "new_file_mode",
    "sha256_file",
    "write_beside",
]


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


def new_file_mode(target: Path) -> int:
    """The mode ``target`` keeps: the replaced file's, else what ``open()`` gives a new file (0666 less the umask).

    ``mkstemp`` makes its files 0600; renamed into place as they are, a server running as another
    user (a container's non-root user reading a volume filled by a conversion job) could not read them.
    """
    try:
        return target.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def write_beside(target: Path, data: bytes | bytearray | memoryview) -> Path:
    """``data`` in a new temporary file in ``target``'s directory, fsynced, with :func:`new_file_mode`.

    The caller renames it onto ``target`` (or removes it); a reader of ``target`` never sees half a file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode(target))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` through :func:`write_beside` and a rename."""
    tmp = write_beside(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))
