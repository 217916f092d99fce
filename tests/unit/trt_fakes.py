"""FAKE TensorRT and CUDA for unit tests: real TensorRT has NOT run in this project.

TensorRT cannot be installed on the machines this project is developed on, so these fakes stand in
for it to test *our* logic (which calls we make, with which arguments, in which order, and what we do
with the results). They follow the shape of TensorRT 10/11's Python API but do not optimise
anything: a "plan" is a JSON header plus the ONNX model's bytes, and "executing" it runs the ONNX
model with ONNX Runtime on the bytes found at the device addresses the backend set. Passing tests
here say nothing about whether real TensorRT accepts the calls.

* :class:`FakeCuda` is a :class:`~dl_inference.backends.cuda_memory.CudaApi` whose device memory is
  host ``bytearray`` s at made-up addresses, and whose "pinned" memory is real host memory.
* :func:`make_fake_tensorrt` returns a fresh module to put in ``sys.modules["tensorrt"]``; it
  records builders, configs, contexts and their calls in ``module.record``.
"""

from __future__ import annotations

import base64
import ctypes
import enum
import json
import types
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

from dl_inference.backends.cuda_memory import CudaApi, CudaError, Stream, format_bytes

_MAGIC = b"FAKETRT\n"


class FakeCuda(CudaApi):
    """Device memory in bytearrays at fake addresses; records every call in ``calls``."""

    name = "fake cuda"

    def __init__(self, gpu_name: str = "NVIDIA H200", cc: tuple[int, int] = (9, 0), malloc_limit: int | None = None):
        self.gpu_name = gpu_name
        self.cc = cc
        self.malloc_limit = malloc_limit
        self.memory: dict[int, bytearray] = {}
        self.host: dict[int, np.ndarray] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.streams: list[Stream] = []
        self.current_device: int | None = None
        self._next = 0x7F00_0000_0000

    # --- CudaApi
    def device_count(self) -> int:
        return 1

    def set_device(self, device: int) -> None:
        self.calls.append(("set_device", device))
        self.current_device = device

    def device_name(self, device: int) -> str:
        return self.gpu_name

    def compute_capability(self, device: int) -> tuple[int, int]:
        return self.cc

    def mem_get_info(self) -> tuple[int, int]:
        return 1 << 30, 1 << 31

    def malloc(self, nbytes: int) -> int:
        if self.malloc_limit is not None and nbytes > self.malloc_limit:
            raise CudaError(f"cudaMalloc({format_bytes(nbytes)})", "cudaErrorMemoryAllocation", "out of memory")
        ptr = self._next
        self._next += (nbytes + 0xFFFF) // 0x10000 * 0x10000 + 0x10000
        self.memory[ptr] = bytearray(nbytes)
        self.calls.append(("malloc", nbytes, ptr))
        return ptr

    def free(self, ptr: int) -> None:
        self.calls.append(("free", ptr))
        if self.memory.pop(ptr, None) is None:
            raise CudaError("cudaFree", "cudaErrorInvalidValue", "invalid argument")

    def host_alloc(self, nbytes: int) -> int:
        array = np.zeros(max(nbytes, 1), np.uint8)
        ptr = int(array.ctypes.data)
        self.host[ptr] = array
        self.calls.append(("host_alloc", nbytes, ptr))
        return ptr

    def free_host(self, ptr: int) -> None:
        self.calls.append(("free_host", ptr))
        del self.host[ptr]

    def stream_create(self) -> Stream:
        stream = Stream(0x5000 + len(self.streams), ("fake stream", len(self.streams)))
        self.streams.append(stream)
        self.calls.append(("stream_create", stream.handle))
        return stream

    def stream_destroy(self, stream: Stream) -> None:
        self.calls.append(("stream_destroy", stream.handle))

    def stream_synchronize(self, stream: Stream) -> None:
        self.calls.append(("stream_synchronize", stream.handle))

    def memcpy_htod_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        self.calls.append(("htod", dst, src, nbytes, stream.handle))
        self.write(dst, ctypes.string_at(src, nbytes))

    def memcpy_dtoh_async(self, dst: int, src: int, nbytes: int, stream: Stream) -> None:
        self.calls.append(("dtoh", dst, src, nbytes, stream.handle))
        ctypes.memmove(dst, self.read(src, nbytes), nbytes)

    # --- helpers for fakes and tests
    def _locate(self, ptr: int, nbytes: int) -> tuple[bytearray, int]:
        for base, buf in self.memory.items():
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return buf, ptr - base
        raise CudaError("memory access", "cudaErrorIllegalAddress", f"{nbytes} bytes at {ptr:#x} are not allocated")

    def read(self, ptr: int, nbytes: int) -> bytes:
        buf, offset = self._locate(ptr, nbytes)
        return bytes(buf[offset : offset + nbytes])

    def write(self, ptr: int, data: bytes) -> None:
        buf, offset = self._locate(ptr, len(data))
        buf[offset : offset + len(data)] = data

    def live_allocations(self) -> int:
        return len(self.memory) + len(self.host)


