"""GPU memory and a stream for one model instance, through cuda-python (or pycuda).

Used by the TensorRT backend, which hands TensorRT raw device pointers and a stream handle:

* :func:`load_cuda_api` picks a binding: cuda-python's ``cuda.bindings.runtime`` (cuda-python >= 12.6),
  else its older ``cuda.cudart`` layout, else ``pycuda.driver``. All three are behind one small
  interface, :class:`CudaApi`, so the backend (and its tests, with a fake) never see which.
* :class:`DeviceBuffer` / :class:`PinnedBuffer`: a device allocation and a page-locked host
  allocation (``cudaHostAlloc``) that grow as needed and are reused between batches.
* :class:`InstanceMemory`: one instance's stream (``cudaStreamNonBlocking``) and its named buffers:
  ``upload`` copies an array to the device asynchronously (small ones staged through pinned memory,
  from 1 MiB straight from the array: see :data:`DIRECT_COPY_MIN_BYTES`),
  ``download`` copies device memory back into pinned memory asynchronously, ``synchronize`` waits.

Every CUDA call's status is checked; a failure raises :class:`CudaError`, a
:class:`~dl_inference.errors.ServerError` whose message names the call and CUDA's error name
(``cudaMalloc(1.0 TiB): cudaErrorMemoryAllocation (out of memory)``).

This module imports only numpy, ctypes and :mod:`dl_inference.errors` (no generated protobuf code), so
``scripts/gpu_check_cuda_memory.py`` can exercise it on a GPU machine whose protobuf is old. The
cuda-python runtime path is what that script runs; the ``cuda.cudart`` and pycuda paths have not been
run here (neither is installed on the GPU machine used).
"""

from __future__ import annotations

import abc
import ctypes
import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from dl_inference.errors import Code, ServerError

log = logging.getLogger(__name__)

__all__ = [
    "CudaApi",
    "CudaError",
    "CudaUnavailable",
    "DeviceBuffer",
    "InstanceMemory",
    "PinnedBuffer",
    "Stream",
    "cuda_available",
    "format_bytes",
    "load_cuda_api",
]

_ALIGN = 512  # allocation sizes are rounded up to this

#: Inputs this large or larger go to the device straight from their numpy memory; smaller ones through
#: a pinned staging buffer. Measured on an H200 with cuda-python 13.3 (scripts/gpu_check_cuda_memory.py,
#: fresh numpy arrays, upload + synchronize): 64 KiB staged 0.023 ms vs direct 0.031 ms; 1 MiB staged
#: 0.122 ms vs direct 0.099 ms; 8 MiB 0.96 vs 0.67 ms; 36.8 MiB 7.0 vs 3.1 ms. Above ~1 MiB the host
#: memcpy into pinned memory costs more than CUDA's own staging of a pageable copy.
DIRECT_COPY_MIN_BYTES = 1 << 20


class CudaError(ServerError):
    """A CUDA call failed; ``error_name`` is CUDA's name for the status (``cudaErrorMemoryAllocation``)."""

    code = Code.INTERNAL

    def __init__(self, call: str, error_name: str, detail: str = "") -> None:
        super().__init__(f"CUDA call {call} failed: {error_name}" + (f" ({detail})" if detail else ""))
        self.call = call
        self.error_name = error_name


class CudaUnavailable(ServerError):
    """No CUDA binding (cuda-python, pycuda) can be imported, or no GPU is visible."""

    code = Code.FAILED_PRECONDITION


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # not reached


@dataclass(frozen=True)
class Stream:
    """A CUDA stream: ``handle`` is the ``cudaStream_t`` as an integer (what TensorRT's
    ``execute_async_v3`` takes); ``raw`` is the binding's own object."""

    handle: int
    raw: Any


