"""Load one model version into a backend, the same way for gateway-spawned and standalone workers."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from dl_inference.backends.base import get_backend
from dl_inference.errors import InvalidArgument, NotFound
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.repository.config import backend_name, load_model_config, validate_config
from dl_inference.repository.scan import resolve_inside, validate_model_name
from dl_inference.repository.versions import list_versions, select_versions
from dl_inference.worker.handler import Handler, HandlerContext, find_handler
from dl_inference.worker.runner import ModelRunner
from dl_inference.worker.warmup import run_warmup

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    runner: ModelRunner
    config: mc.ModelConfig
    version: int
    load_seconds: float


def load_model_version(
    repository: Path,
    name: str,
    version: int | None,
    device: str = "cpu",
    device_id: int | None = None,
    max_tensor_elements: int = 0,
    max_bytes_element: int = 0,
    auto_complete: bool = True,
) -> LoadedModel:
    """Read the model's config, pick the version (latest by policy if None), load its backend.

    ``auto_complete`` False (``--disable-auto-complete-config``): the config must list the model's
    inputs and outputs, and the backend may check it against the model file but not change it."""
    start = time.monotonic()
    validate_model_name(name)
    model_dir = resolve_inside(repository, name)
    if not model_dir.is_dir():
        raise NotFound(f"model '{name}' is not in repository {repository}")
    config = load_model_config(model_dir)
    available = list_versions(model_dir)
    if version is None:
        selected = select_versions(available, config.version_policy)
        if not selected:
            raise NotFound(f"model '{name}' has no version directory in {model_dir}")
        version = max(selected)
    if version not in available:
        raise NotFound(f"model '{name}' has no version {version} in {model_dir}")
    version_dir = available[version]
    if not auto_complete:
        missing = " and ".join(k for k, v in (("inputs", config.input), ("outputs", config.output)) if not v)
        if missing:
            raise InvalidArgument(
                f"model '{name}': its config lists no {missing}, and auto-complete is disabled "
                "(--disable-auto-complete-config): list every input and output in config.pbtxt, or let the "
                "server complete configs"
            )
    backend = get_backend(backend_name(config, version_dir))
    handler_path = find_handler(version_dir)
    handler: Handler | None = None
    if handler_path is None:
        completed = backend.load(version_dir, config, device, device_id)
    else:
        # The config's tensors are the client's; the backend describes the model file's own.
        backend_in = mc.ModelConfig()
        backend_in.CopyFrom(config)
        del backend_in.input[:], backend_in.output[:], backend_in.model_warmup[:]
        backend_config = backend.load(version_dir, backend_in, device, device_id)
        completed = mc.ModelConfig()
        completed.CopyFrom(backend_config)
        for field in ("input", "output", "model_warmup"):
            if getattr(config, field):
                target = getattr(completed, field)
                del target[:]
                target.extend(getattr(config, field))
    try:
        if not auto_complete and completed.max_batch_size != config.max_batch_size:
            raise InvalidArgument(
                f"model '{name}': its config says max_batch_size {config.max_batch_size}, but the "
                f"{backend_name(config, version_dir)} backend would serve it with {completed.max_batch_size}; "
                "auto-complete is disabled (--disable-auto-complete-config), so set max_batch_size in config.pbtxt"
            )
        if not completed.input or not completed.output:  # never READY with nothing a client can send or get
            missing = " and ".join(k for k, v in (("inputs", completed.input), ("outputs", completed.output)) if not v)
            raise InvalidArgument(
                f"model '{name}': no {missing}: its config does not list them and its model file "
                f"({backend_name(config, version_dir)}) does not name them; list every input and output in "
                'config.pbtxt (name, data_type, dims), e.g. input [{ name: "x" data_type: TYPE_FP32 dims: [ 16 ] }]'
            )
        validate_config(completed)
        if handler_path is not None:
            context = HandlerContext(
                name, version, model_dir, version_dir, completed, backend_config, device, device_id
            )
            handler = Handler.load(handler_path, backend, context)
        runner = ModelRunner(backend, completed, str(version), handler)
        runner.max_tensor_elements, runner.max_bytes_element = max_tensor_elements, max_bytes_element
        run_warmup(runner, completed, version_dir)  # before HELLO: the model is not ready until warm
    except BaseException:
        with contextlib.suppress(Exception):
            backend.unload()
        if handler is not None:
            handler.close()
        raise
    took = time.monotonic() - start
    log.info("loaded model '%s' version %d on %s in %.2f s", name, version, device, took)
    return LoadedModel(runner, completed, version, took)
