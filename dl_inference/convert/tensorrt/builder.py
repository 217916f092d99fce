"""The TensorRT build itself: ONNX -> serialized engine, with the TensorRT 10/11 Python API.

``tensorrt`` is imported lazily by :func:`import_tensorrt`, which turns its absence into a clear
:class:`TensorRTUnavailable`. The calls made here (``trt.Builder``, ``create_network``,
``OnnxParser.parse_from_file``, ``create_builder_config``,
``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``, ``set_flag(BuilderFlag.FP16/INT8)``,
``create_optimization_profile`` / ``set_shape`` / ``add_optimization_profile``,
``IInt8EntropyCalibrator2`` + ``set_calibration_profile``, ``create_timing_cache`` /
``set_timing_cache`` / ``get_timing_cache().serialize()``, ``progress_monitor``,
``build_serialized_network``) follow NVIDIA's Python API reference. **They have not run against a real
TensorRT in this project** (it cannot be installed on the machines used); the unit tests run them
against a fake ``tensorrt`` module that records the calls (``tests/unit/fake_tensorrt.py``).
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dl_inference.backends.cuda_memory import CudaApi, InstanceMemory
from dl_inference.convert.filecache import atomic_write_bytes, file_lock
from dl_inference.convert.tensorrt.calibration import iter_calibration_batches
from dl_inference.convert.tensorrt.engine_cache import EngineRequest, TargetEnv, cache_dir
from dl_inference.convert.tensorrt.progress import BuildProgress, ElapsedTicker, make_progress_monitor
from dl_inference.convert.tensorrt.settings import TensorDesc
from dl_inference.errors import Code, InternalError, InvalidArgument, ServerError

log = logging.getLogger(__name__)

__all__ = [
    "TensorRTUnavailable",
    "build_engine",
    "calibration_batch_size",
    "current_env",
    "default_timing_cache",
    "import_tensorrt",
    "trt_logger",
]


class TensorRTUnavailable(ServerError):
    """``import tensorrt`` failed in this environment."""

    code = Code.FAILED_PRECONDITION


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` saying how to get it."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"TensorRT is not installed in this environment: {exc}. Install NVIDIA's wheels "
            "(`pip install tensorrt`, which fetches them from pypi.nvidia.com) or run in an NGC TensorRT "
            "container; building and serving engines also needs a GPU and cuda-python"
        ) from exc


_LOGGERS: dict[int, Any] = {}


def trt_logger(trt: Any) -> Any:
    """One ``trt.Logger`` per process (per ``tensorrt`` module): TensorRT warns when a builder and a
    runtime are given different logger objects, and keeps using the first."""
    logger = _LOGGERS.get(id(trt))
    if logger is None:
        logger = _LOGGERS[id(trt)] = trt.Logger(trt.Logger.WARNING)
    return logger


def current_env(trt: Any, cuda: CudaApi, device_id: int = 0) -> TargetEnv:
    """TensorRT version, name and compute capability of GPU ``device_id``."""
    major, minor = cuda.compute_capability(device_id)
    return TargetEnv(str(trt.__version__), cuda.device_name(device_id), f"{major}.{minor}")


def default_timing_cache(env: TargetEnv) -> Path:
    """One timing cache per GPU model and TensorRT version, shared by every build in the cache dir."""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "_", env.gpu_name).strip("_")
    return cache_dir() / f"timing-{gpu}-sm{env.compute_capability}-trt{env.tensorrt_version}.cache"


def calibration_batch_size(request: EngineRequest) -> int:
    """Rows per calibration batch: the setting, or min(8, max_batch_size) (1 for a model that does
    not batch)."""
    s = request.settings
    if not s.max_batch_size:
        return 1
    size = s.calibration_batch_size or min(8, s.max_batch_size)
    if size > s.max_batch_size:
        raise InvalidArgument(f"calibration batch size {size} exceeds max_batch_size {s.max_batch_size}")
    return size


# --- calibration ------------------------------------------------------------------------------------


def _make_calibrator(
    trt: Any,
    batches: Iterator[dict[str, np.ndarray]],
    memory: InstanceMemory,
    cache_path: Path,
    emit: Callable[[str], None],
    label: str,
) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``batches`` through device buffers of ``memory``."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.error: BaseException | None = None
            self.count = 0

        def get_batch_size(self) -> int:
            return 1  # explicit-batch networks: the batch is part of the calibration profile's shapes

        def get_batch(self, names: Sequence[str]) -> list[int] | None:
            # An exception must not cross into TensorRT's C++: keep it and end calibration.
            try:
                batch = next(batches, None)
                if batch is None:
                    return None
                pointers = [memory.upload(f"calibration:{name}", batch[name]) for name in names]
                memory.synchronize()
                self.count += 1
                if self.count == 1 or self.count % 10 == 0:
                    emit(f"{label}: calibration batch {self.count}")
                return pointers
            except BaseException as exc:
                self.error = exc
                return None

        def read_calibration_cache(self) -> bytes | None:
            if cache_path.exists():
                emit(f"{label}: using calibration cache {cache_path}")
                return cache_path.read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            try:
                atomic_write_bytes(cache_path, bytes(cache))
            except OSError as exc:
                log.warning("%s: cannot write calibration cache %s: %s", label, cache_path, exc)

    return _Calibrator()


# --- timing cache -----------------------------------------------------------------------------------


def _use_timing_cache(trt: Any, config: Any, path: Path, emit: Callable[[str], None], label: str) -> None:
    data = path.read_bytes() if path.exists() else b""
    cache = config.create_timing_cache(data) if data else None
    if cache is not None and config.set_timing_cache(cache, False):  # False: refuse another GPU's/version's
        emit(f"{label}: using timing cache {path} ({len(data)} bytes)")
        return
    if data:
        emit(f"{label}: timing cache {path} does not fit this TensorRT/GPU; starting a new one")
    config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: Any, path: Path, label: str) -> None:
    """Merge what this build timed into the cache file (others may have added to it meanwhile)."""
    try:
        with file_lock(path.with_name(path.name + ".lock")):
            ours = config.get_timing_cache()
            if path.exists():
                theirs = config.create_timing_cache(path.read_bytes())
                if theirs is not None:
                    ours.combine(theirs, True)
            atomic_write_bytes(path, bytes(ours.serialize()))
    except (OSError, RuntimeError) as exc:
        log.warning("%s: cannot save timing cache %s: %s", label, path, exc)


# --- build ------------------------------------------------------------------------------------------


def build_engine(
    request: EngineRequest,
    inputs: Sequence[TensorDesc],
    env: TargetEnv,
    *,
    trt: Any,
    cuda: CudaApi | None = None,
    device_id: int = 0,
    emit: Callable[[str], None] = log.info,
    label: str = "model",
    tick_seconds: float = 30.0,
) -> bytes:
    """Build ``request`` into serialized engine bytes. ``cuda`` is needed for INT8 calibration.

    Raises InvalidArgument when the parser rejects the ONNX file or its inputs differ from the
    profile's, and InternalError when TensorRT builds nothing (its own log says why).
    """
    s = request.settings
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if request.strongly_typed:  # TensorRT 11 is always strongly typed; the flag is accepted there too
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    emit(f"{label}: parsing {request.onnx_path}")
    if not parser.parse_from_file(str(request.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise InvalidArgument(
            f"{label}: TensorRT's ONNX parser rejected {request.onnx_path}: " + "; ".join(errors[:5] or ["no detail"])
        )
    network_inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if network_inputs != sorted(request.profile):
        raise InvalidArgument(
            f"{label}: TensorRT's network has inputs {network_inputs}, "
            f"the profile was made for {sorted(request.profile)}"
        )

    config = builder.create_builder_config()
    if s.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mb << 20)
    if request.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 builds: layers without INT8 kernels run in FP16
    profile = builder.create_optimization_profile()
    for name, rng in request.profile.items():
        profile.set_shape(name, rng.min, rng.opt, rng.max)
    config.add_optimization_profile(profile)

    memory: InstanceMemory | None = None
    calibrator = None
    if request.precision == "int8":
        if cuda is None or s.calibration_dir is None:
            raise InvalidArgument(f"{label}: INT8 calibration needs calibration samples and a CUDA binding")
        batch = calibration_batch_size(request)
        batching = s.max_batch_size > 0
        memory = InstanceMemory(cuda, device_id)
        cache_path = (
            cache_dir() / f"calibration-{request.onnx_sha256[:16]}-{(request.calibration_sha256 or '')[:16]}.cache"
        )
        batches = iter_calibration_batches(s.calibration_dir, inputs, request.profile, batch, batching)
        calibrator = _make_calibrator(trt, batches, memory, cache_path, emit, label)
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        calibration_profile = builder.create_optimization_profile()
        for name, rng in request.profile.items():
            shape = (batch, *rng.opt[1:]) if batching else rng.opt
            calibration_profile.set_shape(name, shape, shape, shape)
        config.set_calibration_profile(calibration_profile)
        emit(f"{label}: INT8 calibration from {s.calibration_dir}, {batch} row(s) per batch")

    timing_path = s.timing_cache or default_timing_cache(env)
    _use_timing_cache(trt, config, timing_path, emit, label)

    progress = BuildProgress(emit, label)
    monitor = make_progress_monitor(trt, progress)
    config.progress_monitor = monitor
    profile_text = ", ".join(f"{n} {r}" for n, r in request.profile.items())
    emit(f"{label}: building a {request.precision} engine for {env.describe()}; profile {profile_text}")
    try:
        with ElapsedTicker(progress, tick_seconds):
            plan = builder.build_serialized_network(network, config)
    finally:
        if memory is not None:
            memory.close()
    if calibrator is not None and calibrator.error is not None:
        error = calibrator.error
        if isinstance(error, ServerError):
            raise error
        raise InternalError(f"{label}: INT8 calibration failed: {type(error).__name__}: {error}") from error
    if plan is None:
        raise InternalError(f"{label}: TensorRT built no engine (its messages above say why)")
    _save_timing_cache(config, timing_path, label)
    del monitor  # TensorRT held it until here
    return bytes(plan)
