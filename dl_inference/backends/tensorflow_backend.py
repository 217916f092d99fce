"""TensorFlow backend: serves one signature of a SavedModel (``<version>/model.savedmodel/``).

The signature (``signature_name``, default ``serving_default``) names and types the tensors, so the
config may leave inputs and outputs out; a signature whose inputs and outputs all have a dynamic first
dimension (Keras exports do) is served with batching (``default_max_batch_size``, default 8). Calls are
batch-native: the whole batch goes through one signature call.

CPU tuning, all config ``parameters`` (string values), applied once per worker process before
TensorFlow starts its thread pools (a worker hosts one model instance, so this is per instance):

``intra_op_threads``
    threads one operator may use (default **1**: a node runs one worker per instance and they share the
    cores; ``0`` lets TensorFlow use every core).
``inter_op_threads``
    threads running independent operators at once (default 1).
``onednn``
    ``on`` / ``off`` / ``default``: sets ``TF_ENABLE_ONEDNN_OPTS`` before TensorFlow is imported.
    TensorFlow's x86 builds turn oneDNN's fused kernels on by default only on CPUs with AVX-512 VNNI /
    AMX-class instructions, and off elsewhere (such as AVX2-only CPUs); ``on`` forces them.
``cpu_affinity``
    CPUs the worker may run on, as ``"0-3,6"``; set on every thread of the worker before TensorFlow
    starts its own, so its pools inherit it.
``saved_model_tags``
    comma-separated MetaGraph tags to load (default ``serve``).

A worker runs under the interpreter of its model's ``worker_environment`` (see the README), so the same
backend serves models with TensorFlow 2.15 + Intel Extension for TensorFlow from a separate venv: the
extension registers itself when TensorFlow is imported, and the load log line says whether it is there.

GPU: ``KIND_GPU`` places the model on ``/GPU:<id>`` when this TensorFlow sees one and otherwise runs on
the CPU with a warning. Only the CPU path has been run (the tensorflow-cpu wheel has no GPU support).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dl_inference.backends.base import Backend, get_parameter, parameter_int
from dl_inference.backends.tensor_specs import (
    IOSpec,
    ModelTensor,
    complete_io,
    io_spec,
    model_feed,
    requested_outputs,
    reshape,
)
from dl_inference.errors import InternalError, InvalidArgument, NotFound, Unavailable
from dl_inference.protocol.generated import model_config_pb2 as mc

if importlib.util.find_spec("tensorflow") is None:  # get_backend turns this into FAILED_PRECONDITION
    raise ImportError("TensorFlow is not installed (pip install 'dl_inference[tensorflow]')")

log = logging.getLogger(__name__)

DEFAULT_MODEL_FILENAME = "model.savedmodel"
DEFAULT_SIGNATURE = "serving_default"
ONEDNN_MODES = ("default", "on", "off")

# TensorFlow dtype names -> V2 datatypes.
_TF_TO_V2 = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
    "bfloat16": "BF16", "float32": "FP32", "float64": "FP64", "string": "BYTES",
}  # fmt: skip

# What this process's TensorFlow was started with; thread counts and oneDNN cannot change afterwards.
_runtime: dict[str, str] = {}


def parse_cpu_list(text: str, model_name: str) -> set[int]:
    """``"0-3,6"`` -> {0, 1, 2, 3, 6}; InvalidArgument naming the parameter for anything else."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                if last < first:
                    raise ValueError(part)
                cpus.update(range(first, last + 1))
            elif part:
                cpus.add(int(part))
    except ValueError:
        raise InvalidArgument(
            f"model '{model_name}': parameter 'cpu_affinity' must be a CPU list such as '0-3,6', got '{text}'"
        ) from None
    if not cpus or min(cpus) < 0:
        raise InvalidArgument(f"model '{model_name}': parameter 'cpu_affinity' names no CPU: '{text}'")
    return cpus


def _set_affinity(cpus: set[int], model_name: str) -> None:
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise InvalidArgument(
            f"model '{model_name}': cpu_affinity names CPUs {sorted(cpus - allowed)} this worker may not use "
            f"(allowed: {sorted(allowed)})"
        )
    for task in os.listdir("/proc/self/task"):  # sched_setaffinity(0) changes the calling thread only
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpus)


