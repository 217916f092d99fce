"""dl_inference.backends.cuda_memory: buffer growth and staging against a fake CUDA layer (always
run), cuda-python's status handling against a stand-in runtime module, and the real thing on a GPU
(skipped when no CUDA binding or GPU is present; scripts/gpu_check_cuda_memory.py is the fuller check)."""

from __future__ import annotations

import enum
import types

import numpy as np
import pytest

from dl_inference.backends.cuda_memory import (
    CudaError,
    CudaRuntimeApi,
    DeviceBuffer,
    InstanceMemory,
    PinnedBuffer,
    cuda_available,
    load_cuda_api,
)
from dl_inference.errors import Code
from tests.unit.trt_fakes import FakeCuda


def test_buffers_grow_at_least_double_and_are_reused() -> None:
    cuda = FakeCuda()
    buffer = DeviceBuffer(cuda, "x")
    first = buffer.ensure(100)
    assert buffer.capacity == 512 and buffer.ensure(512) == first
    buffer.ensure(600)
    assert buffer.capacity == 1024  # doubled
    buffer.ensure(5000)
    assert buffer.capacity == 5120  # the request when larger than double
    assert [c[0] for c in cuda.calls].count("malloc") == 3 and [c[0] for c in cuda.calls].count("free") == 2
    buffer.release()
    buffer.release()
    assert not cuda.memory


def test_pinned_views_and_round_trip() -> None:
    cuda = FakeCuda()
    pinned = PinnedBuffer(cuda, "p")
    pinned.ensure(64)
    view = pinned.view(np.dtype(np.float32), (4, 4))
    view[:] = 7
    assert pinned.view(np.dtype(np.float32), (16,)).sum() == 112
    assert pinned.view(np.dtype(np.float32), (0, 4)).shape == (0, 4)
    with pytest.raises(ValueError, match=r"holds 512 bytes, 4096 asked for"):
        pinned.view(np.dtype(np.float32), (1024,))

    memory = InstanceMemory(cuda, device_id=0)
    x = np.arange(24, dtype=np.int64).reshape(2, 12)
    ptr = memory.upload("x", x)
    back = memory.download("x", ptr, x.dtype, x.shape)
    memory.synchronize()
    np.testing.assert_array_equal(back, x)
    (htod,) = [c for c in cuda.calls if c[0] == "htod"]
    assert htod[1] == ptr and htod[3:] == (x.nbytes, memory.stream.handle)
    memory.close()
    pinned.release()
    assert cuda.live_allocations() == 0


def test_large_inputs_are_copied_without_staging() -> None:
    cuda = FakeCuda()
    memory = InstanceMemory(cuda, direct_copy_min_bytes=1024)
    small, large = np.ones(100, np.uint8), np.arange(512, dtype=np.int32)  # 100 B and 2 KiB
    memory.upload("small", small)
    memory.upload("large", large)
    copies = [c for c in cuda.calls if c[0] == "htod"]
    assert copies[0][2] in cuda.host  # staged through pinned memory
    assert copies[1][2] == large.ctypes.data  # straight from the array
    assert len([c for c in cuda.calls if c[0] == "host_alloc"]) == 1
    back = memory.download("large", copies[1][1], large.dtype, large.shape)
    np.testing.assert_array_equal(back, large)
    memory.close()


class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


def _runtime(**calls: object) -> types.SimpleNamespace:
    base = {
        "cudaError_t": _Err,
        "cudaGetErrorString": lambda err: (_Err.cudaSuccess, b"out of memory"),
        "cudaGetErrorName": lambda err: (_Err.cudaSuccess, b"cudaErrorMemoryAllocation"),
    }
    return types.SimpleNamespace(**{**base, **calls})


def test_cuda_python_statuses_become_server_errors() -> None:
    api = CudaRuntimeApi(_runtime(cudaMalloc=lambda n: (_Err.cudaErrorMemoryAllocation, 0)), "stand-in", "0")
    with pytest.raises(CudaError) as err:
        api.malloc(1 << 40)
    assert err.value.message == "CUDA call cudaMalloc(1.0 TiB) failed: cudaErrorMemoryAllocation (out of memory)"
    assert err.value.code == Code.INTERNAL and err.value.error_name == "cudaErrorMemoryAllocation"
    ok = CudaRuntimeApi(
        _runtime(cudaMalloc=lambda n: (_Err.cudaSuccess, 0xABC), cudaFree=lambda p: (_Err.cudaSuccess,)), "s"
    )
    assert ok.malloc(10) == 0xABC and ok.free(0xABC) is None


def test_missing_binding_is_a_clear_error() -> None:
    with pytest.raises(Exception, match=r"no CUDA Python binding in this environment .*no_such_module"):
        load_cuda_api("no_such_module")


@pytest.mark.skipif(not cuda_available(), reason="needs cuda-python (or pycuda) and a GPU")
def test_real_gpu_round_trip_growth_and_errors() -> None:
    api = load_cuda_api()
    memory = InstanceMemory(api, 0)
    try:
        for rows in (1, 8, 64):  # grows
            x = np.random.default_rng(rows).standard_normal((rows, 1000)).astype(np.float32)
            ptr = memory.upload("x", x)
            back = memory.download("x", ptr, x.dtype, x.shape)
            memory.synchronize()
            assert back.tobytes() == x.tobytes()
        with pytest.raises(CudaError, match=r"cudaMalloc|cuMemAlloc"):
            memory.device("huge", 1 << 50)
    finally:
        memory.close()
