"""From a model's files and config to a TensorRT engine on disk: the steps the CLI, the repository
converter and the TensorRT backend share.

* :func:`settings_from_config` reads the build settings from a model config's ``parameters``.
* :func:`find_model_files` finds what a version directory holds (engine, ONNX, Caffe, SavedModel).
* :func:`prepare_request` computes the profile, resolves the precision for the TensorRT version and
  hashes the ONNX file and calibration data (no TensorRT call).
* :func:`convert_onnx_file` builds one ONNX file into a ``.plan`` + metadata (``convert onnx-to-tensorrt``).
* :func:`resolve_engine` is what a worker does at load: use a fitting prebuilt ``model.plan``,
  rebuild or refuse one that does not fit, or build (once, cached) from ONNX / Caffe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dl_inference.backends.base import get_parameter, parameter_bool, parameter_int
from dl_inference.backends.cuda_memory import CudaApi, load_cuda_api
from dl_inference.convert.filecache import sha256_file
from dl_inference.convert.tensorrt.builder import build_engine, calibration_batch_size, current_env, import_tensorrt
from dl_inference.convert.tensorrt.calibration import calibration_digest
from dl_inference.convert.tensorrt.engine_cache import (
    EngineMismatch,
    EngineRequest,
    TargetEnv,
    cached_engine,
    engine_problems,
    make_metadata,
    mismatch_message,
    read_metadata,
    write_engine,
)
from dl_inference.convert.tensorrt.settings import (
    DEFAULT_MAX_BATCH_SIZE,
    BuildSettings,
    ShapeRange,
    TensorDesc,
    batchable,
    compute_profile,
    onnx_io,
    parse_shape_specs,
    resolve_precision,
)
from dl_inference.errors import InvalidArgument, NotFound
from dl_inference.protocol.generated.model_config_pb2 import ModelConfig

log = logging.getLogger(__name__)

__all__ = [
    "SAVEDMODEL_HELP",
    "ModelFiles",
    "convert_onnx_file",
    "find_model_files",
    "prepare_request",
    "resolve_engine",
    "settings_from_config",
    "source_onnx",
]

SAVEDMODEL_HELP = (
    "is a TensorFlow SavedModel: convert it to ONNX first with `dl-inference convert tf-to-onnx "
    "<model>/<version>` (writes model.onnx beside it, with a parity check; needs "
    "`pip install 'dl_inference[tensorflow]'`), then build the engine from that"
)
_PLAN_SUFFIXES = (".plan", ".engine")


# --- settings from a model config ----------------------------------------------------------------


def _no_batching_hint(config: ModelConfig, inputs: Sequence[TensorDesc]) -> bool:
    """With max_batch_size 0, config dims of the model's full rank mean "do not batch"."""
    ranks = {t.name: len(t.shape) for t in inputs}
    return any(i.dims and len(i.dims) >= ranks.get(i.name, 99) for i in config.input)


def settings_from_config(
    config: ModelConfig,
    version_dir: Path,
    inputs: Sequence[TensorDesc],
    outputs: Sequence[TensorDesc],
    fallback: Mapping[str, Any] | None = None,
) -> BuildSettings:
    """Build settings from ``config`` (``max_batch_size``, input ``dims``, ``parameters``).

    Parameters: ``precision`` (fp32|fp16|int8|typed), ``strongly_typed``, ``opt_batch_size``,
    ``workspace_mb``, ``tensorrt_shapes`` ("name:3x224x224;tokens:1:128:512"), ``calibration_dir``
    (relative to the version, then the model directory), ``calibration_batch_size``, ``timing_cache``,
    ``default_max_batch_size``. ``fallback`` (an engine's metadata) supplies what the config leaves
    unsaid, so a rebuild reproduces that engine's settings.
    """
    name = config.name
    fb = dict(fallback or {})
    try:
        max_batch = config.max_batch_size
        if max_batch == 0:
            if "max_batch_size" in fb:
                max_batch = int(fb["max_batch_size"])
            elif batchable(inputs, outputs) and not _no_batching_hint(config, inputs):
                max_batch = parameter_int(config, "default_max_batch_size", DEFAULT_MAX_BATCH_SIZE, minimum=1)
        precision = (get_parameter(config, "precision") or fb.get("precision") or "fp32").strip().lower()
        if parameter_bool(config, "strongly_typed"):
            if precision not in ("fp32", "typed"):
                raise InvalidArgument(
                    f"strongly_typed takes its precision from the ONNX model; drop precision {precision}"
                )
            precision = "typed"
        opt = parameter_int(config, "opt_batch_size", 0, minimum=0) or None
        if opt is None and fb.get("opt_batch_size") and int(fb["opt_batch_size"]) != max_batch:
            opt = int(fb["opt_batch_size"]) if int(fb["opt_batch_size"]) <= max_batch else None
        workspace = parameter_int(config, "workspace_mb", 0, minimum=0) or fb.get("workspace_mb") or None
        shapes = parse_shape_specs(get_parameter(config, "tensorrt_shapes") or "")
        dynamic = {t.name for t in inputs if any(d < 0 for d in (t.shape[1:] if max_batch else t.shape))}
        for entry in config.input:
            dims = tuple(entry.dims)
            if entry.name in dynamic and entry.name not in shapes and dims and all(d >= 0 for d in dims):
                if not entry.HasField("reshape"):
                    shapes[entry.name] = ShapeRange(dims, dims, dims)
        for tensor_name, rng in (fb.get("profile") or {}).items():
            if tensor_name in dynamic and tensor_name not in shapes:
                r = ShapeRange.from_json(rng)
                shapes[tensor_name] = ShapeRange(r.min[1:], r.opt[1:], r.max[1:]) if max_batch else r
        calibration = get_parameter(config, "calibration_dir")
        calibration_dir = None
        if calibration:
            path = Path(calibration)
            candidates = [path] if path.is_absolute() else [version_dir / path, version_dir.parent / path]
            calibration_dir = next((c for c in candidates if c.is_dir()), candidates[0])
        timing = get_parameter(config, "timing_cache")
        return BuildSettings(
            max_batch_size=max_batch,
            opt_batch_size=opt,
            precision=precision,
            workspace_mb=int(workspace) if workspace else None,
            shapes=shapes,
            calibration_dir=calibration_dir,
            calibration_batch_size=parameter_int(config, "calibration_batch_size", 0, minimum=0) or None,
            timing_cache=Path(timing) if timing else None,
        )
    except InvalidArgument as exc:
        message = exc.message
        raise InvalidArgument(message if message.startswith("model '") else f"model '{name}': {message}") from None


