"""``dl-inference convert repository``: build the TensorRT engines a model repository asks for.

Meant as the init step before serving (an init container, or a step before ``serve``): every model
whose config names the TensorRT backend (``backend: "tensorrt"`` / ``platform: "tensorrt_plan"``) or
sets the parameter ``convert_to: "tensorrt"`` gets, for each version the version policy selects,
``model.plan`` + ``model.plan.json`` built from ``model.onnx`` (or from a Caffe prototxt + caffemodel
through the Caffe converter) in its version directory, or in the engine cache with ``--into cache``
(for read-only repositories; the workers find them by key). Engines whose metadata already matches
(same ONNX, settings, TensorRT and GPU) are left alone. A TensorFlow SavedModel is reported as needing
the TensorFlow environment. ``--dry-run`` plans without TensorRT: what would be built, from what, with
which profile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dl_inference.backends.base import get_parameter
from dl_inference.backends.cuda_memory import CudaApi, load_cuda_api
from dl_inference.convert.tensorrt.builder import build_engine, current_env, import_tensorrt
from dl_inference.convert.tensorrt.engine_cache import (
    TargetEnv,
    cached_engine,
    engine_problems,
    make_metadata,
    read_metadata,
    write_engine,
)
from dl_inference.convert.tensorrt.pipeline import (
    SAVEDMODEL_HELP,
    ModelFiles,
    find_model_files,
    prepare_request,
    settings_from_config,
    source_onnx,
)
from dl_inference.convert.tensorrt.settings import compute_profile, onnx_io
from dl_inference.errors import ServerError
from dl_inference.protocol.generated.model_config_pb2 import ModelConfig
from dl_inference.repository.scan import scan_repository

log = logging.getLogger(__name__)

__all__ = ["ConversionSummary", "PlannedVersion", "plan_repository", "run_conversion", "wants_tensorrt"]

_TRT_NAMES = ("tensorrt", "tensorrt_plan")


def wants_tensorrt(config: ModelConfig) -> bool:
    """The config names the TensorRT backend/platform or asks ``convert_to: tensorrt``."""
    named = {config.backend.strip().lower(), config.platform.strip().lower()}
    convert_to = (get_parameter(config, "convert_to") or "").strip().lower()
    return bool(named & set(_TRT_NAMES)) or convert_to in _TRT_NAMES


@dataclass
class PlannedVersion:
    """One model version and what to do with it: ``action`` is ``build``, ``check`` (a prebuilt engine
    with nothing to build it from: checked against this GPU) or ``error`` (``detail`` says why)."""

    model: str
    version: int
    version_dir: Path
    config: ModelConfig
    action: str
    detail: str
    files: ModelFiles | None = None
    output: Path | None = None  # None: into the engine cache

    @property
    def label(self) -> str:
        return f"model '{self.model}' version {self.version}"


@dataclass
class ConversionSummary:
    built: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    not_tensorrt: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def lines(self) -> list[str]:
        head = (
            f"summary: {len(self.built)} built, {len(self.up_to_date)} up to date, {len(self.checked)} prebuilt "
            f"checked, {len(self.failed)} failed; {len(self.not_tensorrt)} model(s) not for TensorRT"
        )
        return [head] + [f"  FAILED {label}: {why}" for label, why in self.failed]


def _plan_version(model: str, version: int, version_dir: Path, config: ModelConfig, into: str) -> PlannedVersion:
    def planned(action: str, detail: str, files: ModelFiles | None = None) -> PlannedVersion:
        chosen = config.default_model_filename
        output = version_dir / (chosen if chosen.endswith((".plan", ".engine")) else "model.plan")
        return PlannedVersion(
            model, version, version_dir, config, action, detail, files, output if into == "version" else None
        )

    try:
        files = find_model_files(version_dir, config)
    except ServerError as exc:
        return planned("error", exc.message)
    if files.onnx is not None:
        try:
            inputs, outputs = onnx_io(files.onnx)
            settings = settings_from_config(config, version_dir, inputs, outputs)
            profile = compute_profile(inputs, settings, model)
        except ServerError as exc:
            return planned("error", exc.message, files)
        shapes = ", ".join(f"{n} {r}" for n, r in profile.items())
        return planned("build", f"from {files.onnx.name}: {settings.precision}, profile {shapes}", files)
    if files.caffe is not None:
        proto, weights = files.caffe
        return planned("build", f"from {proto.name} + {weights.name} (converted to ONNX first)", files)
    if files.savedmodel is not None:
        return planned("error", f"{files.savedmodel.name} {SAVEDMODEL_HELP}", files)
    if files.plan is not None:
        return planned("check", f"prebuilt {files.plan.name}, nothing to build it from", files)
    return planned("error", f"no model.onnx, Caffe model or model.plan in {version_dir}", files)


def plan_repository(root: Path, into: str = "version") -> tuple[list[PlannedVersion], ConversionSummary]:
    """What to do for each TensorRT model version of the repository at ``root``. The summary starts
    with the models that are not for TensorRT and those whose config could not be read."""
    if into not in ("version", "cache"):
        raise ValueError(f"into must be 'version' or 'cache', got {into!r}")
    models, errors = scan_repository(root)
    summary = ConversionSummary()
    for name, reason in sorted(errors.items()):
        summary.failed.append((f"model '{name}'", reason))
    planned: list[PlannedVersion] = []
    for name, source in sorted(models.items()):
        if not wants_tensorrt(source.config):
            summary.not_tensorrt.append(name)
            continue
        for version, version_dir in sorted(source.versions.items()):
            planned.append(_plan_version(name, version, version_dir, source.config, into))
    return planned, summary


def _build_one(
    item: PlannedVersion, env: TargetEnv, trt: Any, cuda: CudaApi, device_id: int, emit: Callable[[str], None]
) -> str:
    """Build (or find up to date) one version's engine; returns "built" or "up to date"."""
    assert item.files is not None
    source = source_onnx(item.files, item.config)
    assert source is not None
    onnx_path, kind = source
    inputs, outputs = onnx_io(onnx_path)
    settings = settings_from_config(item.config, item.version_dir, inputs, outputs)
    request, inputs = prepare_request(onnx_path, settings, env.tensorrt_version, item.model, kind)

    def build() -> bytes:
        return build_engine(request, inputs, env, trt=trt, cuda=cuda, device_id=device_id, emit=emit, label=item.label)

    if item.output is None:
        path, built = cached_engine(request, env, build, item.label)
        emit(f"{item.label}: {'built' if built else 'up to date'}: {path}")
        return "built" if built else "up to date"
    if item.output.exists():
        meta = read_metadata(item.output)
        if meta is not None and not engine_problems(meta, env, request, item.output, check_plan_hash=True):
            emit(f"{item.label}: {item.output} is up to date")
            return "up to date"
    start = time.monotonic()
    plan = build()
    write_engine(item.output, plan, make_metadata(request, env, plan, time.monotonic() - start))
    emit(f"{item.label}: wrote {item.output} ({len(plan) / 1e6:.1f} MB) in {time.monotonic() - start:.1f} s")
    return "built"


