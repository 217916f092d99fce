"""A worker's side of shared memory: map each region once, read inputs in place, write outputs into it.

Regions come as :class:`~dl_inference.sharedmem.params.Location` s from the gateway, which has
already checked each tensor's offset and size against the registered region; the checks here are
repeated (cheap) so a worker never touches memory outside a region whatever it is sent.

* System regions are ``mmap`` s of the /dev/shm file, kept per registration (``generation``) until
  the gateway says the region is gone (:meth:`RegionMaps.forget`). The file must still be the one
  registered (same inode), and before each use it must still be long enough: a client that shrinks
  its file under a mapping would otherwise make the worker fault (SIGBUS) on access. Inputs are
  zero-copy views of the mapping; for a GPU backend the mapping is page-locked (``cudaHostRegister``)
  once, so inputs go from the client's memory to the GPU by DMA.
* CUDA regions are opened with ``cudaIpcOpenMemHandle`` (cuda-python) in this process and copied to
  host memory for the backend, and outputs are copied into them (:mod:`.cuda`).
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dl_inference.errors import InvalidArgument
from dl_inference.protocol.datatypes import numpy_dtype
from dl_inference.protocol.tensors import tensor_to_raw
from dl_inference.sharedmem.params import CUDA, Location, TensorRef

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")


@dataclass(slots=True)
class _Mapped:
    fd: int
    mm: mmap.mmap
    writable: bool
    pinned_at: int = 0  # address registered with CUDA (page-locked), 0 when not


class HostPinning(Protocol):
    """A backend that page-locks host memory for DMA to its GPU (the PyTorch backend on a GPU)."""

    def pin_host_memory(self, address: int, nbytes: int) -> bool: ...

    def unpin_host_memory(self, address: int) -> None: ...


class RegionMaps:
    """The regions this worker has mapped, by registration."""

    def __init__(self, shm_dir: Path = SHM_DIR, pinning: HostPinning | None = None) -> None:
        self.shm_dir = shm_dir
        # page-locks each system region once it is mapped, so its inputs go to the GPU without a host copy
        self.pinning = pinning
        self._system: dict[int, _Mapped] = {}
        self._cuda: Any = None  # .cuda.CudaRegions, created on the first CUDA region
        self._lock = threading.Lock()  # inputs map on the event loop, outputs on the batch thread

    def __len__(self) -> int:
        return len(self._system) + (len(self._cuda) if self._cuda is not None else 0)

    # -- system regions -----------------------------------------------------------------------
    def _map(self, name: str, loc: Location) -> _Mapped:
        with self._lock:
            mapped = self._system.get(loc.generation)
            if mapped is not None:
                return mapped
            path = self.shm_dir / loc.key
            writable = True
            try:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                except PermissionError:
                    fd, writable = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), False
            except OSError as exc:
                raise InvalidArgument(
                    f"shared-memory region '{name}': cannot open {loc.key!r}: {exc.strerror}"
                ) from None
            try:
                st = os.fstat(fd)
                if st.st_ino != loc.inode:
                    raise InvalidArgument(
                        f"shared-memory region '{name}': {loc.key!r} was replaced after it was registered; "
                        "register it again"
                    )
                length = loc.offset + loc.byte_size
                self._check_length(name, loc, st.st_size)
                access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
                mm = mmap.mmap(fd, length, access=access)
            except BaseException:
                os.close(fd)
                raise
            mapped = self._system[loc.generation] = _Mapped(fd, mm, writable)
            if self.pinning is not None:
                address = np.frombuffer(mm, dtype=np.uint8).ctypes.data
                if self.pinning.pin_host_memory(address, length):
                    mapped.pinned_at = address
            return mapped

    @staticmethod
    def _check_length(name: str, loc: Location, size: int) -> None:
        if size < loc.offset + loc.byte_size:
            raise InvalidArgument(
                f"shared-memory region '{name}': {loc.key!r} is now {size} bytes, shorter than the "
                f"{loc.offset + loc.byte_size} registered"
            )

    def _system_view(self, name: str, loc: Location, ref: TensorRef, label: str) -> memoryview:
        _check_ref(name, loc, ref, label)
        mapped = self._map(name, loc)
        self._check_length(name, loc, os.fstat(mapped.fd).st_size)
        start = loc.offset + ref.offset
        return memoryview(mapped.mm)[start : start + ref.byte_size]

    # -- the request path ---------------------------------------------------------------------
    def read_input(self, name: str, loc: Location, ref: TensorRef, label: str, device_ok: bool = False) -> Any:
        """The ``ref.byte_size`` bytes of an input: a view of a system region; of a CUDA region, a host
        copy, or with ``device_ok`` the device bytes in place (a :class:`.cuda.DeviceArray`)."""
        if loc.kind == CUDA:
            _check_ref(name, loc, ref, label)
            if device_ok:
                return self._cuda_regions().device_view(name, loc, ref.offset, ref.byte_size)
            return self._cuda_regions().read(name, loc, ref.offset, ref.byte_size)
        return self._system_view(name, loc, ref, label)

    def write_output(self, name: str, loc: Location, ref: TensorRef, arr: np.ndarray, datatype: str, label: str) -> int:
        """Write ``arr`` (as V2 ``datatype``) at ``ref`` in region ``name``; the bytes written.

        InvalidArgument when the output needs more than ``ref.byte_size`` bytes (nothing is written).
        """
        _check_ref(name, loc, ref, label)
        fixed = datatype != "BYTES" and arr.dtype == numpy_dtype(datatype) and arr.flags.c_contiguous
        data: Any = arr if fixed else np.frombuffer(tensor_to_raw(arr, datatype), dtype=np.uint8)
        nbytes = int(data.nbytes)
        if nbytes > ref.byte_size:
            raise InvalidArgument(
                f"{label}: shared_memory_byte_size {ref.byte_size} of region '{name}' is too small: "
                f"the output takes {nbytes} bytes"
            )
        flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if loc.kind == CUDA:
            self._cuda_regions().write(name, loc, ref.offset, flat)
            return nbytes
        view = self._system_view(name, loc, TensorRef(ref.region, ref.offset, nbytes), label)
        if not self._system[loc.generation].writable:
            raise InvalidArgument(f"{label}: shared-memory region '{name}' is read-only to this server")
        np.frombuffer(view, dtype=np.uint8)[:] = flat
        return nbytes

    def _cuda_regions(self) -> Any:
        if self._cuda is None:
            from dl_inference.sharedmem.cuda import CudaRegions  # only workers that see a CUDA region

            self._cuda = CudaRegions()
        return self._cuda

    # -- lifecycle ----------------------------------------------------------------------------
    def forget(self, generations: Iterable[int]) -> None:
        """Drop the mappings of regions the gateway no longer has (unregistered or swept)."""
        for generation in generations:
            with self._lock:
                mapped = self._system.pop(generation, None)
            if mapped is not None:
                if mapped.pinned_at and self.pinning is not None:
                    self.pinning.unpin_host_memory(mapped.pinned_at)
                _close(mapped)
            if self._cuda is not None:
                self._cuda.forget(generation)

    def close(self) -> None:
        self.forget(list(self._system))
        if self._cuda is not None:
            self._cuda.close()


def _check_ref(name: str, loc: Location, ref: TensorRef, label: str) -> None:
    if ref.offset + ref.byte_size > loc.byte_size:
        raise InvalidArgument(
            f"{label}: shared_memory_offset {ref.offset} + shared_memory_byte_size {ref.byte_size} "
            f"exceeds the {loc.byte_size} bytes of region '{name}'"
        )


def _close(mapped: _Mapped) -> None:
    os.close(mapped.fd)
    try:
        mapped.mm.close()
    except BufferError:  # arrays still view it: the mapping goes when the last of them does
        log.debug("shared-memory mapping still referenced; unmapped when released")
