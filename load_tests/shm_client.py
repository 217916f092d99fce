"""Load through Triton's shared-memory extensions: the tensors stay in memory shared with the server.

Used by :mod:`load_tests.loadgen` (``--shared-memory system|cuda``, as perf_analyzer's option): each of
the ``concurrency`` in-flight requests owns one input region (its inputs one after another) and one
output region, registered with the server over gRPC before the run and unregistered after it. The
request bytes are built once per slot; only region names travel.

* ``system``: POSIX shared memory (/dev/shm objects made here with ``os`` and ``mmap``).
* ``cuda``: device memory from ``cudaMalloc`` on GPU 0 exported with ``cudaIpcGetMemHandle``
  (cuda-python), so the server's worker opens it with ``cudaIpcOpenMemHandle``.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SERVICE = "/inference.GRPCInferenceService/"
KINDS = ("system", "cuda")


def _pb() -> Any:
    from dl_inference.protocol.generated import grpc_service_pb2

    return grpc_service_pb2


@dataclass
class Slot:
    """The regions of one in-flight request and its serialized request."""

    input_name: str
    output_name: str
    request: bytes = b""
    release: list[Callable[[], None]] = field(default_factory=list)


class _SystemRegion:
    def __init__(self, key: str, size: int) -> None:
        self.key = key
        self.path = f"/dev/shm/{key}"
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def write(self, offset: int, data: bytes) -> None:
        self.mm[offset : offset + len(data)] = data

    def close(self) -> None:
        self.mm.close()
        os.unlink(self.path)


class _CudaRegion:
    def __init__(self, size: int, device: int = 0) -> None:
        from cuda.bindings import runtime as rt

        self.rt = rt
        self._check(rt.cudaSetDevice(device))
        self.ptr = int(self._check(rt.cudaMalloc(size)))
        handle = self._check(rt.cudaIpcGetMemHandle(self.ptr))
        if hasattr(handle, "getPtr"):  # cuda-bindings >= 13
            self.handle = bytes((ctypes.c_char * 64).from_address(handle.getPtr()))
        else:
            self.handle = bytes(handle.reserved)
        self.device = device

    def _check(self, result: Any) -> Any:
        err, *rest = result
        if int(err) != 0:
            raise RuntimeError(f"CUDA call failed: {err}")
        return rest[0] if rest else None

    def write(self, offset: int, data: bytes) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        buf = np.frombuffer(data, np.uint8)
        self._check(self.rt.cudaMemcpy(self.ptr + offset, buf.ctypes.data, len(data), kind))

    def close(self) -> None:
        self.rt.cudaFree(self.ptr)


class SharedMemorySlots:
    """``count`` slots with registered regions, handed to one in-flight request at a time."""

    def __init__(self, channel: Any, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"shared memory kind must be one of {', '.join(KINDS)}, got {kind!r}")
        pb = _pb()
        self.kind = kind
        self.slots: list[Slot] = []
        self.free: asyncio.Queue[Slot] = asyncio.Queue()
        prefix = "SystemSharedMemory" if kind == "system" else "CudaSharedMemory"
        self._register_type = getattr(pb, prefix + "RegisterRequest")
        self._unregister_type = getattr(pb, prefix + "UnregisterRequest")
        self._register = channel.unary_unary(
            SERVICE + prefix + "Register", request_serializer=self._register_type.SerializeToString
        )
        self._unregister = channel.unary_unary(
            SERVICE + prefix + "Unregister", request_serializer=self._unregister_type.SerializeToString
        )

    async def _region(self, name: str, size: int) -> Any:
        if self.kind == "system":
            region: Any = _SystemRegion(name, size)
            await self._register(self._register_type(name=name, key="/" + name, byte_size=size))
        else:
            region = _CudaRegion(size)
            await self._register(
                self._register_type(name=name, raw_handle=region.handle, device_id=region.device, byte_size=size)
            )
        return region

    async def add(
        self,
        count: int,
        model: str,
        version: str,
        inputs: list[tuple[str, str, list[int], bytes]],
        outputs: list[tuple[str, int]],
    ) -> None:
        """``inputs``: (name, datatype, shape, raw bytes); ``outputs``: (name, byte size)."""
        pb = _pb()
        in_size = sum(len(raw) for *_, raw in inputs)
        out_size = sum(size for _, size in outputs)
        tag = f"dlinf_load_{os.getpid()}"
        for i in range(len(self.slots), len(self.slots) + count):
            slot = Slot(f"{tag}_in{i}", f"{tag}_out{i}")
            self.slots.append(slot)
            region = await self._region(slot.input_name, max(in_size, 1))
            slot.release.append(region.close)
            offset = 0
            for *_, raw in inputs:
                region.write(offset, raw)
                offset += len(raw)
            slot.release.append((await self._region(slot.output_name, max(out_size, 1))).close)
            request = pb.ModelInferRequest(model_name=model, model_version=version)
            offset = 0
            for name, datatype, shape, raw in inputs:
                tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
                _set(tensor.parameters, slot.input_name, len(raw), offset)
                offset += len(raw)
            offset = 0
            for name, size in outputs:
                _set(request.outputs.add(name=name).parameters, slot.output_name, size, offset)
                offset += size
            slot.request = request.SerializeToString()
            self.free.put_nowait(slot)

    async def close(self) -> None:
        """Unregister every region and free it."""
        for slot in self.slots:
            for name in (slot.input_name, slot.output_name):
                try:
                    await self._unregister(self._unregister_type(name=name))
                except Exception:  # the server may be gone already
                    pass
            for release in slot.release:
                release()
        self.slots.clear()


def _set(params: Any, region: str, byte_size: int, offset: int) -> None:
    params["shared_memory_region"].string_param = region
    params["shared_memory_byte_size"].int64_param = byte_size
    params["shared_memory_offset"].int64_param = offset


def fixed_nbytes(datatype: str, shape: list[int]) -> int:
    """Bytes of an output of this datatype and shape; ValueError when that is not fixed."""
    from dl_inference.protocol.datatypes import element_size

    if any(d < 0 for d in shape) or datatype == "BYTES":
        raise ValueError(f"shared-memory outputs need a fixed size, got {datatype} {shape}")
    return math.prod(shape) * element_size(datatype)