# --- fake tensorrt ----------------------------------------------------------------------------------

_ONNX_TO_TRT = {
    1: "FLOAT",
    10: "HALF",
    3: "INT8",
    6: "INT32",
    7: "INT64",
    9: "BOOL",
    2: "UINT8",
    16: "BF16",
    11: "DOUBLE",
}
_NUMPY = {
    "FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
    "BOOL": np.bool_, "UINT8": np.uint8, "BF16": ml_dtypes.bfloat16,
}  # fmt: skip


def make_fake_tensorrt(cuda: FakeCuda, version: str = "10.8.0.43") -> types.ModuleType:
    """A fresh FAKE ``tensorrt`` module (see the module docstring) bound to ``cuda``'s memory."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    record = types.SimpleNamespace(builders=[], configs=[], networks=[], runtimes=[], contexts=[], calibration=[])
    trt.record = record  # type: ignore[attr-defined]
    major = int(version.split(".")[0])

    DataType = enum.Enum(
        "DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16", "INT64", "DOUBLE"]
    )
    TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
    flags = ["TF32", "REFIT", "SPARSE_WEIGHTS"] + ([] if major >= 11 else ["FP16", "INT8", "BF16"])
    BuilderFlag = enum.Enum("BuilderFlag", flags)

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    class Logger:
        VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = 4, 3, 2, 1, 0

        def __init__(self, min_severity: int = 2) -> None:
            self.min_severity = min_severity

    class IProgressMonitor:
        def __init__(self) -> None:
            self.base_initialised = True

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            self.base_initialised = True

    class _NetTensor:
        def __init__(self, name: str, dtype: Any, shape: tuple[int, ...]) -> None:
            self.name, self.dtype, self.shape = name, dtype, shape

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[_NetTensor] = []
            self.outputs: list[_NetTensor] = []
            self.onnx_bytes = b""

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> _NetTensor:
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            self.network = network
            self.errors: list[str] = []

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path)
            bad = [n.op_type for n in model.graph.node if n.op_type.startswith("Unsupported")]
            if bad:
                self.errors.append(f"No importer registered for op: {bad[0]}")
                return False
            initializers = {i.name for i in model.graph.initializer}

            def tensor(v: Any) -> _NetTensor:
                tt = v.type.tensor_type
                shape = tuple(d.dim_value if d.dim_value > 0 else -1 for d in tt.shape.dim)
                return _NetTensor(v.name, DataType[_ONNX_TO_TRT[tt.elem_type]], shape)

            self.network.inputs = [tensor(v) for v in model.graph.input if v.name not in initializers]
            self.network.outputs = [tensor(v) for v in model.graph.output]
            self.network.onnx_bytes = Path(path).read_bytes()
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class ITimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data
            self.combined: list[bytes] = []

        def serialize(self) -> bytes:
            return self.data

        def combine(self, other: ITimingCache, ignore_mismatch: bool) -> bool:
            self.combined.append(other.data)
            return True

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags: set[Any] = set()
            self.pool_limits: dict[Any, int] = {}
            self.profiles: list[IOptimizationProfile] = []
            self.int8_calibrator: Any = None
            self.calibration_profile: IOptimizationProfile | None = None
            self.timing_cache: ITimingCache | None = None
            self.progress_monitor: Any = None
            self.calls: list[tuple[Any, ...]] = []
            record.configs.append(self)

        def set_flag(self, flag: Any) -> None:
            self.calls.append(("set_flag", flag.name))
            self.flags.add(flag)

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pool_limits[pool] = size

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
            self.calibration_profile = profile
            return True

        def create_timing_cache(self, data: bytes) -> ITimingCache | None:
            return None if data == b"corrupt" else ITimingCache(bytes(data))

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if cache.data.startswith(b"other-gpu"):
                return False
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.timing_cache

    class Builder:
        def __init__(self, logger: Logger) -> None:
            record.builders.append(self)

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            network = INetworkDefinition(flags)
            record.networks.append(network)
            return network

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
            monitor = config.progress_monitor
            if monitor is not None:
                assert monitor.base_initialised
                monitor.phase_start("Building engine", None, 2)
                monitor.phase_start("Tactic selection", "Building engine", 3)
                for step in range(3):
                    if not monitor.step_complete("Tactic selection", step):
                        return None
                monitor.phase_finish("Tactic selection")
                monitor.step_complete("Building engine", 0)
                monitor.step_complete("Building engine", 1)
                monitor.phase_finish("Building engine")
            profile = config.profiles[0].shapes if config.profiles else {}
            for t in network.inputs:
                if any(d < 0 for d in t.shape) and t.name not in profile:
                    return None  # TensorRT: "Network has dynamic inputs, but no optimization profile"
            if any(f.name == "INT8" for f in config.flags):
                self._calibrate(network, config)
            if config.timing_cache is not None:
                config.timing_cache.data += b"+timed"

            def desc(t: _NetTensor, is_input: bool) -> dict[str, Any]:
                rng = profile.get(t.name, (t.shape, t.shape, t.shape)) if is_input else None
                return {"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape), "profile": rng}

            header = {
                "version": version,
                "gpu": cuda.gpu_name,
                "flags": sorted(f.name for f in config.flags),
                "network_flags": network.flags,
                "inputs": [desc(t, True) for t in network.inputs],
                "outputs": [desc(t, False) for t in network.outputs],
                "onnx": base64.b64encode(network.onnx_bytes).decode(),
            }
            return _MAGIC + json.dumps(header).encode()

        @staticmethod
        def _calibrate(network: INetworkDefinition, config: IBuilderConfig) -> None:
            calibrator = config.int8_calibrator
            assert calibrator is not None and calibrator.base_initialised
            assert config.calibration_profile is not None
            if calibrator.read_calibration_cache():
                return
            names = [t.name for t in network.inputs]
            assert calibrator.get_batch_size() == 1
            while True:
                pointers = calibrator.get_batch(names)
                if pointers is None:
                    break
                batch = {}
                for t, ptr in zip(network.inputs, pointers, strict=True):
                    shape = config.calibration_profile.shapes[t.name][1]
                    dtype = np.dtype(_NUMPY[t.dtype.name])
                    nbytes = int(np.prod(shape)) * dtype.itemsize
                    batch[t.name] = np.frombuffer(cuda.read(ptr, nbytes), dtype).reshape(shape)
                record.calibration.append(batch)
            calibrator.write_calibration_cache(b"fake calibration table")

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.calls: list[tuple[Any, ...]] = []
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            record.contexts.append(self)

        def set_input_shape(self, name: str, shape: Any) -> bool:
            shape = tuple(int(d) for d in shape)
            self.calls.append(("set_input_shape", name, shape))
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
            if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
                return False
            self.shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self.shapes:
                return self.shapes[name]
            tensor = self.engine.tensors[name]
            shape = list(tensor["shape"])
            if shape and shape[0] == -1 and self.shapes:
                shape[0] = next(iter(self.shapes.values()))[0]
            return tuple(shape)

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.calls.append(("set_tensor_address", name, ptr))
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            self.calls.append(("execute_async_v3", stream_handle))
            feeds = {}
            for t in self.engine.inputs:
                shape = self.shapes[t["name"]]
                dtype = np.dtype(_NUMPY[t["dtype"]])
                raw = cuda.read(self.addresses[t["name"]], int(np.prod(shape)) * dtype.itemsize)
                feeds[t["name"]] = np.frombuffer(raw, dtype).reshape(shape)
            names = [t["name"] for t in self.engine.outputs]
            results = self.engine.session.run(names, feeds)
            for name, value in zip(names, results, strict=True):
                if name not in self.addresses:
                    return False  # TensorRT: every output needs an address
                cuda.write(self.addresses[name], np.ascontiguousarray(value).tobytes())
            return True

    class ICudaEngine:
        def __init__(self, header: dict[str, Any]) -> None:
            self.inputs = header["inputs"]
            self.outputs = header["outputs"]
            self.tensors = {t["name"]: t for t in [*self.inputs, *self.outputs]}
            self.order = [t["name"] for t in [*self.inputs, *self.outputs]]
            self.header = header
            self.session = ort.InferenceSession(base64.b64decode(header["onnx"]), providers=["CPUExecutionProvider"])
            self.num_optimization_profiles = 1

        @property
        def num_io_tensors(self) -> int:
            return len(self.order)

        def get_tensor_name(self, i: int) -> str:
            return self.order[i]

        def get_tensor_mode(self, name: str) -> Any:
            return TensorIOMode.INPUT if any(t["name"] == name for t in self.inputs) else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> Any:
            return DataType[self.tensors[name]["dtype"]]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(self.tensors[name]["shape"])

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            assert profile_index == 0
            return [tuple(s) for s in self.tensors[name]["profile"]]

        def is_shape_inference_io(self, name: str) -> bool:
            return False

        def create_execution_context(self) -> IExecutionContext:
            return IExecutionContext(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            record.runtimes.append(self)

        def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
            if not data.startswith(_MAGIC):
                return None
            header = json.loads(data[len(_MAGIC) :])
            if header["version"] != version or header["gpu"] != cuda.gpu_name:
                return None  # real TensorRT refuses engines from another version or GPU model
            return ICudaEngine(header)

    for name, value in list(locals().items()):
        if isinstance(value, type) or name in ("DataType", "TensorIOMode", "BuilderFlag"):
            setattr(trt, name, value)
    return trt
