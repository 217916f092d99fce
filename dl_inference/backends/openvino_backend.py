"""OpenVINO backend (``backend: "openvino"``): ONNX, OpenVINO IR and TensorFlow SavedModels on the CPU.

The model file, in the version directory: ``default_model_filename`` if the config sets it, else the
first of ``model.xml`` (IR, with its ``model.bin``), ``model.onnx``, ``model.savedmodel/`` that is there.
OpenVINO reads each with its own front end (no TensorFlow needed for a SavedModel; a graph with an op it
cannot convert is refused naming the ops).

Settings (the config's ``parameters``, string values):

``precision``
    ``f32`` (default: results as the model's own arithmetic), ``bf16`` or ``f16``: OpenVINO's
    inference precision hint. bf16 runs natively on CPUs with AMX or AVX-512 BF16; elsewhere OpenVINO
    keeps f32, which the worker logs (with the CPU's capabilities) instead of pretending.
``num_threads``
    threads of one inference (OpenVINO's ``INFERENCE_NUM_THREADS``; default **1**, as for the other CPU
    backends: a host runs one worker process per instance and they share the cores; ``0`` lets OpenVINO
    take every core).
``num_streams``
    OpenVINO streams (default 1: one batch at a time per instance, as the dynamic batcher hands them).
``performance_hint``
    ``LATENCY`` or ``THROUGHPUT`` (OpenVINO's own hint; unset by default, the explicit settings above
    apply).
``model_cache``
    ``true`` (default): compiled models are kept under ``$DL_INFERENCE_CACHE_DIR/openvino`` (default
    ``~/.cache/dl_inference/openvino``), keyed by OpenVINO on the model, the device and these settings,
    so a restarted instance loads without compiling again; ``false`` compiles every time.

Batching: a model whose inputs and outputs have a dynamic first dimension gets ``max_batch_size``
like the ONNX Runtime backend's models (the dynamic batcher hands it whole batches).

Datatypes: every V2 datatype but BYTES. BF16 tensors are converted to and from FP32 at the model's
edge (both conversions exact), because numpy has no bfloat16 OpenVINO takes. A model with a string
(BYTES) input or output is refused at load: OpenVINO 2026.4's string tensors corrupt the heap of the
process that runs them (an identity model over strings aborts with ``munmap_chunk(): invalid pointer``
here), so such models belong on the onnxruntime or tensorflow backend.

The completed config carries ``parameters { key: "openvino_runtime" }``: OpenVINO's version and the
precision the compiled model really runs in.

``instance_group { kind: KIND_GPU }`` is refused: this backend runs on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import openvino as ov

from dl_inference.backends.base import Backend, get_parameter, parameter_bool, parameter_int
from dl_inference.backends.tensor_specs import (
    IOSpec,
    ModelTensor,
    complete_io,
    io_spec,
    model_feed,
    requested_outputs,
    reshape,
)
from dl_inference.convert.filecache import cache_root
from dl_inference.errors import InternalError, InvalidArgument, NotFound, ServerError, Unavailable
from dl_inference.protocol.generated import model_config_pb2 as mc

logger = logging.getLogger(__name__)

__all__ = ["MODEL_FILES", "OpenVinoBackend", "cache_dir"]

MODEL_FILES = ("model.xml", "model.onnx", "model.savedmodel")  # looked for in this order
PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}
HINTS = ("LATENCY", "THROUGHPUT")

_OV_TO_V2: dict[str, str] = {
    "boolean": "BOOL",
    "u8": "UINT8",
    "u16": "UINT16",
    "u32": "UINT32",
    "u64": "UINT64",
    "i8": "INT8",
    "i16": "INT16",
    "i32": "INT32",
    "i64": "INT64",
    "f16": "FP16",
    "f32": "FP32",
    "f64": "FP64",
    "bf16": "BF16",
    "string": "BYTES",
}


def cache_dir() -> Path:
    """``$DL_INFERENCE_CACHE_DIR/openvino`` (default ``~/.cache/dl_inference/openvino``)."""
    return cache_root("openvino")


def _v2_type(port: ov.Output, kind: str, model_name: str) -> str:
    type_name = port.get_element_type().get_type_name()
    datatype = _OV_TO_V2.get(type_name)
    if datatype is None:
        raise InvalidArgument(
            f"model '{model_name}': {kind} '{port.get_any_name()}' has OpenVINO type {type_name}, "
            "which has no V2 datatype"
        )
    return datatype


def _model_tensor(port: ov.Output, kind: str, model_name: str) -> ModelTensor:
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        raise InvalidArgument(
            f"model '{model_name}': {kind} '{port.get_any_name()}' has no fixed rank; export the model with "
            "a known number of dimensions"
        )
    dims = tuple(d.get_length() if d.is_static else -1 for d in shape)
    return ModelTensor(port.get_any_name(), _v2_type(port, kind, model_name), dims)


def find_model_file(version_dir: Path, config: mc.ModelConfig, model_name: str) -> Path:
    """The model file (or SavedModel directory) this backend loads from ``version_dir``."""
    if config.default_model_filename:
        path = version_dir / config.default_model_filename
        if not path.exists():
            raise NotFound(f"model '{model_name}': model file {path} not found")
        return path
    for name in MODEL_FILES:
        if (version_dir / name).exists():
            return version_dir / name
    raise NotFound(f"model '{model_name}': none of {', '.join(MODEL_FILES)} in {version_dir}")


class OpenVinoBackend(Backend):
    """Serves one model with an OpenVINO compiled model on the CPU; see the module docstring."""

    name = "openvino"

    def __init__(self) -> None:
        self._compiled: ov.CompiledModel | None = None
        self._request: ov.InferRequest | None = None
        self._config: mc.ModelConfig | None = None
        self._inputs: dict[str, IOSpec] = {}
        self._outputs: dict[str, IOSpec] = {}
        self._ports: dict[str, ov.ConstOutput] = {}
        self._batching = False
        self.precision = ""  # the inference precision the compiled model really uses
        self.compile_seconds = 0.0

    @property
    def config(self) -> mc.ModelConfig:
        if self._config is None:
            raise Unavailable("openvino backend: no model loaded")
        return self._config

    # --- load ------------------------------------------------------------------------------------
    def load(
        self,
        version_dir: Path,
        config: mc.ModelConfig,
        device: str = "cpu",
        device_id: int | None = None,
    ) -> mc.ModelConfig:
        if self._compiled is not None:
            self.unload()
        model_name = config.name or Path(version_dir).parent.name
        if device.lower() != "cpu":
            raise InvalidArgument(
                f"model '{model_name}': the openvino backend runs on the CPU; use instance_group kind KIND_CPU "
                f"(asked for {device})"
            )
        properties = self._properties(config, model_name)
        path = find_model_file(Path(version_dir), config, model_name)
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError with the front end's report
            raise InvalidArgument(f"model '{model_name}': OpenVINO cannot read {path}: {exc}") from exc

        completed = mc.ModelConfig()
        completed.CopyFrom(config)
        completed.name = model_name
        if not completed.backend:
            completed.backend = "openvino"
        inputs = {t.name: t for t in (_model_tensor(p, "input", model_name) for p in model.inputs)}
        outputs = {t.name: t for t in (_model_tensor(p, "output", model_name) for p in model.outputs)}
        strings = [t.name for t in [*inputs.values(), *outputs.values()] if t.datatype == "BYTES"]
        if strings:
            raise InvalidArgument(
                f"model '{model_name}': tensor '{strings[0]}' is a string (BYTES) tensor, which the openvino "
                "backend does not serve (OpenVINO's string tensors corrupt the worker's memory); use the "
                "onnxruntime or tensorflow backend for this model"
            )
        complete_io(completed, inputs, outputs)
        model = self._bf16_edges(model, completed)

        cached = _cache_entries(properties)
        start = time.monotonic()
        try:
            compiled = core.compile_model(model, "CPU", properties)
        except Exception as exc:
            raise InvalidArgument(f"model '{model_name}': OpenVINO cannot compile {path}: {exc}") from exc
        self.compile_seconds = time.monotonic() - start
        from_cache = cached is not None and _cache_entries(properties) == cached and cached > 0

        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._config = completed
        self._batching = completed.max_batch_size > 0
        self._inputs = {t.name: io_spec(t, self._batching) for t in completed.input}
        self._outputs = {t.name: io_spec(t, self._batching) for t in completed.output}
        self._ports = {p.get_any_name(): p for p in compiled.outputs}
        self.precision = str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
        version = ov.get_version().split("-")[0]
        completed.parameters["openvino_runtime"].string_value = f"OpenVINO {version}, precision {self.precision}"
        asked = properties.get("INFERENCE_PRECISION_HINT", "f32")
        if asked != self.precision:
            logger.warning(
                "model '%s': precision %s was asked for, but this CPU (%s; capabilities %s) runs it in %s",
                model_name, asked, core.get_property("CPU", "FULL_DEVICE_NAME"),
                ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")), self.precision,
            )  # fmt: skip
        logger.info(
            "model '%s': %s compiled by OpenVINO %s in %.2f s%s: precision %s, %s threads, %s streams, "
            "max_batch_size %d",
            model_name, path.name, version, self.compile_seconds,
            " (from the model cache)" if from_cache else "", self.precision,
            compiled.get_property("INFERENCE_NUM_THREADS"), compiled.get_property("NUM_STREAMS"),
            completed.max_batch_size,
        )  # fmt: skip
        return completed

    @staticmethod
    def _properties(config: mc.ModelConfig, model_name: str) -> dict[str, object]:
        raw = (get_parameter(config, "precision") or "f32").strip().lower()
        if raw not in PRECISIONS:
            raise InvalidArgument(
                f"model '{model_name}': parameter 'precision' must be one of f32, bf16, f16, got '{raw}'"
            )
        properties: dict[str, object] = {
            "INFERENCE_PRECISION_HINT": PRECISIONS[raw],
            "INFERENCE_NUM_THREADS": parameter_int(config, "num_threads", 1, minimum=0),
            "NUM_STREAMS": parameter_int(config, "num_streams", 1, minimum=1),
        }
        hint = (get_parameter(config, "performance_hint") or "").strip().upper()
        if hint:
            if hint not in HINTS:
                raise InvalidArgument(
                    f"model '{model_name}': parameter 'performance_hint' must be LATENCY or THROUGHPUT, got '{hint}'"
                )
            properties["PERFORMANCE_HINT"] = hint
        if parameter_bool(config, "model_cache", True):
            directory = cache_dir()
            directory.mkdir(parents=True, exist_ok=True)
            properties["CACHE_DIR"] = str(directory)
        return properties

    @staticmethod
    def _bf16_edges(model: ov.Model, config: mc.ModelConfig) -> ov.Model:
        """BF16 inputs and outputs take and give FP32 at the model's edge (exact both ways)."""
        inputs = [t.name for t in config.input if t.data_type == mc.TYPE_BF16]
        outputs = [t.name for t in config.output if t.data_type == mc.TYPE_BF16]
        if not inputs and not outputs:
            return model
        from openvino.preprocess import PrePostProcessor

        ppp = PrePostProcessor(model)
        for name in inputs:
            ppp.input(name).tensor().set_element_type(ov.Type.f32)
        for name in outputs:
            ppp.output(name).tensor().set_element_type(ov.Type.f32)
        return ppp.build()

    # --- infer -----------------------------------------------------------------------------------
    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        request = self._request
        if request is None:
            raise Unavailable("openvino backend: no model loaded")
        model_name = self.config.name
        checked = model_feed(model_name, inputs, self._inputs, self._batching)
        feed = {n: _to_ov(model_name, self._inputs[n], a) for n, a in checked.items()}
        requested = requested_outputs(model_name, output_names, self._outputs)
        try:
            results = request.infer(feed)
        except Exception as exc:
            raise _ov_error(exc, f"model '{model_name}': OpenVINO inference failed") from exc
        out: dict[str, np.ndarray] = {}
        for name in requested:
            spec = self._outputs[name]
            array = _from_ov(model_name, spec, results[self._ports[name]])
            if spec.model_shape is not None:
                array = reshape(model_name, "output", name, array, spec.shape)
            out[name] = array
        return out

    # --- unload ----------------------------------------------------------------------------------
    def unload(self) -> None:
        if self._compiled is not None:
            logger.info("model '%s': unloaded", self._config.name if self._config else "?")
        self._request = None
        self._compiled = None
        self._inputs = {}
        self._outputs = {}
        self._ports = {}


