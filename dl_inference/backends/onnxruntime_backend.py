"""ONNX Runtime backend: runs ``<version_dir>/model.onnx`` on CPU, CUDA or TensorRT execution providers.

Session settings (all from the model config's ``parameters``, string values):

``intra_op_thread_count``
    threads one operator may use (default **1**: a node runs several worker processes, one per model
    instance, that share the cores, so each session stays single-threaded unless told otherwise;
    ``0`` lets ONNX Runtime use every core).
``inter_op_thread_count``
    threads for running independent nodes in parallel (default 1; the session runs sequentially).
``allow_spinning``
    ``"true"`` lets idle ORT threads busy-wait for work (lower latency, burns CPU); off by default.
``use_tensorrt_ep``
    ``"true"`` puts the TensorRT execution provider before CUDA when ``device`` is ``"gpu"``.
``default_max_batch_size``
    the ``max_batch_size`` given to a config that leaves it 0 for a model whose inputs and outputs
    all have a dynamic first dimension (default 8).

Datatypes: every V2 datatype works. BYTES are object arrays of ``bytes`` outside and UTF-8 ONNX
string tensors inside (an element that is not valid UTF-8 is rejected). BF16 inputs are passed as
OrtValues; BF16 outputs, which ORT's Python binding cannot return as numpy, are cast to FP32 inside
the graph (an exact conversion, added once at load time) and back to ``ml_dtypes.bfloat16`` here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from dl_inference.backends.base import Backend, parameter_bool, parameter_int
from dl_inference.errors import InternalError, InvalidArgument, NotFound, ServerError, Unavailable
from dl_inference.protocol.datatypes import config_to_v2, numpy_dtype, v2_to_config
from dl_inference.protocol.generated import model_config_pb2 as mc

logger = logging.getLogger(__name__)

__all__ = ["OnnxRuntimeBackend", "onnx_type_to_v2"]

DEFAULT_MODEL_FILENAME = "model.onnx"
DEFAULT_MAX_BATCH_SIZE = 8
_BF16_AS_FP32_SUFFIX = "__dl_inference_bf16_as_fp32"
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16

_ORT_TYPE_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}


def onnx_type_to_v2(ort_type: str) -> str | None:
    """V2 datatype for an ORT type string such as ``tensor(float)``; None when there is none."""
    return _ORT_TYPE_TO_V2.get(ort_type)


@dataclass(frozen=True)
class _ModelTensor:
    """A tensor as the ONNX model declares it. ``shape`` uses -1 for dynamic dimensions."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def batchable(self) -> bool:
        return len(self.shape) >= 1 and self.shape[0] == -1