class CudaApi(abc.ABC):
    """The few CUDA runtime calls the TensorRT backend needs. Pointers are plain ints."""

    #: e.g. "cuda-python 12.8.0 (cuda.bindings.runtime)"
    name: str = ""

    @abc.abstractmethod
    def device_count(self) -> int: ...

    @abc.abstractmethod
    def set_device(self, device: int) -> None:
        """Make ``device`` current for the calling thread."""

    @abc.abstractmethod
    def device_name(self, device: int) -> str: ...

    @abc.abstractmethod
    def compute_capability(self, device: int) -> tuple[int, int]: ...

    @abc.abstractmethod
    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current device."""

    @abc.abstractmethod
    def malloc(self, nbytes: int) -> int: ...

    @abc.abstractmethod
    def free(self, ptr: int) -> None: ...

    @abc.abstractmethod
    def host_alloc(self, nbytes: int) -> int:
        """Page-locked host memory (what makes asynchronous copies asynchronous)."""

    @abc.abstractmethod
    def free_host(self, ptr: int) -> None: ...

    @abc.abstractmethod
    def stream_create(self) -> Stream: ...

    @abc.abstractmethod
    def stream_destroy(self, stream: Stream) -> None: ...

    @abc.abstractmethod
    def stream_synchronize(self, stream: Stream) -> None: ...

    @abc.abstractmethod
    def memcpy_htod_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None: ...

    @abc.abstractmethod
    def memcpy_dtoh_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None: ...


# --- cuda-python ----------------------------------------------------------------------------------


class CudaRuntimeApi(CudaApi):
    """cuda-python's runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6).
    Each call returns ``(cudaError_t, results...)``; :meth:`_check` turns a failure into CudaError."""

    def __init__(self, rt: Any, module_name: str, version: str = "?") -> None:
        self.rt = rt
        self.name = f"cuda-python {version} ({module_name})"
        self._success = rt.cudaError_t.cudaSuccess

    def _error_name(self, err: Any) -> tuple[str, str]:
        name = getattr(err, "name", None)
        detail = ""
        try:
            _, text = self.rt.cudaGetErrorString(err)
            detail = text.decode() if isinstance(text, bytes) else str(text)
        except Exception:
            pass
        if not isinstance(name, str):
            try:
                _, raw = self.rt.cudaGetErrorName(err)
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
            except Exception:
                name = f"CUDA error {int(err)}"
        return name, detail

    def _check(self, call: str, result: Any) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if err != self._success:
            name, detail = self._error_name(err)
            raise CudaError(call, name, detail)
        if not isinstance(result, tuple) or len(result) == 1:
            return None
        return result[1] if len(result) == 2 else result[1:]

    def device_count(self) -> int:
        return int(self._check("cudaGetDeviceCount()", self.rt.cudaGetDeviceCount()))

    def set_device(self, device: int) -> None:
        self._check(f"cudaSetDevice({device})", self.rt.cudaSetDevice(device))

    def _props(self, device: int) -> Any:
        return self._check(f"cudaGetDeviceProperties({device})", self.rt.cudaGetDeviceProperties(device))

    def device_name(self, device: int) -> str:
        raw = self._props(device).name
        text = raw.decode(errors="replace") if isinstance(raw, bytes | bytearray) else str(raw)
        return text.split("\x00", 1)[0].strip()

    def compute_capability(self, device: int) -> tuple[int, int]:
        props = self._props(device)
        return int(props.major), int(props.minor)

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self._check("cudaMemGetInfo()", self.rt.cudaMemGetInfo())
        return int(free), int(total)

    def malloc(self, nbytes: int) -> int:
        return int(self._check(f"cudaMalloc({format_bytes(nbytes)})", self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self._check("cudaFree", self.rt.cudaFree(ptr))

    def host_alloc(self, nbytes: int) -> int:
        return int(
            self._check(
                f"cudaHostAlloc({format_bytes(nbytes)})", self.rt.cudaHostAlloc(nbytes, self.rt.cudaHostAllocDefault)
            )
        )

    def free_host(self, ptr: int) -> None:
        self._check("cudaFreeHost", self.rt.cudaFreeHost(ptr))

    def stream_create(self) -> Stream:
        raw = self._check("cudaStreamCreateWithFlags", self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))
        return Stream(int(raw), raw)

    def stream_destroy(self, stream: Stream) -> None:
        self._check("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream.raw))

    def stream_synchronize(self, stream: Stream) -> None:
        self._check("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream.raw))

    def memcpy_htod_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(
            f"cudaMemcpyAsync(host to device, {format_bytes(nbytes)})",
            self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream.raw),
        )

    def memcpy_dtoh_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(
            f"cudaMemcpyAsync(device to host, {format_bytes(nbytes)})",
            self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream.raw),
        )


# --- pycuda (not run here: the GPU machine used has no pycuda) --------------------------------------


class PyCudaApi(CudaApi):
    """``pycuda.driver`` behind :class:`CudaApi`, on each device's primary context (shared with the
    CUDA runtime, which TensorRT uses). Not exercised on a GPU by this project's checks."""

    def __init__(self, drv: Any) -> None:
        drv.init()
        self.drv = drv
        self.name = f"pycuda {getattr(importlib.import_module('pycuda'), 'VERSION_TEXT', '?')}"
        self._contexts: dict[int, Any] = {}
        self._device_allocs: dict[int, Any] = {}
        self._host_allocs: dict[int, np.ndarray] = {}
        self._local = threading.local()

    def _call(self, call: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self.drv.Error as exc:
            raise CudaError(call, type(exc).__name__, str(exc)) from exc

    def device_count(self) -> int:
        return int(self._call("cuDeviceGetCount", self.drv.Device.count))

    def set_device(self, device: int) -> None:
        if getattr(self._local, "device", None) == device:
            return
        if device not in self._contexts:
            self._contexts[device] = self._call(
                "cuDevicePrimaryCtxRetain", self.drv.Device(device).retain_primary_context
            )
        if getattr(self._local, "device", None) is not None:
            self.drv.Context.pop()
        self._call("cuCtxPushCurrent", self._contexts[device].push)
        self._local.device = device

    def device_name(self, device: int) -> str:
        return str(self.drv.Device(device).name())

    def compute_capability(self, device: int) -> tuple[int, int]:
        major, minor = self.drv.Device(device).compute_capability()
        return int(major), int(minor)

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self._call("cuMemGetInfo", self.drv.mem_get_info)
        return int(free), int(total)

    def malloc(self, nbytes: int) -> int:
        alloc = self._call(f"cuMemAlloc({format_bytes(nbytes)})", self.drv.mem_alloc, nbytes)
        self._device_allocs[int(alloc)] = alloc
        return int(alloc)

    def free(self, ptr: int) -> None:
        alloc = self._device_allocs.pop(ptr, None)
        if alloc is not None:
            self._call("cuMemFree", alloc.free)

    def host_alloc(self, nbytes: int) -> int:
        array = self._call(f"cuMemHostAlloc({format_bytes(nbytes)})", self.drv.pagelocked_empty, nbytes, np.uint8)
        ptr = int(array.ctypes.data)
        self._host_allocs[ptr] = array
        return ptr

    def free_host(self, ptr: int) -> None:
        array = self._host_allocs.pop(ptr, None)
        base: Any = None if array is None else array.base  # pycuda's HostAllocation
        if base is not None:
            self._call("cuMemFreeHost", base.free)

    def stream_create(self) -> Stream:
        raw = self._call("cuStreamCreate", self.drv.Stream)
        return Stream(int(raw.handle), raw)

    def stream_destroy(self, stream: Stream) -> None:
        pass  # pycuda destroys the stream when its object goes

    def stream_synchronize(self, stream: Stream) -> None:
        self._call("cuStreamSynchronize", stream.raw.synchronize)

    def memcpy_htod_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        host = (ctypes.c_ubyte * nbytes).from_address(src)
        self._call("cuMemcpyHtoDAsync", self.drv.memcpy_htod_async, dst, host, stream.raw)

    def memcpy_dtoh_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        host = (ctypes.c_ubyte * nbytes).from_address(dst)
        self._call("cuMemcpyDtoHAsync", self.drv.memcpy_dtoh_async, host, src, stream.raw)


def load_cuda_api(prefer: str | None = None) -> CudaApi:
    """The first CUDA binding that imports: ``cuda.bindings.runtime``, ``cuda.cudart``, ``pycuda``.

    ``prefer`` (one of those module names) tries that one only. Raises :class:`CudaUnavailable`
    listing what was tried.
    """
    candidates = [prefer] if prefer else ["cuda.bindings.runtime", "cuda.cudart", "pycuda.driver"]
    tried: list[str] = []
    for module_name in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            tried.append(f"{module_name}: {exc}")
            continue
        if module_name == "pycuda.driver":
            return PyCudaApi(module)
        version = "?"
        for owner in ("cuda.bindings", "cuda"):
            try:
                version = str(getattr(importlib.import_module(owner), "__version__", version))
                break
            except ImportError:
                continue
        return CudaRuntimeApi(module, module_name, version)
    raise CudaUnavailable(
        "no CUDA Python binding in this environment (pip install cuda-python, or pycuda); tried " + "; ".join(tried)
    )


def cuda_available() -> bool:
    """A CUDA binding imports and sees at least one GPU."""
    try:
        return load_cuda_api().device_count() > 0
    except ServerError:
        return False


# --- buffers --------------------------------------------------------------------------------------


def _grow(capacity: int, needed: int) -> int:
    size = max(needed, 2 * capacity, 1)
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN


class _GrowingBuffer:
    """An allocation that grows (to at least double its size) when a larger one is needed; the old
    contents are not kept when it grows. Subclasses say how to allocate and free."""

    def __init__(self, api: CudaApi, label: str = "") -> None:
        self.api = api
        self.label = label
        self.ptr = 0
        self.capacity = 0

    def _alloc(self, size: int) -> int:
        raise NotImplementedError

    def _free(self, ptr: int) -> None:
        raise NotImplementedError

    def ensure(self, nbytes: int) -> int:
        """A pointer to at least ``nbytes`` bytes."""
        if nbytes > self.capacity or self.ptr == 0:
            size = _grow(self.capacity, nbytes)
            self.release()
            self.ptr = self._alloc(size)
            self.capacity = size
        return self.ptr

    def release(self) -> None:
        if self.ptr:
            ptr, self.ptr, self.capacity = self.ptr, 0, 0
            self._free(ptr)


class DeviceBuffer(_GrowingBuffer):
    """A device allocation."""

    def _alloc(self, size: int) -> int:
        return self.api.malloc(size)

    def _free(self, ptr: int) -> None:
        self.api.free(ptr)


class PinnedBuffer(_GrowingBuffer):
    """Page-locked host memory; :meth:`view` is a numpy array over it, valid until the buffer grows
    or is released."""

    def _alloc(self, size: int) -> int:
        return self.api.host_alloc(size)

    def _free(self, ptr: int) -> None:
        self.api.free_host(ptr)

    def view(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * dtype.itemsize
        if nbytes == 0:
            return np.empty(shape, dtype)
        if nbytes > self.capacity:
            raise ValueError(f"pinned buffer {self.label!r} holds {self.capacity} bytes, {nbytes} asked for")
        raw = (ctypes.c_ubyte * nbytes).from_address(self.ptr)
        return np.ctypeslib.as_array(raw).view(dtype).reshape(shape)


class InstanceMemory:
    """One model instance's stream and named device/pinned buffers on one GPU.

    Not thread-safe: one batch at a time (the backend holds a lock around each call).
    """

    def __init__(
        self, api: CudaApi, device_id: int = 0, direct_copy_min_bytes: int | None = DIRECT_COPY_MIN_BYTES
    ) -> None:
        self.api = api
        self.device_id = device_id
        #: inputs at least this large are copied to the device straight from their own (pageable) memory
        #: instead of through a pinned staging buffer; None: always staged.
        self.direct_copy_min_bytes = direct_copy_min_bytes
        api.set_device(device_id)
        self.stream = api.stream_create()
        self._device: dict[str, DeviceBuffer] = {}
        self._pinned: dict[str, PinnedBuffer] = {}

    def activate(self) -> None:
        """Make this instance's GPU current for the calling thread."""
        self.api.set_device(self.device_id)

    def device(self, name: str, nbytes: int) -> int:
        """Device pointer of buffer ``name``, grown to at least ``nbytes``."""
        buffer = self._device.get(name)
        if buffer is None:
            buffer = self._device[name] = DeviceBuffer(self.api, name)
        return buffer.ensure(nbytes)

    def pinned(self, name: str, nbytes: int) -> PinnedBuffer:
        buffer = self._pinned.get(name)
        if buffer is None:
            buffer = self._pinned[name] = PinnedBuffer(self.api, name)
        buffer.ensure(nbytes)
        return buffer

    def upload(self, name: str, array: np.ndarray) -> int:
        """Copy ``array`` to device buffer ``name`` on the stream (through pinned memory below
        ``direct_copy_min_bytes``); returns the device pointer. The copy is asynchronous:
        :meth:`synchronize` before reusing ``name``."""
        array = np.ascontiguousarray(array)
        nbytes = array.nbytes
        dptr = self.device(name, nbytes)
        if not nbytes:
            return dptr
        if self.direct_copy_min_bytes is not None and nbytes >= self.direct_copy_min_bytes:
            # From pageable memory CUDA stages the bytes itself and returns once the source was read.
            self.api.memcpy_htod_async(dptr, array.ctypes.data, nbytes, self.stream)
            return dptr
        host = self.pinned(f"in:{name}", nbytes)
        ctypes.memmove(host.ptr, array.ctypes.data, nbytes)
        self.api.memcpy_htod_async(dptr, host.ptr, nbytes, self.stream)
        return dptr

    def download(self, name: str, dptr: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """Queue a copy of ``shape``/``dtype`` bytes at ``dptr`` into pinned memory; returns the
        pinned view, readable after :meth:`synchronize` and until ``name`` is downloaded again."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        host = self.pinned(f"out:{name}", nbytes)
        if nbytes:
            self.api.memcpy_dtoh_async(host.ptr, dptr, nbytes, self.stream)
        return host.view(dtype, shape)

    def synchronize(self) -> None:
        self.api.stream_synchronize(self.stream)

    @property
    def device_bytes(self) -> int:
        return sum(b.capacity for b in self._device.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(b.capacity for b in self._pinned.values())

    def close(self) -> None:
        """Wait for the stream, free every buffer, destroy the stream. Errors are logged, not raised
        (this runs on unload, possibly after a CUDA failure)."""
        try:
            self.activate()
            self.synchronize()
        except ServerError as exc:
            log.warning("closing GPU memory of device %d: %s", self.device_id, exc.message)
        buffers: list[DeviceBuffer | PinnedBuffer] = [*self._device.values(), *self._pinned.values()]
        for buffer in buffers:
            try:
                buffer.release()
            except ServerError as exc:
                log.warning("freeing %s: %s", buffer.label, exc.message)
        self._device.clear()
        self._pinned.clear()
        try:
            self.api.stream_destroy(self.stream)
        except ServerError as exc:
            log.warning("destroying the stream: %s", exc.message)
