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
from pathlib import Path

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from dl_inference.backends.base import Backend, parameter_bool, parameter_int
from dl_inference.backends.tensor_specs import (
    IOSpec,
    ModelTensor,
    complete_io,
    io_spec,
    model_feed,
    requested_outputs,
    reshape,
)
from dl_inference.errors import InternalError, InvalidArgument, NotFound, ServerError, Unavailable
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.repository.external_data import check_external_data

logger = logging.getLogger(__name__)

__all__ = ["OnnxRuntimeBackend", "onnx_type_to_v2"]

DEFAULT_MODEL_FILENAME = "model.onnx"
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


def _model_tensor(arg: ort.NodeArg, kind: str, model_name: str) -> ModelTensor:
    name = arg.name
    ort_type = arg.type
    datatype = onnx_type_to_v2(ort_type)
    if datatype is None:
        raise InvalidArgument(
            f"model '{model_name}': {kind} '{name}' has ONNX type {ort_type}, which has no V2 datatype"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return ModelTensor(name, datatype, shape)


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
        self._inputs: dict[str, IOSpec] = {}
        self._outputs: dict[str, IOSpec] = {}
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
        check_external_data(model_path, model_name)

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
        self._inputs = {t.name: io_spec(t, self._batching) for t in completed.input}
        self._outputs = {t.name: io_spec(t, self._batching) for t in completed.output}
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
        complete_io(config, model_inputs, model_outputs)

    # --- infer -----------------------------------------------------------------------------------

    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the session on one batch; see :class:`Backend`."""
        session = self._session
        if session is None:
            raise Unavailable("onnxruntime backend: no model loaded")
        model_name = self.config.name

        checked = model_feed(model_name, inputs, self._inputs, self._batching)
        feed = {n: self._to_ort(model_name, self._inputs[n], a) for n, a in checked.items()}
        requested = requested_outputs(model_name, output_names, self._outputs)
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
                array = reshape(model_name, "output", out_name, array, spec.shape)
            outputs[out_name] = array
        return outputs

    @staticmethod
    def _to_ort(model_name: str, spec: IOSpec, array: np.ndarray) -> object:
        if spec.datatype == "BF16":
            bits = np.ascontiguousarray(array).view(np.uint16)
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=_ONNX_BFLOAT16)
        if spec.datatype == "BYTES":
            return _bytes_to_str_array(model_name, spec.name, array)
        return array

    def _from_ort(self, model_name: str, spec: IOSpec, value: object) -> np.ndarray:
        array = np.asarray(value)
        if spec.datatype == "BYTES":
            return _str_to_bytes_array(array)
        if spec.datatype == "BF16":
            return array.astype(ml_dtypes.bfloat16)  # FP32 from the in-graph Cast: exact
        if array.dtype != spec.dtype:
            raise InternalError(
                f"model '{model_name}': output '{spec.name}' came back as {array.dtype}, expected {spec.dtype}"
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
                f"model '{model_name}': input '{name}': BYTES element {i} is a {type(item).__name__}, expected bytes"
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
        if value_info.name not in wanted or value_info.type.tensor_type.elem_type != onnx.TensorProto.BFLOAT16:
            continue
        new_name = value_info.name + _BF16_AS_FP32_SUFFIX
        graph.node.append(
            onnx.helper.make_node("Cast", [value_info.name], [new_name], to=onnx.TensorProto.FLOAT, name=new_name)
        )
        mapping[value_info.name] = new_name
        value_info.name = new_name
        value_info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    try:
        data = model.SerializeToString()
    except ValueError as exc:  # > 2 GiB
        raise InvalidArgument(f"model {model_path}: cannot serve BF16 outputs of a model this large: {exc}") from exc
    logger.info("model %s: BF16 outputs %s are cast to FP32 in the graph", model_path, sorted(mapping))
    return data, mapping
