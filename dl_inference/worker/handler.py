"""Pre- and post-processing handlers: a model's own Python code around any backend.

A model may ship a ``handler.py`` in its version directory (``<model>/<N>/handler.py``, looked up
first) or in its model directory (``<model>/handler.py``, shared by all versions). It may define:

``initialize(context)``
    called once after the backend has loaded, before warm-up; ``context`` is a :class:`HandlerContext`
    (model name, version, directories, both configs, device). Read labels, tokenizers... here.
``preprocess(inputs, parameters) -> dict``
    ``inputs`` holds the request's tensors as the client sent them (the config's ``input`` section),
    batched (first dimension = rows of every request in the batch); returns the backend's inputs:
    numpy arrays, or for the PyTorch backend also ``torch.Tensor`` s, passed through untouched (a
    tensor already on the instance's GPU stays there: no host copy).
``infer(model, inputs) -> dict``
    replaces the plain backend call; ``model(inputs)`` runs the backend (see :class:`ModelCall`).
``postprocess(outputs, parameters) -> dict``
    turns the backend's outputs into the client's outputs (the config's ``output`` section), keeping
    the batch dimension: row ``i`` of every output belongs to row ``i`` of the inputs.

All three are optional (a missing one passes its argument through). ``parameters`` is a plain dict:
the config's ``parameters`` (strings) overlaid with the request's parameters (bool/int/float/str),
minus the ones the server itself consumes (``priority``, ``timeout``...). Requests batch together only
when their parameters are equal, so a handler sees one ``parameters`` per call.

The config's ``input``/``output`` describe what clients send and receive. The backend loads the model
file with them stripped, so it describes its own tensors; a config section left empty takes the
backend's tensors. ``max_batch_size`` comes from the config, else from the backend.

Errors: an exception raised in ``preprocess`` is the client's (INVALID_ARGUMENT, HTTP 400) and one
raised in ``infer``/``postprocess`` is the server's (INTERNAL, HTTP 500); both carry the exception's
type and message, e.g. ``model 'image_classifier': handler preprocess failed: ValueError: cannot
decode image``. A :class:`~dl_inference.errors.ServerError` raised by a handler keeps its own code
and message. The worker keeps serving either way; when a batch of several requests fails with a
client error each request is retried alone, so only the one at fault fails.

``handler.py`` is code run in the worker with its privileges, like ``model.py``: a model repository
must be trusted.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dl_inference.backends.base import Backend
from dl_inference.errors import InternalError, InvalidArgument, ServerError
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc

log = logging.getLogger(__name__)

__all__ = [
    "HANDLER_FILE",
    "RESERVED_PARAMETERS",
    "Handler",
    "HandlerContext",
    "ModelCall",
    "find_handler",
    "request_parameters",
]

HANDLER_FILE = "handler.py"

#: Request parameters the server consumes; they never reach a handler or split batches.
RESERVED_PARAMETERS = frozenset(
    {
        "priority",
        "timeout",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "headers",
        "binary_data_output",
        "triton_enable_empty_final_response",
    }
)

_HOOKS = ("initialize", "preprocess", "infer", "postprocess")


def find_handler(version_dir: Path) -> Path | None:
    """``<version>/handler.py`` if present, else ``<model>/handler.py``, else None."""
    for folder in (version_dir, version_dir.parent):
        path = folder / HANDLER_FILE
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class HandlerContext:
    """What ``initialize(context)`` receives."""

    model_name: str
    version: int
    model_dir: Path
    version_dir: Path
    #: the client-facing config (what ``GET /v2/models/{m}/config`` shows)
    config: mc.ModelConfig
    #: the config the backend completed from the model file (its own tensors)
    backend_config: mc.ModelConfig
    device: str
    device_id: int | None

    @property
    def parameters(self) -> dict[str, str]:
        """The config's ``parameters`` as a plain dict of strings."""
        return config_parameters(self.config)


class ModelCall:
    """The ``model`` a custom ``infer(model, inputs)`` receives: call it to run the backend."""

    def __init__(self, backend: Backend, config: mc.ModelConfig) -> None:
        self.backend = backend
        #: the backend's completed config (its own inputs and outputs)
        self.config = config
        self.input_names = [t.name for t in config.input]
        self.output_names = [t.name for t in config.output]

    def __call__(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Run the backend on ``inputs``; ``output_names`` empty means all of its outputs."""
        return self.backend.infer(dict(inputs), list(output_names))


def config_parameters(config: mc.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def request_parameters(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The request's parameters as Python values, without the reserved ones."""
    out: dict[str, Any] = {}
    for key, param in request.parameters.items():
        if key in RESERVED_PARAMETERS:
            continue
        kind = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, kind) if kind is not None else None
    return out


