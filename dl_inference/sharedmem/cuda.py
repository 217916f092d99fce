"""CUDA shared-memory regions in a worker: ``cudaIpcOpenMemHandle`` once per registration.

A client allocates device memory, exports it with ``cudaIpcGetMemHandle`` and registers the 64-byte
handle. This worker opens the handle on the region's device (cuda-python's runtime bindings). A
backend that takes device memory (``accepts_device_arrays``: the PyTorch backend on a GPU) gets its
inputs in place, as :class:`DeviceArray` s (no host copy); any other backend gets a host copy. Outputs
are copied into the region from host memory. Only run on a GPU machine
(``scripts/gpu_check_cuda_shm.py``): the CI machine has none.
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

    def device_view(self, name: str, loc: Location, offset: int, nbytes: int) -> DeviceArray:
        """The bytes in place, as a flat uint8 :class:`DeviceArray` (typed by the caller)."""
        ptr = self.device_pointer(name, loc) + offset
        return DeviceArray(
            ptr, np.dtype(np.uint8), (nbytes,), loc.device_id, lambda: self.read(name, loc, offset, nbytes)
        )

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


class DeviceArray:
    """A typed view of device memory in a CUDA region (no copy): what a backend that takes device
    memory (the PyTorch backend on a GPU) receives for an input in a CUDA region. It exposes
    ``__cuda_array_interface__`` (version 3), so ``torch.as_tensor(a, device=...)`` wraps it in place."""

    def __init__(self, ptr: int, dtype: np.dtype, shape: tuple[int, ...], device_id: int, host: Any) -> None:
        self.ptr = ptr
        self.dtype = dtype
        self.shape = shape
        self.device_id = device_id
        self._host = host  # () -> numpy copy, for anything that needs host memory after all

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3}

    def reshape(self, shape: Any) -> DeviceArray:
        shape = tuple(int(d) for d in shape)
        if int(np.prod(shape, dtype=np.int64)) != int(np.prod(self.shape, dtype=np.int64)):
            raise ValueError(f"cannot reshape {list(self.shape)} to {list(shape)}")
        return DeviceArray(self.ptr, self.dtype, shape, self.device_id, self._host)

    def typed(self, dtype: np.dtype, shape: tuple[int, ...]) -> DeviceArray:
        """The same bytes as ``dtype`` elements of ``shape`` (the caller checked the size)."""
        return DeviceArray(self.ptr, dtype, shape, self.device_id, self._host)

    def to_host(self) -> np.ndarray:
        return np.frombuffer(self._host(), dtype=self.dtype).reshape(self.shape)


class DeviceParts:
    """Several requests' rows of one input, some in device memory: concatenated by the backend
    where they will be used (on the GPU), not through host memory."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.dtype = parts[0].dtype
        self.shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def to_host(self) -> np.ndarray:
        return np.concatenate([p.to_host() if isinstance(p, DeviceArray) else p for p in parts_of(self)])


def parts_of(value: Any) -> list[Any]:
    return value.parts if isinstance(value, DeviceParts) else [value]
