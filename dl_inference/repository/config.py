"""Per-model configuration: reading ``config.pbtxt`` / ``config.yaml`` and the facts derived from it.

The schema is Triton's ``inference.ModelConfig``; a Triton ``config.pbtxt`` is accepted unchanged.
A YAML file uses the same field names (enum values by name, repeated fields as lists) and is parsed
with :func:`google.protobuf.json_format.ParseDict`, so the two formats mean exactly the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format, text_format

from dl_inference.errors import InvalidArgument
from dl_inference.protocol.generated import model_config_pb2
from dl_inference.repository.unsupported import check_supported

logger = logging.getLogger(__name__)

ModelConfig = model_config_pb2.ModelConfig

PBTXT_NAME = "config.pbtxt"
YAML_NAMES = ("config.yaml", "config.yml")
CONFIG_NAMES = (PBTXT_NAME, *YAML_NAMES)

# Our backend names and the file Triton expects for each.
BACKEND_DEFAULT_FILENAME: dict[str, str] = {
    "onnxruntime": "model.onnx",
    "tensorrt": "model.plan",
    "pytorch": "model.pt",
    "tensorflow": "model.savedmodel",
    "caffe": "*.prototxt + *.caffemodel",
    "openvino": "model.xml",
}
SUPPORTED_BACKENDS: tuple[str, ...] = tuple(BACKEND_DEFAULT_FILENAME)

# Triton platform / backend spellings (and a few common aliases) -> our backend name.
_ALIASES: dict[str, str] = {
    "onnxruntime": "onnxruntime",
    "onnxruntime_onnx": "onnxruntime",
    "onnx": "onnxruntime",
    "tensorrt": "tensorrt",
    "tensorrt_plan": "tensorrt",
    "pytorch": "pytorch",
    "pytorch_libtorch": "pytorch",
    "libtorch": "pytorch",
    "torch": "pytorch",
    "tensorflow": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
    "caffe": "caffe",
    "openvino": "openvino",
}
# Platforms whose default file differs from their backend's.
_PLATFORM_DEFAULT_FILENAME: dict[str, str] = {"tensorflow_graphdef": "model.graphdef"}

# Model files (names inside a version directory) that identify a backend, in priority order.
_MODEL_FILES: tuple[tuple[str, str], ...] = (
    ("model.onnx", "onnxruntime"),
    ("model.plan", "tensorrt"),
    ("model.pt", "pytorch"),
    ("model.pt2", "pytorch"),
    ("model.py", "pytorch"),
    ("model.pth", "pytorch"),
    ("model.savedmodel", "tensorflow"),
    ("model.xml", "openvino"),
)
# File-name suffixes used when ``default_model_filename`` names a non-default file.
_SUFFIXES: dict[str, str] = {
    ".onnx": "onnxruntime",
    ".plan": "tensorrt",
    ".engine": "tensorrt",
    ".pt": "pytorch",
    ".pt2": "pytorch",
    ".pth": "pytorch",
    ".savedmodel": "tensorflow",
    ".graphdef": "tensorflow",
    ".xml": "openvino",
}


# --------------------------------------------------------------------------- loading


def load_model_config(model_dir: Path, name: str | None = None) -> ModelConfig:
    """Read the model configuration of ``model_dir``.

    ``config.pbtxt`` (protobuf text format) or ``config.yaml`` / ``config.yml`` is read; having
    more than one is an error, having none gives an empty config. ``name`` (default: the directory
    name) is the model's name: a config naming a different model is an error, an unnamed one gets it.

    Raises:
        InvalidArgument: several config files, unreadable or unparsable file, or a name mismatch.
    """
    model_dir = Path(model_dir)
    model_name = name if name is not None else model_dir.name
    present = [model_dir / n for n in CONFIG_NAMES if os.path.lexists(model_dir / n)]
    if len(present) > 1:
        names = ", ".join(p.name for p in present)
        raise InvalidArgument(f"model '{model_name}' has more than one config file ({names}); keep one")
    if not present:
        logger.debug("model '%s' has no config file; using an empty config", model_name)
        config = ModelConfig()
    else:
        path = present[0]
        text = _read_text(path, model_name)
        config = _parse_pbtxt(text, path) if path.name == PBTXT_NAME else _parse_yaml(text, path)
    if config.name and config.name != model_name:
        raise InvalidArgument(
            f"model '{model_name}': config names the model '{config.name}', but its directory is "
            f"'{model_name}'; the two must match (or leave 'name' out)"
        )
    config.name = model_name
    return config


def config_file(model_dir: Path) -> Path | None:
    """The config file of ``model_dir`` (first of :data:`CONFIG_NAMES` present), or None."""
    for n in CONFIG_NAMES:
        if os.path.lexists(model_dir / n):
            return model_dir / n
    return None


def _read_text(path: Path, model_name: str) -> str:
    if not path.is_file():
        raise InvalidArgument(f"model '{model_name}': {path} is not a regular file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"model '{model_name}': cannot read {path}: {e}") from e


def _parse_pbtxt(text: str, path: Path) -> ModelConfig:
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        # The message already starts with "line:column".
        raise InvalidArgument(f"cannot parse {path}: {e}") from e
    return config


def _parse_yaml(text: str, path: Path) -> ModelConfig:
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgument(f"cannot parse {path}: {_yaml_message(e)}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidArgument(
            f"cannot parse {path}: the top level must be a mapping of ModelConfig fields, not {type(data).__name__}"
        )
    config = ModelConfig()
    try:
        json_format.ParseDict(data, config)
    except (json_format.ParseError, TypeError, ValueError) as e:
        raise InvalidArgument(f"cannot parse {path}: {e}") from e
    return config


def _yaml_message(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        what = " ".join(s for s in (e.context, e.problem) if s) or "invalid YAML"
        if mark is not None:
            return f"{mark.line + 1}:{mark.column + 1} : {what}"
        return what
    return str(e)


# --------------------------------------------------------------------------- backend and files


def _normalize(config: ModelConfig) -> str | None:
    """Our backend name from platform/backend; None when neither is set."""
    found: dict[str, str] = {}
    for field in ("platform", "backend"):
        value = getattr(config, field).strip()
        if not value:
            continue
        backend = _ALIASES.get(value.lower())
        if backend is None:
            raise InvalidArgument(
                f"model '{config.name}': unsupported {field} '{value}'; supported backends are "
                f"{', '.join(SUPPORTED_BACKENDS)} (platforms {', '.join(k for k in _ALIASES if '_' in k)})"
            )
        found[field] = backend
    if len(set(found.values())) > 1:
        raise InvalidArgument(
            f"model '{config.name}': platform '{config.platform}' and backend '{config.backend}' disagree"
        )
    return next(iter(found.values()), None)


def default_model_filename(config: ModelConfig) -> str:
    """The model file (or directory) name inside a version directory.

    ``config.default_model_filename`` if set, else Triton's default for the platform/backend
    (``model.onnx`` when neither is set).
    """
    if config.default_model_filename:
        return config.default_model_filename
    platform = config.platform.strip().lower()
    if platform in _PLATFORM_DEFAULT_FILENAME:
        return _PLATFORM_DEFAULT_FILENAME[platform]
    backend = _normalize(config)
    return BACKEND_DEFAULT_FILENAME[backend or "onnxruntime"]


def backend_name(config: ModelConfig, version_dir: Path | None = None) -> str:
    """Our backend name (one of :data:`SUPPORTED_BACKENDS`) for a model.

    From platform/backend when set; else ``tensorrt`` when the parameter ``convert_to`` is
    ``tensorrt`` (``dl-inference convert repository`` builds those); else from the suffix of
    ``default_model_filename``; else from
    the model file present in ``version_dir`` (model.onnx, model.plan, model.pt/.pt2,
    model.savedmodel/). With no hint at all and no ``version_dir`` it is ``onnxruntime``, matching
    :func:`default_model_filename`.

    Raises:
        InvalidArgument: unknown platform/backend, or nothing to infer it from.
    """
    backend = _normalize(config)
    if backend is not None:
        return backend
    # `dl-inference convert repository` builds model.plan beside model.onnx for these models.
    convert_to = config.parameters["convert_to"].string_value if "convert_to" in config.parameters else ""
    if convert_to.strip().lower() in ("tensorrt", "tensorrt_plan"):
        return "tensorrt"
    if config.default_model_filename:
        suffix = Path(config.default_model_filename).suffix.lower()
        if suffix in _SUFFIXES:
            return _SUFFIXES[suffix]
    if version_dir is None:
        return "onnxruntime"
    found = sorted({b for fname, b in _MODEL_FILES if (Path(version_dir) / fname).exists()})
    if any(Path(version_dir).glob("*.caffemodel")):
        found.append("caffe")
    if len(found) == 1:
        return found[0]
    expected = ", ".join(f for f, _ in _MODEL_FILES)
    if not found:
        raise InvalidArgument(
            f"model '{config.name}': no platform or backend in its config and no known model file "
            f"in {version_dir} (looked for {expected}); set 'backend' to one of "
            f"{', '.join(SUPPORTED_BACKENDS)}"
        )
    raise InvalidArgument(
        f"model '{config.name}': {version_dir} holds files for several backends ({', '.join(found)}); "
        f"set 'backend' in its config"
    )


# --------------------------------------------------------------------------- instances


def instance_kinds(config: ModelConfig, gpu_ids: Sequence[int] | None = None) -> list[tuple[str, int | None]]:
    """One ``(kind, gpu)`` entry per model instance, in instance-group order.

    ``kind`` is the enum name (``KIND_CPU``, ``KIND_GPU``, ``KIND_MODEL``, ``KIND_AUTO``). A group's
    ``count`` (0 means 1) is per GPU for a KIND_GPU group listing ``gpus``, as in Triton: ``gpus: [0, 1]
    count: 2`` gives two instances on each GPU. ``gpu`` is None when no GPU is named.

    ``gpu_ids`` (the GPUs this node has) is optional: when given, KIND_AUTO becomes KIND_GPU (if
    there are GPUs) or KIND_CPU, and GPU groups without ``gpus`` spread over all of ``gpu_ids``.
    No instance group means one KIND_AUTO instance.
    """
    kind_name = model_config_pb2.ModelInstanceGroup.Kind.Name
    groups = list(config.instance_group) or [model_config_pb2.ModelInstanceGroup()]
    result: list[tuple[str, int | None]] = []
    for group in groups:
        count = max(group.count, 0) or 1
        kind = kind_name(group.kind)
        gpus: list[int] = list(group.gpus)
        if kind == "KIND_AUTO":
            if gpus:
                kind = "KIND_GPU"
            elif gpu_ids is not None:
                kind = "KIND_GPU" if gpu_ids else "KIND_CPU"
        if kind == "KIND_GPU":
            if not gpus and gpu_ids:
                gpus = list(gpu_ids)
            if gpus:
                result.extend((kind, gpu) for gpu in gpus for _ in range(count))
                continue
        result.extend((kind, None) for _ in range(count))
    return result


def instance_count(config: ModelConfig, gpu_ids: Sequence[int] | None = None) -> int:
    """Number of instances to start: ``len(instance_kinds(config, gpu_ids))``, at least 1."""
    return max(1, len(instance_kinds(config, gpu_ids)))


# --------------------------------------------------------------------------- validation


def validate_config(config: ModelConfig) -> None:
    """Check what a repository scan can check without loading the model.

    Raises:
        InvalidArgument: naming the model and, where relevant, the tensor or group at fault.
    """
    model = config.name or "<unnamed>"
    if config.max_batch_size < 0:
        raise InvalidArgument(f"model '{model}': max_batch_size must be >= 0, got {config.max_batch_size}")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        seen: set[str] = set()
        for t in tensors:
            _validate_tensor(model, kind, t, seen)
    _validate_instance_groups(model, config)
    _validate_batching(model, config)
    check_supported(config)
    policy = config.version_policy
    if policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions < 1:
        raise InvalidArgument(f"model '{model}': version_policy latest needs num_versions >= 1")


def _validate_tensor(model: str, kind: str, t: Any, seen: set[str]) -> None:
    if not t.name:
        raise InvalidArgument(f"model '{model}': an {kind} has no name")
    where = f"model '{model}' {kind} '{t.name}'"
    if t.name in seen:
        raise InvalidArgument(f"{where}: duplicate {kind} name")
    seen.add(t.name)
    if t.data_type == model_config_pb2.TYPE_INVALID:
        raise InvalidArgument(f"{where}: data_type is missing or TYPE_INVALID")
    bad = [d for d in t.dims if d < -1]
    if bad:
        raise InvalidArgument(f"{where}: dims must be >= -1 (-1 = variable), got {list(t.dims)}")
    if t.HasField("reshape"):
        shape = list(t.reshape.shape)
        if any(d < -1 for d in shape):
            raise InvalidArgument(f"{where}: reshape dims must be >= -1, got {shape}")
        dims = list(t.dims)
        if -1 not in dims and -1 not in shape and _product(dims) != _product(shape):
            raise InvalidArgument(
                f"{where}: reshape {shape} has {_product(shape)} elements but dims {dims} have {_product(dims)}"
            )


def _product(values: Sequence[int]) -> int:
    n = 1
    for v in values:
        n *= v
    return n


def _validate_instance_groups(model: str, config: ModelConfig) -> None:
    kind_name = model_config_pb2.ModelInstanceGroup.Kind.Name
    for i, group in enumerate(config.instance_group):
        label = f"model '{model}' instance_group '{group.name or i}'"
        if group.count < 0:
            raise InvalidArgument(f"{label}: count must be >= 0, got {group.count}")
        if any(g < 0 for g in group.gpus):
            raise InvalidArgument(f"{label}: gpus must be >= 0, got {list(group.gpus)}")
        if group.gpus and group.kind in (
            model_config_pb2.ModelInstanceGroup.KIND_CPU,
            model_config_pb2.ModelInstanceGroup.KIND_MODEL,
        ):
            raise InvalidArgument(f"{label}: kind {kind_name(group.kind)} cannot list gpus")


def _validate_batching(model: str, config: ModelConfig) -> None:
    if not config.HasField("dynamic_batching"):
        return
    db = config.dynamic_batching
    for size in db.preferred_batch_size:
        if size < 1 or (config.max_batch_size > 0 and size > config.max_batch_size):
            raise InvalidArgument(
                f"model '{model}': dynamic_batching preferred_batch_size {size} must be between 1 and "
                f"max_batch_size ({config.max_batch_size})"
            )
    if db.priority_levels and not 1 <= db.default_priority_level <= db.priority_levels:
        raise InvalidArgument(
            f"model '{model}': dynamic_batching default_priority_level {db.default_priority_level} "
            f"must be between 1 and priority_levels ({db.priority_levels})"
        )