def _cache_entries(properties: dict[str, object]) -> int | None:
    """Files in the model cache now (None when the cache is off): a compile that adds none was a hit."""
    directory = properties.get("CACHE_DIR")
    if directory is None:
        return None
    try:
        return sum(1 for _ in Path(str(directory)).iterdir())
    except OSError:
        return 0


def _ov_error(exc: Exception, what: str) -> ServerError:
    """OpenVINO reports bad shapes and types as RuntimeError with a 'Check ... failed' message."""
    text = str(exc)
    if "shape" in text.lower() or "precision" in text.lower() or "type" in text.lower():
        return InvalidArgument(f"{what}: {text}")
    return InternalError(f"{what}: {text}")


def _to_ov(model_name: str, spec: IOSpec, array: np.ndarray) -> np.ndarray:
    if spec.datatype == "BF16":
        return np.asarray(array, dtype=np.float32)  # exact; converted back to bf16 at the model's edge
    return np.ascontiguousarray(array)


def _from_ov(model_name: str, spec: IOSpec, value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    if spec.datatype == "BF16":
        return array.astype(ml_dtypes.bfloat16)  # FP32 from the edge conversion: exact
    if array.dtype != spec.dtype:
        raise InternalError(
            f"model '{model_name}': output '{spec.name}' came back as {array.dtype}, expected {spec.dtype}"
        )
    return array