@dataclass(frozen=True)
class _IOSpec:
    """A tensor as served: ``shape`` is the client-side shape (batch dim -1 first when batching);
    ``model_shape`` is the shape the model sees when the config has a ``reshape``, else None."""

    name: str
    datatype: str
    dtype: np.dtype
    shape: tuple[int, ...]
    model_shape: tuple[int, ...] | None


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _dims_compatible(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(x == -1 or y == -1 or x == y for x, y in zip(a, b, strict=True))


def _model_tensor(arg: ort.NodeArg, kind: str, model_name: str) -> _ModelTensor:
    name = arg.name
    ort_type = arg.type
    datatype = onnx_type_to_v2(ort_type)
    if datatype is None:
        raise InvalidArgument(
            f"model '{model_name}': {kind} '{name}' has ONNX type {ort_type}, which has no V2 datatype"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return _ModelTensor(name, datatype, shape)


def _ort_error(exc: Exception, what: str) -> ServerError:
    """Map an ORT exception: its INVALID_ARGUMENT (bad shapes, types, names) -> InvalidArgument."""
    message = f"{what}: {exc}"
    if isinstance(exc, ort_state.InvalidArgument | ValueError):
        return InvalidArgument(message)
    return InternalError(message)


class OnnxRuntimeBackend(Backend):
    """Serves one ONNX model with an ``onnxruntime.InferenceSession``.

    See the module docstring for the config ``parameters`` it reads. ``intra_op_thread_count``
    defaults to 1 because several worker processes share the machine's cores.
    """

    name = "onnxruntime"

    def __init__(self) -> None:
        self._session: ort.InferenceSession | None = None
        self._config: mc.ModelConfig | None = None
        self._inputs: dict[str, _IOSpec] = {}
        self._outputs: dict[str, _IOSpec] = {}
        self._batching = False
        # config output name -> session output name, for BF16 outputs cast to FP32 in the graph.
        self._bf16_outputs: dict[str, str] = {}
        self._providers: list[str] = []

    # --- properties ----------------------------------------------------------------------------

    @property
    def config(self) -> mc.ModelConfig:
        """The completed config of the loaded model."""
        if self._config is None:
            raise Unavailable("onnxruntime backend: no model loaded")
        return self._config

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually uses, in priority order."""
        return list(self._providers)

    # --- load ------------------------------------------------------------------------------------

    def load(
        self,
        version_dir: Path,
        config: mc.ModelConfig,
        device: str = "cpu",
        device_id: int | None = None,
    ) -> mc.ModelConfig:
        """Create the session for ``version_dir/<default_model_filename or model.onnx>`` and return
        the config completed (or validated) against the model; see :class:`Backend`."""
        if self._session is not None:
            self.unload()
        model_name = config.name or Path(version_dir).parent.name
        model_path = Path(version_dir) / (config.default_model_filename or DEFAULT_MODEL_FILENAME)
        if model_path.is_dir():  # Triton also accepts a directory holding model.onnx + external data
            model_path = model_path / DEFAULT_MODEL_FILENAME
        if not model_path.is_file():
            raise NotFound(f"model '{model_name}': model file {model_path} not found")

        options = self._session_options(config)
        providers = self._providers_for(config, device, device_id)
        session = self._create_session(str(model_path), options, providers, model_name)

        completed = mc.ModelConfig()
        completed.CopyFrom(config)
        completed.name = model_name
        self._complete_config(completed, session)

        bf16_outputs = [o.name for o in completed.output if o.data_type == mc.TYPE_BF16]
        bf16_map: dict[str, str] = {}
        if bf16_outputs:
            model_bytes, bf16_map = _cast_bf16_outputs(model_path, bf16_outputs)
            session = self._create_session(model_bytes, options, providers, model_name)

        self._session = session
        self._config = completed
        self._bf16_outputs = bf16_map
        self._batching = completed.max_batch_size > 0
        self._inputs = {t.name: self._io_spec(t) for t in completed.input}
        self._outputs = {t.name: self._io_spec(t) for t in completed.output}
        self._providers = list(session.get_providers())
        logger.info(
            "model '%s': loaded %s with providers %s (max_batch_size %d, intra-op threads %d)",
            model_name,
            model_path,
            self._providers,
            completed.max_batch_size,
            options.intra_op_num_threads,
        )
        if device.lower() in ("gpu", "cuda") and "CUDAExecutionProvider" not in self._providers:
            logger.warning("model '%s': GPU requested but running on %s", model_name, self._providers)
        return completed

    @staticmethod
    def _session_options(config: mc.ModelConfig) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = parameter_int(config, "intra_op_thread_count", 1, minimum=0)
        options.inter_op_num_threads = parameter_int(config, "inter_op_thread_count", 1, minimum=0)
        spin = "1" if parameter_bool(config, "allow_spinning", False) else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return options

    @staticmethod
    def _providers_for(
        config: mc.ModelConfig, device: str, device_id: int | None
    ) -> list[str | tuple[str, dict[str, object]]]:
        device = device.lower()
        if device not in ("cpu", "gpu", "cuda"):
            raise InvalidArgument(f"model '{config.name}': unknown device '{device}', expected cpu or gpu")
        providers: list[str | tuple[str, dict[str, object]]] = []
        if device != "cpu":
            available = ort.get_available_providers()
            gpu = {"device_id": device_id or 0}
            if parameter_bool(config, "use_tensorrt_ep", False):
                if "TensorrtExecutionProvider" in available:
                    providers.append(("TensorrtExecutionProvider", dict(gpu)))
                else:
                    logger.warning("model '%s': TensorRT EP requested but not available", config.name)
            if "CUDAExecutionProvider" in available:
                providers.append(("CUDAExecutionProvider", dict(gpu)))
            else:
                logger.warning(
                    "model '%s': device gpu requested but this onnxruntime has no CUDA EP (has %s); "
                    "falling back to CPU",
                    config.name,
                    available,
                )
        providers.append("CPUExecutionProvider")
        return providers

    @staticmethod
    def _create_session(
        model: str | bytes,
        options: ort.SessionOptions,
        providers: list[str | tuple[str, dict[str, object]]],
        model_name: str,
    ) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(model, sess_options=options, providers=providers)
        except ort_state.NoSuchFile as exc:
            raise NotFound(f"model '{model_name}': {exc}") from exc
        except ort_state.EPFail as exc:
            raise Unavailable(f"model '{model_name}': execution provider failed: {exc}") from exc
        except (
            ort_state.InvalidProtobuf,
            ort_state.InvalidGraph,
            ort_state.InvalidArgument,
            ort_state.NotImplemented,
            ort_state.Fail,
        ) as exc:
            raise InvalidArgument(f"model '{model_name}': onnxruntime cannot load the model: {exc}") from exc
        except Exception as exc:
            raise InternalError(f"model '{model_name}': onnxruntime failed to load the model: {exc}") from exc

    # --- config auto-completion / validation ----------------------------------------------------

    def _complete_config(self, config: mc.ModelConfig, session: ort.InferenceSession) -> None:
        """Fill and check ``config`` (in place) against the session's inputs and outputs."""
        name = config.name
        model_inputs = {a.name: _model_tensor(a, "input", name) for a in session.get_inputs()}
        model_outputs = {a.name: _model_tensor(a, "output", name) for a in session.get_outputs()}
        if not config.platform and not config.backend:
            config.backend = "onnxruntime"
        if not config.platform:
            config.platform = "onnxruntime_onnx"

        for kind, entries, model in (
            ("input", config.input, model_inputs),
            ("output", config.output, model_outputs),
        ):
            seen: set[str] = set()
            for entry in entries:
                if not entry.name:
                    raise InvalidArgument(f"model '{name}': an {kind} in the config has no name")
                if entry.name in seen:
                    raise InvalidArgument(
                        f"model '{name}': {kind} '{entry.name}' is listed twice in the config"
                    )
                seen.add(entry.name)
                if entry.name not in model:
                    raise InvalidArgument(
                        f"model '{name}': config {kind} '{entry.name}' is not an {kind} of the model; "
                        f"the model's {kind}s are: {', '.join(model)}"
                    )

        exposed_outputs = [model_outputs[o.name] for o in config.output] or list(model_outputs.values())
        batchable = all(t.batchable for t in [*model_inputs.values(), *exposed_outputs])

        if config.max_batch_size < 0:
            raise InvalidArgument(f"model '{name}': max_batch_size must be >= 0, got {config.max_batch_size}")
        if (
            config.max_batch_size == 0
            and batchable
            and self._config_hints_batching(config, model_inputs, model_outputs)
        ):
            config.max_batch_size = parameter_int(
                config, "default_max_batch_size", DEFAULT_MAX_BATCH_SIZE, minimum=1
            )
            logger.info(
                "model '%s': every input and output has a dynamic first dimension; max_batch_size set to %d",
                name,
                config.max_batch_size,
            )
        if config.max_batch_size > 0 and not batchable:
            bad = next(t for t in [*model_inputs.values(), *exposed_outputs] if not t.batchable)
            raise InvalidArgument(
                f"model '{name}': max_batch_size is {config.max_batch_size} but tensor '{bad.name}' "
                f"has shape {_shape_str(bad.shape)}; batching needs a dynamic first dimension (-1) "
                "on every input and output"
            )
        batching = config.max_batch_size > 0

        listed = {t.name for t in config.input}
        for tensor in model_inputs.values():
            if tensor.name not in listed:
                if listed:
                    logger.info("model '%s': adding input '%s' missing from the config", name, tensor.name)
                config.input.add(name=tensor.name)
        if not config.output:
            for tensor in model_outputs.values():
                config.output.add(name=tensor.name)
        for inp in config.input:
            self._complete_tensor(name, "input", inp, model_inputs[inp.name], batching)
        for out in config.output:
            self._complete_tensor(name, "output", out, model_outputs[out.name], batching)

    @staticmethod
    def _config_hints_batching(
        config: mc.ModelConfig, model_inputs: dict[str, _ModelTensor], model_outputs: dict[str, _ModelTensor]
    ) -> bool:
        """With max_batch_size 0, dims written in the config tell whether they include the batch:
        a tensor whose dims have the model's full rank means the operator wants no batching."""
        for entry, model in [(i, model_inputs) for i in config.input] + [
            (o, model_outputs) for o in config.output
        ]:
            if entry.dims or entry.HasField("reshape"):
                rank = len(entry.reshape.shape) if entry.HasField("reshape") else len(entry.dims)
                if rank >= len(model[entry.name].shape):
                    return False
        return True

    @staticmethod
    def _complete_tensor(
        model_name: str,
        kind: str,
        entry: mc.ModelInput | mc.ModelOutput,
        tensor: _ModelTensor,
        batching: bool,
    ) -> None:
        if entry.data_type == mc.TYPE_INVALID:
            entry.data_type = mc.DataType.Value(v2_to_config(tensor.datatype))
        else:
            configured = config_to_v2(mc.DataType.Name(entry.data_type))
            if configured != tensor.datatype:
                raise InvalidArgument(
                    f"model '{model_name}': {kind} '{entry.name}': config data_type "
                    f"{mc.DataType.Name(entry.data_type)} does not match the model's "
                    f"{v2_to_config(tensor.datatype)}"
                )
        model_item_shape = tensor.shape[1:] if batching else tensor.shape
        if not entry.dims and not entry.HasField("reshape"):
            if model_item_shape:
                entry.dims.extend(model_item_shape)
            else:  # per-item scalar of a batching model: Triton spells it dims [1] + reshape []
                entry.dims.append(1)
                entry.reshape.SetInParent()
            return
        if not entry.dims and entry.HasField("reshape"):
            entry.dims.extend(entry.reshape.shape or [1])
        target = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
        full = ([-1] if batching else []) + target
        if not _dims_compatible(full, tensor.shape):
            described = "reshape" if entry.HasField("reshape") else "dims"
            with_batch = f" (with the batch dimension: {_shape_str(full)})" if batching else ""
            raise InvalidArgument(
                f"model '{model_name}': {kind} '{entry.name}': config {described} "
                f"{_shape_str(target)}{with_batch} do not match the model's shape {_shape_str(tensor.shape)}"
            )

    def _io_spec(self, entry: mc.ModelInput | mc.ModelOutput) -> _IOSpec:
        datatype = config_to_v2(mc.DataType.Name(entry.data_type))
        batch = (-1,) if self._batching else ()
        model_shape = batch + tuple(entry.reshape.shape) if entry.HasField("reshape") else None
        return _IOSpec(entry.name, datatype, numpy_dtype(datatype), batch + tuple(entry.dims), model_shape)

    # --- infer -----------------------------------------------------------------------------------

    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the session on one batch; see :class:`Backend`."""
        session = self._session
        if session is None:
            raise Unavailable("onnxruntime backend: no model loaded")
        model_name = self.config.name

        unknown = [n for n in inputs if n not in self._inputs]
        if unknown:
            raise InvalidArgument(
                f"model '{model_name}': unknown input '{unknown[0]}'; inputs are: {', '.join(self._inputs)}"
            )
        feed: dict[str, object] = {}
        batch_size: int | None = None
        for spec in self._inputs.values():
            if spec.name not in inputs:
                raise InvalidArgument(f"model '{model_name}': missing input '{spec.name}'")
            array = np.asarray(inputs[spec.name])
            self._check_input(model_name, spec, array)
            if self._batching:
                if batch_size is None:
                    batch_size = array.shape[0]
                elif array.shape[0] != batch_size:
                    raise InvalidArgument(
                        f"model '{model_name}': input '{spec.name}' has batch size {array.shape[0]}, "
                        f"other inputs have {batch_size}"
                    )
            if spec.model_shape is not None:
                array = self._reshape(model_name, "input", spec.name, array, spec.model_shape)
            feed[spec.name] = self._to_ort(model_name, spec, array)

        requested = list(output_names) or list(self._outputs)
        for out_name in requested:
            if out_name not in self._outputs:
                raise InvalidArgument(
                    f"model '{model_name}': unknown output '{out_name}'; "
                    f"outputs are: {', '.join(self._outputs)}"
                )
        session_names = [self._bf16_outputs.get(n, n) for n in requested]
        try:
            results = session.run(session_names, feed)
        except Exception as exc:
            raise _ort_error(exc, f"model '{model_name}': onnxruntime inference failed") from exc

        outputs: dict[str, np.ndarray] = {}
        for out_name, value in zip(requested, results, strict=True):
            spec = self._outputs[out_name]
            array = self._from_ort(model_name, spec, value)
            if spec.model_shape is not None:
                array = self._reshape(model_name, "output", out_name, array, spec.shape)
            outputs[out_name] = array
        return outputs

    @staticmethod
    def _check_input(model_name: str, spec: _IOSpec, array: np.ndarray) -> None:
        if spec.datatype == "BYTES":
            ok = array.dtype.kind in "OSU"
        else:
            ok = array.dtype == spec.dtype
        if not ok:
            got = "BF16" if array.dtype == ml_dtypes.bfloat16 else str(array.dtype)
            raise InvalidArgument(
                f"model '{model_name}': input '{spec.name}': expected datatype {spec.datatype} "
                f"(numpy {spec.dtype}), got numpy {got}"
            )
        if not _dims_compatible(spec.shape, array.shape):
            raise InvalidArgument(
                f"model '{model_name}': input '{spec.name}': expected shape {_shape_str(spec.shape)}, "
                f"got {_shape_str(array.shape)}"
            )

    @staticmethod
    def _reshape(
        model_name: str, kind: str, name: str, array: np.ndarray, shape: tuple[int, ...]
    ) -> np.ndarray:
        target = list(shape)
        if target and target[0] == -1 and array.ndim > 0:
            target[0] = array.shape[0]
        try:
            return array.reshape(target)
        except ValueError as exc:
            raise InvalidArgument(
                f"model '{model_name}': {kind} '{name}' of shape {_shape_str(array.shape)} "
                f"cannot be reshaped to {_shape_str(shape)}: {exc}"
            ) from None

    @staticmethod
    def _to_ort(model_name: str, spec: _IOSpec, array: np.ndarray) -> object:
        if spec.datatype == "BF16":
            bits = np.ascontiguousarray(array).view(np.uint16)
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=_ONNX_BFLOAT16)
        if spec.datatype == "BYTES":
            return _bytes_to_str_array(model_name, spec.name, array)
        return array

    def _from_ort(self, model_name: str, spec: _IOSpec, value: object) -> np.ndarray:
        array = np.asarray(value)
        if spec.datatype == "BYTES":
            return _str_to_bytes_array(array)
        if spec.datatype == "BF16":
            return array.astype(ml_dtypes.bfloat16)  # FP32 from the in-graph Cast: exact
        if array.dtype != spec.dtype:
            raise InternalError(
                f"model '{model_name}': output '{spec.name}' came back as {array.dtype}, "
                f"expected {spec.dtype}"
            )
        return array

    # --- unload ----------------------------------------------------------------------------------

    def unload(self) -> None:
        """Drop the session (ORT frees its memory when the last reference goes)."""
        if self._session is not None:
            logger.info("model '%s': unloaded", self._config.name if self._config else "?")
        self._session = None
        self._inputs = {}
        self._outputs = {}
        self._bf16_outputs = {}


def _bytes_to_str_array(model_name: str, name: str, array: np.ndarray) -> np.ndarray:
    """Object array of bytes/str -> object array of str, as ORT string tensors want."""
    flat = array.reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, item in enumerate(flat):
        if isinstance(item, bytes):
            try:
                out[i] = item.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"model '{model_name}': input '{name}': BYTES element {i} is not valid UTF-8; "
                    "ONNX Runtime string tensors hold UTF-8 text"
                ) from None
        elif isinstance(item, str):
            out[i] = item
        else:
            raise InvalidArgument(
                f"model '{model_name}': input '{name}': BYTES element {i} is a {type(item).__name__}, "
                "expected bytes"
            )
    return out.reshape(array.shape)


def _str_to_bytes_array(array: np.ndarray) -> np.ndarray:
    """ORT string output (object array of str) -> object array of UTF-8 bytes."""
    flat = array.reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, item in enumerate(flat):
        out[i] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return out.reshape(array.shape)


def _cast_bf16_outputs(model_path: Path, outputs: Sequence[str]) -> tuple[bytes, dict[str, str]]:
    """The model with each BF16 graph output ``o`` replaced by ``Cast(o, FLOAT)`` named
    ``o + suffix``; returns the serialized model and {output name: new session output name}.

    ORT's Python binding cannot hand BF16 tensors back as numpy; FP32 holds every BF16 value exactly.
    Models above protobuf's 2 GiB limit cannot be rewritten this way.
    """
    import onnx  # only needed for this rare case

    model = onnx.load(str(model_path))
    graph = model.graph
    mapping: dict[str, str] = {}
    wanted = set(outputs)
    for value_info in graph.output:
        if (
            value_info.name not in wanted
            or value_info.type.tensor_type.elem_type != onnx.TensorProto.BFLOAT16
        ):
            continue
        new_name = value_info.name + _BF16_AS_FP32_SUFFIX
        graph.node.append(
            onnx.helper.make_node(
                "Cast", [value_info.name], [new_name], to=onnx.TensorProto.FLOAT, name=new_name
            )
        )
        mapping[value_info.name] = new_name
        value_info.name = new_name
        value_info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    try:
        data = model.SerializeToString()
    except ValueError as exc:  # > 2 GiB
        raise InvalidArgument(
            f"model {model_path}: cannot serve BF16 outputs of a model this large: {exc}"
        ) from exc
    logger.info("model %s: BF16 outputs %s are cast to FP32 in the graph", model_path, sorted(mapping))
    return data, mapping