def _start_tensorflow(config: mc.ModelConfig) -> Any:
    """Import TensorFlow with this model's oneDNN, thread and affinity settings (once per process)."""
    name = config.name
    onednn = (get_parameter(config, "onednn") or "default").strip().lower()
    if onednn not in ONEDNN_MODES:
        raise InvalidArgument(f"model '{name}': parameter 'onednn' must be one of {', '.join(ONEDNN_MODES)}")
    intra = parameter_int(config, "intra_op_threads", 1, minimum=0)
    inter = parameter_int(config, "inter_op_threads", 1, minimum=0)
    affinity = get_parameter(config, "cpu_affinity")
    wanted = {"onednn": onednn, "intra_op_threads": str(intra), "inter_op_threads": str(inter)}
    if _runtime:
        changed = [k for k, v in wanted.items() if _runtime[k] != v]
        if changed:  # only in-process use (tests, tools): a worker process loads one model once
            log.warning("model '%s': TensorFlow already started with %s; %s ignored", name, _runtime, changed)
        import tensorflow as tf

        return tf
    if affinity:
        _set_affinity(parse_cpu_list(affinity, name), name)
    if onednn != "default":
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if onednn == "on" else "0"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError as exc:  # TensorFlow was already running in this process
        log.warning("model '%s': thread settings not applied: %s", name, exc)
    _runtime.update(wanted)
    _runtime["describe"] = _describe_runtime(tf)
    return tf


def _describe_runtime(tf: Any) -> str:
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    parts = [f"TensorFlow {tf.__version__}", f"TF_ENABLE_ONEDNN_OPTS={onednn if onednn is not None else 'unset'}"]
    if importlib.util.find_spec("intel_extension_for_tensorflow") is not None:
        try:
            import intel_extension_for_tensorflow as itex

            # Importable is not the same as running: its CPU plugin library must be mapped into this process.
            loaded = "plugin loaded" if _library_mapped("libitex_cpu") else "plugin NOT loaded"
            parts.append(f"Intel Extension for TensorFlow {itex.__version__} ({loaded})")
        except Exception as exc:  # present but broken: say so rather than claim it runs
            parts.append(f"Intel Extension for TensorFlow failed to import: {exc}")
    return ", ".join(parts)


def _library_mapped(stem: str) -> bool:
    try:
        return stem in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _model_tensor(name: str, spec: Any, kind: str, model_name: str) -> ModelTensor:
    datatype = _TF_TO_V2.get(spec.dtype.name)
    if datatype is None:
        raise InvalidArgument(
            f"model '{model_name}': signature {kind} '{name}' has TensorFlow dtype {spec.dtype.name}, "
            "which has no V2 datatype"
        )
    if spec.shape.rank is None:
        raise InvalidArgument(
            f"model '{model_name}': signature {kind} '{name}' has an unknown rank; export it with a TensorSpec shape"
        )
    return ModelTensor(name, datatype, tuple(-1 if d is None else int(d) for d in spec.shape.as_list()))