def prepare_request(
    onnx_path: Path,
    settings: BuildSettings,
    trt_version: str,
    model: str = "model",
    source_kind: str = "onnx",
) -> tuple[EngineRequest, list[TensorDesc]]:
    """The engine request for ``onnx_path`` (profile, precision for this TensorRT, hashes) and the
    model's inputs. No TensorRT call; InvalidArgument naming the model for bad settings."""
    inputs, _ = onnx_io(onnx_path)
    profile = compute_profile(inputs, settings, model)
    try:
        precision, typed = resolve_precision(settings.precision, trt_version)
    except InvalidArgument as exc:
        raise InvalidArgument(f"model '{model}': {exc.message}") from None
    request = EngineRequest(onnx_path, sha256_file(onnx_path), settings, profile, precision, typed, None, source_kind)
    if precision == "int8" and settings.calibration_dir is not None:
        digest = calibration_digest(settings.calibration_dir, calibration_batch_size(request))
        request = EngineRequest(
            onnx_path, request.onnx_sha256, settings, profile, precision, typed, digest, source_kind
        )
    return request, inputs


# --- what a version directory holds ---------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """Model files of one version directory; any may be None."""

    plan: Path | None
    onnx: Path | None
    caffe: tuple[Path, Path] | None
    savedmodel: Path | None

    @property
    def buildable(self) -> bool:
        return self.onnx is not None or self.caffe is not None


def find_model_files(version_dir: Path, config: ModelConfig) -> ModelFiles:
    """The engine (``default_model_filename`` if it is a .plan/.engine, else ``model.plan``), the ONNX
    file (``default_model_filename`` if .onnx, else ``model.onnx``), a Caffe pair, a SavedModel."""
    from dl_inference.convert.caffe.cache import find_caffe_files

    chosen = config.default_model_filename
    plan_name = chosen if chosen and Path(chosen).suffix in _PLAN_SUFFIXES else "model.plan"
    onnx_name = chosen if chosen and Path(chosen).suffix == ".onnx" else "model.onnx"
    plan = version_dir / plan_name
    onnx = version_dir / onnx_name
    if onnx.is_dir():  # Triton also accepts a directory holding model.onnx + external data
        onnx = onnx / "model.onnx"
    savedmodel = version_dir / "model.savedmodel"
    return ModelFiles(
        plan if plan.is_file() else None,
        onnx if onnx.is_file() else None,
        find_caffe_files(version_dir),
        savedmodel if savedmodel.exists() else None,
    )


def source_onnx(files: ModelFiles, config: ModelConfig) -> tuple[Path, str] | None:
    """``(ONNX path, "onnx" | "caffe")`` to build from: the ONNX file, or the Caffe pair converted
    (and cached) by the Caffe converter. None when there is neither."""
    if files.onnx is not None:
        return files.onnx, "onnx"
    if files.caffe is not None:
        from dl_inference.convert.caffe.cache import converted_model
        from dl_inference.convert.caffe.preprocess import preprocess_from_config

        return converted_model(*files.caffe, preprocess_from_config(config)), "caffe"
    return None


# --- building -------------------------------------------------------------------------------------


