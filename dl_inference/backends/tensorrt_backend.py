"""TensorRT backend: serves a prebuilt engine (``model.plan``) or builds one from ``model.onnx``.

Registry name ``tensorrt``; Triton's platform name ``tensorrt_plan`` is an alias. The version
directory holds one of:

* ``model.plan`` (or ``default_model_filename`` ending in .plan/.engine) with ``model.plan.json``
  beside it, as written by ``dl-inference convert onnx-to-tensorrt`` / ``convert repository``. The
  metadata is checked against this worker (TensorRT version, GPU, compute capability; the ONNX file's
  hash when ``model.onnx`` is there too; a ``precision`` parameter or ``max_batch_size`` in the config
  that the engine cannot honour). A mismatch is rebuilt from ``model.onnx`` when the config sets the
  parameter ``allow_rebuild``, else the load fails with a message saying what differs and the command
  that rebuilds it. A plan without metadata is deserialized as is.
* ``model.onnx`` (or a Caffe prototxt + caffemodel, converted to ONNX first): the engine is built at
  load and cached under ``$DL_INFERENCE_CACHE_DIR/tensorrt`` (concurrent workers build it once). Build
  settings come from the config: see :func:`dl_inference.convert.tensorrt.pipeline.settings_from_config`.

Execution uses TensorRT 10/11's name-based API: ``context.set_input_shape``, ``set_tensor_address``
for every input and output, ``execute_async_v3(stream)``, with device buffers, pinned staging buffers
and one stream per instance from :mod:`dl_inference.backends.cuda_memory`; the worker's dynamic
batcher hands whole batches to :meth:`TensorRTBackend.infer`. The config is completed from the
engine's I/O tensors (names, datatypes, dims) and ``max_batch_size`` from its optimization profile.

**Real TensorRT has not run this code in this project**: TensorRT cannot be installed on the machines
used. Its logic is unit-tested against a fake ``tensorrt`` module and a fake CUDA layer that record
the calls (``tests/unit/test_tensorrt_backend_fake.py``); the CUDA layer itself was checked on a GPU
by ``scripts/gpu_check_cuda_memory.py``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from dl_inference.backends.base import Backend, parameter_bool
from dl_inference.backends.cuda_memory import CudaApi, InstanceMemory, format_bytes, load_cuda_api
from dl_inference.backends.tensor_specs import IOSpec, dims_compatible, shape_str
from dl_inference.convert.tensorrt.builder import current_env, import_tensorrt, trt_logger
from dl_inference.convert.tensorrt.engine_cache import EngineMismatch
from dl_inference.convert.tensorrt.pipeline import resolve_engine
from dl_inference.convert.tensorrt.settings import ShapeRange
from dl_inference.errors import Code, InternalError, InvalidArgument, ServerError, Unavailable
from dl_inference.protocol.datatypes import config_to_v2, v2_to_config
from dl_inference.protocol.generated import model_config_pb2 as mc

log = logging.getLogger(__name__)

__all__ = ["TensorRTBackend"]

# TensorRT DataType member names -> V2 datatypes (FP8, INT4, FP4 have none and are refused).
_TRT_TO_V2 = {
    "FLOAT": "FP32", "HALF": "FP16", "BF16": "BF16", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64",
    "BOOL": "BOOL", "UINT8": "UINT8",
}  # fmt: skip
_NUMPY = {
    "FP32": np.dtype(np.float32), "FP16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "INT8": np.dtype(np.int8), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8),
}  # fmt: skip


@dataclass(frozen=True)
class _EngineTensor:
    """An engine I/O tensor. ``profile`` (inputs only) is profile 0's min/opt/max."""

    name: str
    is_input: bool
    datatype: str
    shape: tuple[int, ...]
    profile: ShapeRange | None

    @property
    def dtype(self) -> np.dtype:
        return _NUMPY[self.datatype]