class TensorFlowBackend(Backend):
    name = "tensorflow"

    def __init__(self) -> None:
        self._tf: Any = None
        self._loaded: Any = None  # the loaded SavedModel object; keeps the signature's variables alive
        self._fn: Any = None
        self._device = "/CPU:0"
        self._config: mc.ModelConfig | None = None
        self._inputs: dict[str, IOSpec] = {}
        self._outputs: dict[str, IOSpec] = {}
        self._batching = False

    def load(
        self, version_dir: Path, config: mc.ModelConfig, device: str = "cpu", device_id: int | None = None
    ) -> mc.ModelConfig:
        if self._fn is not None:
            self.unload()
        name = config.name or Path(version_dir).parent.name
        path = Path(version_dir) / (config.default_model_filename or DEFAULT_MODEL_FILENAME)
        if not (path / "saved_model.pb").is_file() and not (path / "saved_model.pbtxt").is_file():
            raise NotFound(f"model '{name}': no SavedModel at {path} (expected a directory holding saved_model.pb)")
        tf = _start_tensorflow(config)
        self._tf = tf
        self._device = self._pick_device(tf, device, device_id, name)
        tags = [t.strip() for t in (get_parameter(config, "saved_model_tags") or "serve").split(",") if t.strip()]
        signature = get_parameter(config, "signature_name") or DEFAULT_SIGNATURE
        try:
            with tf.device(self._device):
                loaded = tf.saved_model.load(str(path), tags=tags)
        except Exception as exc:
            raise InvalidArgument(f"model '{name}': TensorFlow cannot load the SavedModel {path}: {exc}") from exc
        signatures = dict(getattr(loaded, "signatures", {}) or {})
        if signature not in signatures:
            raise InvalidArgument(
                f"model '{name}': the SavedModel has no signature '{signature}'; its signatures are: "
                f"{', '.join(sorted(signatures)) or 'none'} (choose one with parameter 'signature_name')"
            )
        fn = signatures[signature]
        args, kwargs = fn.structured_input_signature
        if args:
            raise InvalidArgument(f"model '{name}': signature '{signature}' takes positional inputs; inputs need names")
        outputs = fn.structured_outputs
        if not isinstance(outputs, dict):
            raise InvalidArgument(f"model '{name}': signature '{signature}' does not return named outputs")
        model_inputs = {k: _model_tensor(k, s, "input", name) for k, s in kwargs.items()}
        model_outputs = {k: _model_tensor(k, s, "output", name) for k, s in outputs.items()}

        completed = mc.ModelConfig()
        completed.CopyFrom(config)
        completed.name = name
        if not completed.platform and not completed.backend:
            completed.backend = "tensorflow"
        if not completed.platform:
            completed.platform = "tensorflow_savedmodel"
        complete_io(completed, model_inputs, model_outputs, f"SavedModel signature '{signature}'")
        completed.parameters["tensorflow_runtime"].string_value = _runtime["describe"]

        self._loaded, self._fn, self._config = loaded, fn, completed
        self._batching = completed.max_batch_size > 0
        self._inputs = {t.name: io_spec(t, self._batching) for t in completed.input}
        self._outputs = {t.name: io_spec(t, self._batching) for t in completed.output}
        log.info(
            "model '%s': loaded %s signature '%s' on %s (max_batch_size %d; %s; intra-op %s, inter-op %s threads)",
            name, path, signature, self._device, completed.max_batch_size, _runtime["describe"],
            _runtime["intra_op_threads"], _runtime["inter_op_threads"],
        )  # fmt: skip
        return completed

    @staticmethod
    def _pick_device(tf: Any, device: str, device_id: int | None, name: str) -> str:
        if device.lower() == "cpu":
            return "/CPU:0"
        gpus = tf.config.list_logical_devices("GPU")
        index = device_id or 0
        if index < len(gpus):
            return f"/GPU:{index}"
        log.warning("model '%s': GPU %d requested but this TensorFlow sees %d GPU(s); running on CPU", name, index,
                    len(gpus))  # fmt: skip
        return "/CPU:0"

    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        fn, tf, config = self._fn, self._tf, self._config
        if fn is None or config is None:
            raise Unavailable("tensorflow backend: no model loaded")
        model_name = config.name
        feed = model_feed(model_name, inputs, self._inputs, self._batching)
        requested = requested_outputs(model_name, output_names, self._outputs)
        try:
            with tf.device(self._device):
                results = fn(**{n: tf.convert_to_tensor(a) for n, a in feed.items()})
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            raise InvalidArgument(f"model '{model_name}': TensorFlow refused the inputs: {_first_line(exc)}") from exc
        except Exception as exc:
            raise InternalError(f"model '{model_name}': TensorFlow inference failed: {_first_line(exc)}") from exc
        outputs: dict[str, np.ndarray] = {}
        for out_name in requested:
            spec = self._outputs[out_name]
            array = results[out_name].numpy()
            if spec.model_shape is not None:
                array = reshape(model_name, "output", out_name, array, spec.shape)
            if spec.datatype != "BYTES" and array.dtype != spec.dtype:
                raise InternalError(
                    f"model '{model_name}': output '{out_name}' came back as {array.dtype}, expected {spec.dtype}"
                )
            outputs[out_name] = array
        return outputs

    def unload(self) -> None:
        if self._fn is not None:
            log.info("model '%s': unloaded", self._config.name if self._config else "?")
        self._fn = self._loaded = None
        self._inputs, self._outputs = {}, {}
        gc.collect()


def _first_line(exc: BaseException) -> str:
    """The line of a TensorFlow error that says what is wrong: its message wraps it in "Graph execution
    error", a "Detected at node" trace and the op's graph context, none of which helps a client."""
    text = getattr(exc, "message", None) or str(exc)
    for line in text.splitlines():
        line = line.rstrip()
        if not line or line[0].isspace() or line.startswith(_NOISE):
            continue
        return line
    return type(exc).__name__


_NOISE = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "File ", "[[")


__all__ = ["TensorFlowBackend", "parse_cpu_list"]