def _build_fn(
    request: EngineRequest, inputs: Sequence[TensorDesc], env: TargetEnv, trt: Any, cuda: CudaApi, device_id: int,
    emit: Callable[[str], None], label: str,
) -> Callable[[], bytes]:  # fmt: skip
    return lambda: build_engine(request, inputs, env, trt=trt, cuda=cuda, device_id=device_id, emit=emit, label=label)


def convert_onnx_file(
    onnx_path: Path,
    output: Path,
    settings: BuildSettings,
    emit: Callable[[str], None],
    device_id: int = 0,
    trt: Any = None,
    cuda: CudaApi | None = None,
) -> dict[str, Any]:
    """Build ``onnx_path`` into ``output`` (+ ``output.json`` metadata); returns the metadata.

    Raises TensorRTUnavailable when tensorrt cannot be imported (checked first).
    """
    trt = trt if trt is not None else import_tensorrt()
    cuda = cuda if cuda is not None else load_cuda_api()
    cuda.set_device(device_id)
    env = current_env(trt, cuda, device_id)
    label = onnx_path.name
    request, inputs = prepare_request(onnx_path, settings, env.tensorrt_version, model=onnx_path.stem)
    start = time.monotonic()
    plan = build_engine(request, inputs, env, trt=trt, cuda=cuda, device_id=device_id, emit=emit, label=label)
    metadata = make_metadata(request, env, plan, time.monotonic() - start)
    write_engine(output, plan, metadata)
    return metadata


def explicit_problems(meta: Mapping[str, Any], config: ModelConfig) -> list[str]:
    """Where the model config contradicts a prebuilt engine: a ``precision`` parameter that differs,
    or a ``max_batch_size`` above the engine's."""
    problems = []
    precision = (get_parameter(config, "precision") or "").strip().lower()
    if parameter_bool(config, "strongly_typed"):
        precision = "typed"
    if (
        precision
        and precision != meta.get("precision")
        and not (precision == "fp32" and meta.get("precision") == "typed")
    ):
        problems.append(f"it was built for precision {meta.get('precision')}, the config asks for {precision}")
    built_max = int(meta.get("max_batch_size") or 0)
    if config.max_batch_size > built_max:
        problems.append(f"it takes batches up to {built_max}, the config's max_batch_size is {config.max_batch_size}")
    return problems


def resolve_engine(
    version_dir: Path,
    config: ModelConfig,
    *,
    trt: Any,
    cuda: CudaApi,
    device_id: int,
    env: TargetEnv,
    allow_rebuild: bool,
    emit: Callable[[str], None] = log.info,
) -> Path:
    """The engine file a worker should deserialize for this model version (see the module doc).

    Raises EngineMismatch (a prebuilt engine that does not fit and may not be rebuilt),
    InvalidArgument (a SavedModel, bad settings) or NotFound (no model file).
    """
    name = config.name
    files = find_model_files(version_dir, config)
    fallback: dict[str, Any] | None = None
    if files.plan is not None:
        meta = read_metadata(files.plan)
        if meta is None:
            emit(f"model '{name}': {files.plan.name} has no metadata file; trusting it was built for this worker")
            return files.plan
        problems = engine_problems(meta, env, plan_path=files.plan, check_plan_hash=True)
        if files.onnx is not None:
            sha = sha256_file(files.onnx)
            if meta.get("onnx_sha256") != sha:
                problems.append(
                    f"{files.onnx.name} changed since it was built (sha256 {str(meta.get('onnx_sha256'))[:12]} then, "
                    f"{sha[:12]} now)"
                )
        problems += explicit_problems(meta, config)
        if not problems:
            return files.plan
        if not allow_rebuild or not files.buildable:
            message = mismatch_message(name, files.plan, problems, meta, files.onnx)
            if allow_rebuild:
                message += f"; allow_rebuild is set but {version_dir} has no model.onnx or Caffe files to build from"
            raise EngineMismatch(message)
        emit(f"model '{name}': rebuilding {files.plan.name} (allow_rebuild): {'; '.join(problems)}")
        fallback = meta
    source = source_onnx(files, config)
    if source is None:
        if files.savedmodel is not None:
            raise InvalidArgument(f"model '{name}': {files.savedmodel.name} {SAVEDMODEL_HELP}")
        raise NotFound(
            f"model '{name}': no TensorRT engine (model.plan), ONNX model (model.onnx) or Caffe model in {version_dir}"
        )
    onnx_path, kind = source
    inputs, outputs = onnx_io(onnx_path)
    settings = settings_from_config(config, version_dir, inputs, outputs, fallback)
    request, inputs = prepare_request(onnx_path, settings, env.tensorrt_version, name, kind)
    label = f"model '{name}'"
    plan, _ = cached_engine(request, env, _build_fn(request, inputs, env, trt, cuda, device_id, emit, label), label)
    return plan