class TensorRTBackend(Backend):
    """One TensorRT engine on one GPU. ``cuda`` / ``trt`` replace the real modules (tests)."""

    name = "tensorrt"

    def __init__(self, cuda: CudaApi | None = None, trt: Any = None) -> None:
        self._cuda_given = cuda
        self._trt_given = trt
        self._lock = threading.Lock()
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._memory: InstanceMemory | None = None
        self._config: mc.ModelConfig | None = None
        self._tensors: dict[str, _EngineTensor] = {}
        self._inputs: dict[str, IOSpec] = {}
        self._outputs: dict[str, IOSpec] = {}
        self._batching = False
        self.engine_path: Path | None = None

    @property
    def config(self) -> mc.ModelConfig:
        if self._config is None:
            raise Unavailable("tensorrt backend: no model loaded")
        return self._config

    # --- load ----------------------------------------------------------------------------------

    def load(
        self, version_dir: Path, config: mc.ModelConfig, device: str = "cpu", device_id: int | None = None
    ) -> mc.ModelConfig:
        """Find or build the engine, deserialize it, complete the config; see the module doc."""
        if self._engine is not None:
            self.unload()
        start = time.monotonic()
        version_dir = Path(version_dir)
        name = config.name or version_dir.parent.name
        if any(g.kind == mc.ModelInstanceGroup.KIND_CPU for g in config.instance_group):
            raise ServerError(
                f"model '{name}': TensorRT engines run on GPUs only; use instance_group kind KIND_GPU (or KIND_AUTO)",
                Code.FAILED_PRECONDITION,
            )
        if device == "cpu":
            log.info("model '%s': no GPU named for this instance; TensorRT uses GPU %d", name, device_id or 0)
        gpu = device_id or 0
        trt = self._trt_given if self._trt_given is not None else import_tensorrt()
        cuda = self._cuda_given if self._cuda_given is not None else load_cuda_api()
        cuda.set_device(gpu)
        env = current_env(trt, cuda, gpu)
        plan_path = resolve_engine(
            version_dir, config, trt=trt, cuda=cuda, device_id=gpu, env=env,
            allow_rebuild=parameter_bool(config, "allow_rebuild"),
        )  # fmt: skip

        runtime = trt.Runtime(trt_logger(trt))
        plan = plan_path.read_bytes()
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineMismatch(
                f"model '{name}': {env.describe()} could not deserialize the engine {plan_path} (TensorRT's "
                "messages above say why; an engine only loads on the TensorRT version and GPU model that built "
                "it): rebuild it with `dl-inference convert onnx-to-tensorrt` on this machine"
            )
        tensors = self._engine_tensors(trt, engine, name)
        completed = mc.ModelConfig()
        completed.CopyFrom(config)
        completed.name = name
        self._complete_config(completed, tensors)
        context = engine.create_execution_context()
        if context is None:
            raise InternalError(f"model '{name}': TensorRT could not create an execution context (out of GPU memory?)")
        memory = InstanceMemory(cuda, gpu)

        self._runtime, self._engine, self._context, self._memory = runtime, engine, context, memory
        self._config = completed
        self._tensors = tensors
        self._batching = completed.max_batch_size > 0
        self._inputs = {t.name: self._io_spec(t) for t in completed.input}
        self._outputs = {t.name: self._io_spec(t) for t in completed.output}
        self.engine_path = plan_path
        try:
            self._reserve_for_max_shapes()
        except BaseException:
            self.unload()
            raise
        log.info(
            "model '%s': TensorRT engine %s (%s) on GPU %d %s, max_batch_size %d, buffers %s device + %s pinned, "
            "in %.1f s",
            name, plan_path, format_bytes(len(plan)), gpu, env.describe(), completed.max_batch_size,
            format_bytes(memory.device_bytes), format_bytes(memory.pinned_bytes), time.monotonic() - start,
        )  # fmt: skip
        return completed

    @staticmethod
    def _engine_tensors(trt: Any, engine: Any, model: str) -> dict[str, _EngineTensor]:
        tensors: dict[str, _EngineTensor] = {}
        input_mode = trt.TensorIOMode.INPUT
        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(tname) == input_mode
            trt_dtype = engine.get_tensor_dtype(tname)
            dtype_name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
            datatype = _TRT_TO_V2.get(dtype_name)
            kind = "input" if is_input else "output"
            if datatype is None:
                raise InvalidArgument(
                    f"model '{model}': engine {kind} '{tname}' is TensorRT {dtype_name}, which has no V2 datatype; "
                    "give the network FP32/FP16/BF16/INT8/INT32/INT64/BOOL/UINT8 inputs and outputs"
                )
            if is_input and engine.is_shape_inference_io(tname):
                raise InvalidArgument(
                    f"model '{model}': engine input '{tname}' is a shape tensor, which is not supported"
                )
            shape = tuple(int(d) for d in engine.get_tensor_shape(tname))
            profile = None
            if is_input:
                lo, opt, hi = engine.get_tensor_profile_shape(tname, 0)
                profile = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
            tensors[tname] = _EngineTensor(tname, is_input, datatype, shape, profile)
        return tensors

    def _complete_config(self, config: mc.ModelConfig, tensors: dict[str, _EngineTensor]) -> None:
        """Fill and check ``config`` (in place) against the engine's tensors."""
        name = config.name
        inputs = {t.name: t for t in tensors.values() if t.is_input}
        outputs = {t.name: t for t in tensors.values() if not t.is_input}
        if not config.platform and not config.backend:
            config.backend = "tensorrt"
        if not config.platform:
            config.platform = "tensorrt_plan"
        for kind, entries, engine_side in (("input", config.input, inputs), ("output", config.output, outputs)):
            for entry in entries:
                if entry.name not in engine_side:
                    raise InvalidArgument(
                        f"model '{name}': config {kind} '{entry.name}' is not an {kind} of the engine; "
                        f"its {kind}s are: {', '.join(engine_side)}"
                    )
        exposed = [outputs[o.name] for o in config.output] or list(outputs.values())
        every = [*inputs.values(), *exposed]
        batchable = all(t.shape and t.shape[0] == -1 for t in every)
        profile_max = min((t.profile.max[0] for t in inputs.values() if t.profile and t.profile.max), default=0)
        full_rank = any(e.dims and len(e.dims) >= len(inputs[e.name].shape) for e in config.input)
        if config.max_batch_size == 0 and batchable and inputs and not full_rank:
            config.max_batch_size = profile_max
            log.info("model '%s': max_batch_size %d from the engine's optimization profile", name, profile_max)
        if config.max_batch_size > 0:
            if not batchable:
                bad = next(t for t in every if not (t.shape and t.shape[0] == -1))
                raise InvalidArgument(
                    f"model '{name}': max_batch_size is {config.max_batch_size} but engine tensor '{bad.name}' has "
                    f"shape {shape_str(bad.shape)}; batching needs a dynamic first dimension on every input and output"
                )
            if config.max_batch_size > profile_max:
                tight = min(inputs.values(), key=lambda t: t.profile.max[0] if t.profile else 0)
                raise InvalidArgument(
                    f"model '{name}': max_batch_size {config.max_batch_size} exceeds the engine's profile, which takes "
                    f"batches up to {profile_max} (input '{tight.name}'); rebuild the engine with "
                    f"--max-batch-size {config.max_batch_size} or lower max_batch_size"
                )
        batching = config.max_batch_size > 0
        listed = {t.name for t in config.input}
        for tname in inputs:
            if tname not in listed:
                config.input.add(name=tname)
        if not config.output:
            for tname in outputs:
                config.output.add(name=tname)
        for entry in config.input:
            self._complete_tensor(name, "input", entry, inputs[entry.name], batching)
        for entry in config.output:
            self._complete_tensor(name, "output", entry, outputs[entry.name], batching)

    @staticmethod
    def _complete_tensor(
        model: str, kind: str, entry: mc.ModelInput | mc.ModelOutput, tensor: _EngineTensor, batching: bool
    ) -> None:
        if entry.data_type == mc.TYPE_INVALID:
            entry.data_type = mc.DataType.Value(v2_to_config(tensor.datatype))
        elif config_to_v2(mc.DataType.Name(entry.data_type)) != tensor.datatype:
            raise InvalidArgument(
                f"model '{model}': {kind} '{entry.name}': config data_type {mc.DataType.Name(entry.data_type)} does "
                f"not match the engine's {v2_to_config(tensor.datatype)}"
            )
        item = tensor.shape[1:] if batching else tensor.shape
        if not entry.dims and not entry.HasField("reshape"):
            if item:
                entry.dims.extend(item)
            else:
                entry.dims.append(1)
                entry.reshape.SetInParent()
            return
        target = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
        if not dims_compatible(([-1] if batching else []) + target, tensor.shape):
            raise InvalidArgument(
                f"model '{model}': {kind} '{entry.name}': config dims {shape_str(target)} do not match the "
                f"engine's shape {shape_str(tensor.shape)}" + (" (batch dimension first)" if batching else "")
            )

    def _io_spec(self, entry: mc.ModelInput | mc.ModelOutput) -> IOSpec:
        datatype = config_to_v2(mc.DataType.Name(entry.data_type))
        batch = (-1,) if self._batching else ()
        model_shape = batch + tuple(entry.reshape.shape) if entry.HasField("reshape") else None
        return IOSpec(entry.name, datatype, _NUMPY[datatype], batch + tuple(entry.dims), model_shape)

    def _reserve_for_max_shapes(self) -> None:
        """Allocate device and pinned buffers for the profile's largest shapes now, so an out-of-memory
        shows at load and full batches never allocate. Skipped where the largest output shape is
        unknown before running (data-dependent shapes)."""
        memory, context = self._memory, self._context
        assert memory is not None
        for t in self._tensors.values():
            if t.is_input and t.profile is not None:
                nbytes = int(np.prod(t.profile.max, dtype=np.int64)) * t.dtype.itemsize
                if not context.set_input_shape(t.name, t.profile.max):
                    return
                memory.device(t.name, nbytes)
                if memory.direct_copy_min_bytes is None or nbytes < memory.direct_copy_min_bytes:
                    memory.pinned(f"in:{t.name}", nbytes)  # larger inputs are copied without staging
        for t in self._tensors.values():
            if not t.is_input:
                shape = tuple(context.get_tensor_shape(t.name))
                if any(d < 0 for d in shape):
                    continue
                nbytes = int(np.prod(shape, dtype=np.int64)) * t.dtype.itemsize
                memory.device(t.name, nbytes)
                memory.pinned(f"out:{t.name}", nbytes)

    # --- infer ---------------------------------------------------------------------------------

    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        """Run one batch: stage inputs, set shapes and addresses, execute, copy outputs back."""
        with self._lock:
            context, memory = self._context, self._memory
            if context is None or memory is None:
                raise Unavailable("tensorrt backend: no model loaded")
            model = self.config.name
            arrays = self._checked_inputs(model, inputs)
            requested = list(output_names) or list(self._outputs)
            for out_name in requested:
                if out_name not in self._outputs:
                    raise InvalidArgument(
                        f"model '{model}': unknown output '{out_name}'; outputs are: {', '.join(self._outputs)}"
                    )
            memory.activate()
            for tname, array in arrays.items():
                pointer = memory.upload(tname, array)
                if not context.set_input_shape(tname, array.shape):
                    raise InvalidArgument(
                        f"model '{model}': input '{tname}': TensorRT refused shape {shape_str(array.shape)}"
                    )
                context.set_tensor_address(tname, pointer)
            shapes: dict[str, tuple[int, ...]] = {}
            pointers: dict[str, int] = {}
            for t in self._tensors.values():  # every output needs an address, requested or not
                if t.is_input:
                    continue
                shape = tuple(int(d) for d in context.get_tensor_shape(t.name))
                if any(d < 0 for d in shape):
                    raise InternalError(
                        f"model '{model}': output '{t.name}' has a data-dependent shape {shape_str(shape)}, "
                        "which this backend does not support"
                    )
                shapes[t.name] = shape
                pointers[t.name] = memory.device(t.name, int(np.prod(shape, dtype=np.int64)) * t.dtype.itemsize)
                context.set_tensor_address(t.name, pointers[t.name])
            if not context.execute_async_v3(memory.stream.handle):
                raise InternalError(f"model '{model}': TensorRT execute_async_v3 failed (its messages above say why)")
            views = {n: memory.download(n, pointers[n], self._tensors[n].dtype, shapes[n]) for n in requested}
            memory.synchronize()
            results: dict[str, np.ndarray] = {}
            for out_name, view in views.items():
                array = np.array(view, copy=True)  # the pinned buffer is reused by the next batch
                spec = self._outputs[out_name]
                if spec.model_shape is not None:
                    target = [array.shape[0], *spec.shape[1:]] if self._batching else list(spec.shape)
                    array = array.reshape(target)
                results[out_name] = array
            return results

    def _checked_inputs(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = [n for n in inputs if n not in self._inputs]
        if unknown:
            raise InvalidArgument(
                f"model '{model}': unknown input '{unknown[0]}'; inputs are: {', '.join(self._inputs)}"
            )
        arrays: dict[str, np.ndarray] = {}
        batch: int | None = None
        for spec in self._inputs.values():
            if spec.name not in inputs:
                raise InvalidArgument(f"model '{model}': missing input '{spec.name}'")
            array = np.asarray(inputs[spec.name])
            if array.dtype != spec.dtype:
                raise InvalidArgument(
                    f"model '{model}': input '{spec.name}': expected datatype {spec.datatype} (numpy {spec.dtype}), "
                    f"got numpy {array.dtype}"
                )
            if not dims_compatible(spec.shape, array.shape):
                raise InvalidArgument(
                    f"model '{model}': input '{spec.name}': expected shape {shape_str(spec.shape)}, "
                    f"got {shape_str(array.shape)}"
                )
            if self._batching:
                if batch is None:
                    batch = array.shape[0]
                elif array.shape[0] != batch:
                    raise InvalidArgument(
                        f"model '{model}': input '{spec.name}' has batch size {array.shape[0]}, "
                        f"other inputs have {batch}"
                    )
                if array.shape[0] > self.config.max_batch_size:
                    raise InvalidArgument(
                        f"model '{model}': batch of {array.shape[0]} rows exceeds max_batch_size "
                        f"{self.config.max_batch_size}"
                    )
            if spec.model_shape is not None:
                target = [array.shape[0], *spec.model_shape[1:]] if self._batching else list(spec.model_shape)
                array = array.reshape(target)
            rng = self._tensors[spec.name].profile
            if rng is not None and not all(
                lo <= d <= hi for lo, d, hi in zip(rng.min, array.shape, rng.max, strict=False)
            ):
                raise InvalidArgument(
                    f"model '{model}': input '{spec.name}': shape {shape_str(array.shape)} is outside the engine's "
                    f"optimization profile (min {shape_str(rng.min)}, max {shape_str(rng.max)})"
                )
            arrays[spec.name] = array
        return arrays

    # --- unload --------------------------------------------------------------------------------

    def unload(self) -> None:
        """Free the buffers and stream, then drop context, engine and runtime (in that order)."""
        with self._lock:
            if self._memory is not None:
                self._memory.close()
            if self._engine is not None:
                log.info("model '%s': unloaded", self._config.name if self._config else "?")
            self._memory = None
            self._context = None
            self._engine = None
            self._runtime = None
            self._inputs = {}
            self._outputs = {}
            self._tensors = {}