def _check_prebuilt(item: PlannedVersion, env: TargetEnv) -> str | None:
    """None when the prebuilt engine fits ``env`` (or says nothing), else why not."""
    assert item.files is not None and item.files.plan is not None
    meta = read_metadata(item.files.plan)
    if meta is None:
        return None
    problems = engine_problems(meta, env, plan_path=item.files.plan, check_plan_hash=True)
    return "; ".join(problems) if problems else None


def run_conversion(
    planned: list[PlannedVersion],
    summary: ConversionSummary,
    emit: Callable[[str], None],
    dry_run: bool = False,
    device_id: int = 0,
    trt: Any = None,
    cuda: CudaApi | None = None,
) -> ConversionSummary:
    """Carry out (or with ``dry_run`` only print) ``planned``; one progress line per model version."""
    total = len(planned)
    if dry_run:
        for i, item in enumerate(planned, 1):
            verb = {"build": "would build", "check": "would check", "error": "cannot build:"}[item.action]
            where = str(item.output) if item.output is not None else "the engine cache"
            target = f" -> {where}" if item.action == "build" else ""
            emit(f"[{i}/{total}] {item.label}: {verb} {item.detail}{target}")
            if item.action == "error":
                summary.failed.append((item.label, item.detail))
        return summary
    env: TargetEnv | None = None
    if any(item.action != "error" for item in planned):
        trt = trt if trt is not None else import_tensorrt()
        cuda = cuda if cuda is not None else load_cuda_api()
        cuda.set_device(device_id)
        env = current_env(trt, cuda, device_id)
        emit(f"building for {env.describe()}")
    for i, item in enumerate(planned, 1):
        verb = {"build": "building", "check": "checking", "error": "cannot build:"}[item.action]
        emit(f"[{i}/{total}] {item.label}: {verb} {item.detail}")
        if item.action == "error":
            summary.failed.append((item.label, item.detail))
            continue
        assert env is not None and cuda is not None
        try:
            if item.action == "check":
                problem = _check_prebuilt(item, env)
                if problem:
                    summary.failed.append((item.label, f"prebuilt engine does not fit: {problem}"))
                else:
                    summary.checked.append(item.label)
                continue
            outcome = _build_one(item, env, trt, cuda, device_id, emit)
            (summary.built if outcome == "built" else summary.up_to_date).append(item.label)
        except ServerError as exc:
            emit(f"{item.label}: FAILED: {exc.message}")
            summary.failed.append((item.label, exc.message))
        except Exception as exc:  # one model's failure must not stop the others
            log.exception("%s: conversion failed", item.label)
            summary.failed.append((item.label, f"{type(exc).__name__}: {exc}"))
    return summary