def _user_error(stage: str, model: str, exc: BaseException) -> ServerError:
    if isinstance(exc, ServerError):
        return exc
    message = f"model '{model}': handler {stage} failed: {type(exc).__name__}: {exc}"
    if stage == "preprocess":  # the client's input: no traceback in the server log
        return InvalidArgument(message)
    log.error("%s", message, exc_info=exc)  # the handler's bug: its author needs the traceback
    return InternalError(message)


def _is_torch_tensor(value: Any) -> bool:
    """A torch.Tensor, without importing torch (a handler that returns one has imported it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _as_dict(value: Any, stage: str, model: str) -> dict[str, np.ndarray]:
    if not isinstance(value, Mapping):
        raise InternalError(
            f"model '{model}': handler {stage} must return a dict of name -> array, got {type(value).__name__}"
        )
    out: dict[str, np.ndarray] = {}
    for key, arr in value.items():
        if stage == "preprocess" and _is_torch_tensor(arr):
            # Handed to the backend as is: the PyTorch backend takes tensors, so pixels decoded on the
            # GPU reach the model without a round trip through host memory.
            out[str(key)] = arr
            continue
        if not isinstance(arr, np.ndarray):
            try:
                arr = np.asarray(arr)
            except Exception as exc:
                raise InternalError(
                    f"model '{model}': handler {stage} returned '{key}' as {type(arr).__name__}, "
                    f"which is not an array: {exc}"
                ) from None
        out[str(key)] = arr
    return out


class Handler:
    """A loaded ``handler.py`` bound to one backend instance."""

    def __init__(self, module: ModuleType, path: Path, backend: Backend, backend_config: mc.ModelConfig) -> None:
        self.module = module
        self.path = path
        self.model = ModelCall(backend, backend_config)
        self.name = backend_config.name
        self._pre = getattr(module, "preprocess", None)
        self._infer = getattr(module, "infer", None)
        self._post = getattr(module, "postprocess", None)

    @classmethod
    def load(cls, path: Path, backend: Backend, context: HandlerContext) -> Handler:
        """Import ``path`` and run its ``initialize``; InvalidArgument naming the file on failure."""
        name = context.model_name
        module_name = f"dl_inference_handler_{name}_{context.version}_{abs(hash(path))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise InvalidArgument(f"model '{name}': cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise InvalidArgument(f"model '{name}': {path} failed to import: {type(exc).__name__}: {exc}") from exc
        hooks = [h for h in _HOOKS if callable(getattr(module, h, None))]
        for hook in _HOOKS:
            if hasattr(module, hook) and hook not in hooks:
                raise InvalidArgument(f"model '{name}': {path}: '{hook}' must be a function")
        if not hooks:
            log.warning("model '%s': %s defines none of %s; it does nothing", name, path, ", ".join(_HOOKS))
        handler = cls(module, path, backend, context.backend_config)
        init = getattr(module, "initialize", None)
        if init is not None:
            try:
                init(context)
            except Exception as exc:
                raise InvalidArgument(
                    f"model '{name}': handler initialize failed: {type(exc).__name__}: {exc}"
                ) from exc
        log.info("model '%s': handler %s (%s)", name, path, ", ".join(hooks) or "no hooks")
        return handler

    def run(
        self, inputs: dict[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray], tuple[int, int, int]]:
        """preprocess → infer → postprocess on one batch; the outputs and each stage's nanoseconds."""
        params = dict(parameters)
        t0 = time.monotonic_ns()
        model_inputs = inputs if self._pre is None else self._stage("preprocess", self._pre, inputs, params)
        t1 = time.monotonic_ns()
        if self._infer is not None:
            outputs = self._stage("infer", self._infer, self.model, model_inputs)
        else:
            try:
                outputs = self.model(model_inputs)
            except Exception as exc:
                raise _user_error("infer", self.name, exc) from exc
        t2 = time.monotonic_ns()
        if self._post is not None:
            outputs = self._stage("postprocess", self._post, outputs, params)
        t3 = time.monotonic_ns()
        return outputs, (t1 - t0, t2 - t1, t3 - t2)

    def _stage(self, stage: str, fn: Any, *args: Any) -> dict[str, np.ndarray]:
        """Call one user hook; its exception becomes the stage's error, its result a dict of arrays."""
        try:
            result = fn(*args)
        except Exception as exc:
            raise _user_error(stage, self.name, exc) from exc
        return _as_dict(result, stage, self.name)

    def close(self) -> None:
        sys.modules.pop(self.module.__name__, None)
