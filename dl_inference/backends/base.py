"""The backend contract and the registry of backends.

A backend hosts one model instance inside a worker process. It is transport-free: it receives and
returns named numpy arrays (BYTES tensors are object arrays of ``bytes``, BF16 tensors use
``ml_dtypes.bfloat16``) and never sees protobuf, JSON or HTTP. It is batch-native: when the model's
``max_batch_size`` is > 0 every input and output carries the batch as its first dimension, and the
dynamic batcher hands the backend whole batches.

Backend modules import their ML framework at module level, so this module only knows them by an
import path: importing :mod:`dl_inference.backends` or this module never imports onnxruntime, torch or
tensorflow; :func:`get_backend` imports the chosen backend's module on first use.
"""

from __future__ import annotations

import abc
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dl_inference.errors import Code, InvalidArgument, ServerError
from dl_inference.protocol.generated.model_config_pb2 import ModelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "Backend",
    "available_backends",
    "get_backend",
    "get_parameter",
    "parameter_bool",
    "parameter_int",
    "register_backend",
]


class Backend(abc.ABC):
    """One loaded model instance: ``load`` once, ``infer`` many times (possibly from several threads
    if the worker chooses to), ``unload`` once."""

    #: Registry name of the backend (``config.backend``), e.g. ``"onnxruntime"``.
    name: str = ""

    @abc.abstractmethod
    def load(
        self,
        version_dir: Path,
        config: ModelConfig,
        device: str = "cpu",
        device_id: int | None = None,
    ) -> ModelConfig:
        """Load the model found in ``version_dir`` (e.g. ``<repo>/<model>/1``).

        ``config`` is the model configuration as written by the operator (possibly empty but for its
        name). The returned config is a new message completed from the model file: inputs, outputs,
        their datatypes and dims, and ``max_batch_size`` where the model allows it. A config that
        contradicts the model raises :class:`~dl_inference.errors.InvalidArgument` naming the tensor.

        ``device`` is ``"cpu"`` or ``"gpu"``; ``device_id`` picks the GPU (default 0).
        """

    @abc.abstractmethod
    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the model on one batch.

        ``inputs`` maps every model input name to an array (with the batch dimension first when
        ``max_batch_size`` > 0). ``output_names`` selects the outputs to compute; empty means all
        outputs of the config. Bad inputs raise :class:`~dl_inference.errors.InvalidArgument`
        naming the tensor; other failures raise a :class:`~dl_inference.errors.ServerError`.
        """

    @abc.abstractmethod
    def unload(self) -> None:
        """Release the model and everything it holds. Calling it twice is harmless."""


# --- config parameters -------------------------------------------------------------------------


def get_parameter(config: ModelConfig, key: str, default: str | None = None) -> str | None:
    """``config.parameters[key].string_value``, or ``default`` if the key is absent."""
    if key in config.parameters:
        return config.parameters[key].string_value
    return default


def parameter_int(config: ModelConfig, key: str, default: int, minimum: int | None = None) -> int:
    """An integer parameter; InvalidArgument naming the key when it is not an integer >= minimum."""
    raw = get_parameter(config, key)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise InvalidArgument(f"model '{config.name}': parameter '{key}' must be an integer, got '{raw}'") from None
    if minimum is not None and value < minimum:
        raise InvalidArgument(f"model '{config.name}': parameter '{key}' must be >= {minimum}, got {value}")
    return value


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def parameter_bool(config: ModelConfig, key: str, default: bool = False) -> bool:
    """A boolean parameter (true/false, 1/0, yes/no, on/off; case-insensitive)."""
    raw = get_parameter(config, key)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidArgument(f"model '{config.name}': parameter '{key}' must be true or false, got '{raw}'")


# --- registry ----------------------------------------------------------------------------------

# name -> "module:ClassName"; modules are imported only by get_backend.
_REGISTRY: dict[str, str] = {
    "onnxruntime": "dl_inference.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "caffe": "dl_inference.backends.caffe_backend:CaffeBackend",
    "pytorch": "dl_inference.backends.pytorch_backend:PyTorchBackend",
    "tensorrt": "dl_inference.backends.tensorrt_backend:TensorRTBackend",
    "tensorflow": "dl_inference.backends.tensorflow_backend:TensorFlowBackend",
    "openvino": "dl_inference.backends.openvino_backend:OpenVinoBackend",
}
# Triton platform names and other spellings -> registry name.
_ALIASES: dict[str, str] = {
    "onnxruntime_onnx": "onnxruntime",
    "onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "libtorch": "pytorch",
    "torch": "pytorch",
    "tensorrt_plan": "tensorrt",
    "tensorflow_savedmodel": "tensorflow",
}


def register_backend(name: str, target: str, aliases: Sequence[str] = ()) -> None:
    """Register a backend by import path ``"package.module:ClassName"`` (imported only when used).

    ``aliases`` are other names that resolve to it (e.g. Triton platform names such as
    ``"pytorch_libtorch"``).
    """
    if ":" not in target:
        raise ValueError(f"backend target must look like 'package.module:ClassName', got '{target}'")
    _REGISTRY[name] = target
    for alias in aliases:
        _ALIASES[alias] = name


def available_backends() -> list[str]:
    """Registered backend names (sorted), without aliases."""
    return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    """A new, unloaded instance of the backend called ``name`` (a registry name or an alias).

    Imports the backend's module (and so its ML framework) now. An unknown name raises
    InvalidArgument listing the available backends; a backend whose framework is not installed in
    this environment raises a FAILED_PRECONDITION :class:`~dl_inference.errors.ServerError`.
    """
    key = _ALIASES.get(name, name)
    target = _REGISTRY.get(key)
    if target is None:
        raise InvalidArgument(f"unknown backend '{name}'; available backends: {', '.join(available_backends())}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ServerError(
            f"backend '{key}' cannot be used in this environment: {exc}", Code.FAILED_PRECONDITION
        ) from exc
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{target} is not a Backend subclass")
    logger.debug("backend '%s' -> %s", name, target)
    return cls()
