"""CUDA shared-memory regions in a worker: ``cudaIpcOpenMemHandle`` once per registration, copies per use.

A client allocates device memory, exports it with ``cudaIpcGetMemHandle`` and registers the 64-byte
handle. This worker opens the handle on the region's device (cuda-python's runtime bindings) and
copies input bytes to host memory for the backend and output bytes back into the region; the
device pointer itself is available (:meth:`CudaRegions.device_pointer`) for backends that take
device memory. Only run on a GPU machine (``scripts/gpu_check_cuda_shm.py``): this machine has none.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np

from dl_inference.errors import InvalidArgument, Unavailable
from dl_inference.sharedmem.params import Location


def _runtime() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError:
            raise Unavailable(
                "this worker cannot use CUDA shared memory: cuda-python is not installed (pip install cuda-python)"
            ) from None
    return runtime


class CudaRegions:
    """Opened IPC handles of this worker, by registration (``Location.generation``)."""

    def __init__(self) -> None:
        self.rt = _runtime()
        self._open: dict[int, tuple[int, int]] = {}  # generation -> (device, device pointer)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    def _check(self, call: str, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, name = self.rt.cudaGetErrorName(err)
            raise InvalidArgument(f"{call} failed: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else rest

    def device_pointer(self, name: str, loc: Location) -> int:
        """The device address of region ``name`` in this process (opened on first use)."""
        with self._lock:
            opened = self._open.get(loc.generation)
            if opened is not None:
                return opened[1]
            self._check(f"cudaSetDevice({loc.device_id})", self.rt.cudaSetDevice(loc.device_id))
            handle = self.rt.cudaIpcMemHandle_t()
            if hasattr(handle, "getPtr"):  # cuda-bindings >= 13: no 'reserved' attribute
                ctypes.memmove(handle.getPtr(), loc.handle, len(loc.handle))
            else:
                handle.reserved = loc.handle
            try:
                ptr = self._check(
                    f"cudaIpcOpenMemHandle (region '{name}')",
                    self.rt.cudaIpcOpenMemHandle(handle, self.rt.cudaIpcMemLazyEnablePeerAccess),
                )
            except InvalidArgument as exc:
                raise InvalidArgument(
                    f"CUDA shared-memory region '{name}' cannot be opened in this worker: {exc.message}"
                ) from None
            self._open[loc.generation] = (loc.device_id, int(ptr))
            return int(ptr)

    def read(self, name: str, loc: Location, offset: int, nbytes: int) -> bytes:
        ptr = self.device_pointer(name, loc)
        out = bytearray(nbytes)
        if nbytes:
            host = (ctypes.c_char * nbytes).from_buffer(out)
            kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._check(
                "cudaMemcpy (device to host)", self.rt.cudaMemcpy(ctypes.addressof(host), ptr + offset, nbytes, kind)
            )
        return bytes(out)

    def write(self, name: str, loc: Location, offset: int, data: np.ndarray) -> None:
        ptr = self.device_pointer(name, loc)
        if data.nbytes:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._check(
                "cudaMemcpy (host to device)", self.rt.cudaMemcpy(ptr + offset, data.ctypes.data, data.nbytes, kind)
            )

    def forget(self, generation: int) -> None:
        with self._lock:
            opened = self._open.pop(generation, None)
        if opened is not None:
            self.rt.cudaSetDevice(opened[0])
            self.rt.cudaIpcCloseMemHandle(opened[1])

    def close(self) -> None:
        for generation in list(self._open):
            self.forget(generation)
