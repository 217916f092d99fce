"""TensorRT engines on disk: a JSON metadata file beside each ``.plan``, checks, and the engine cache.

A serialized engine only runs on the TensorRT version and the GPU model that built it, and it fixes
the precision and the optimization profile. So every ``.plan`` written here gets ``<plan>.json``
beside it (``model.plan`` -> ``model.plan.json``) saying what built it: the source ONNX file's
SHA-256, TensorRT version, GPU name and compute capability, precision, profile, workspace, and the
calibration data's hash. At load, :func:`engine_problems` compares that with this worker; a
mismatch rebuilds when the model allows it (parameter ``allow_rebuild``) or fails with
:class:`EngineMismatch`, whose message says what differs and the command that rebuilds it.

Engines built at load time go to ``$DL_INFERENCE_CACHE_DIR/tensorrt/<key>.plan`` (+ ``.json``),
``key`` being a hash of everything that changes the engine (:func:`cache_key`), so a new ONNX file,
TensorRT upgrade, other GPU or other settings give a new entry. The plan is written before its
metadata, each atomically, under a file lock: concurrent workers build once, and a crash mid-build
leaves no entry that looks complete. Plain Python: no TensorRT needed to test it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dl_inference import __version__
from dl_inference.convert.filecache import atomic_write_bytes, atomic_write_text, cache_root, file_lock, sha256_file
from dl_inference.convert.tensorrt.settings import BuildSettings, ShapeRange
from dl_inference.errors import Code, InvalidArgument, ServerError

log = logging.getLogger(__name__)

__all__ = [
    "BUILDER_VERSION",
    "EngineMismatch",
    "EngineRequest",
    "TargetEnv",
    "cache_key",
    "cached_engine",
    "engine_problems",
    "metadata_path",
    "read_metadata",
    "rebuild_command",
    "write_engine",
]

#: Bump when the way engines are built changes in a way that should invalidate cached ones.
BUILDER_VERSION = "1"
METADATA_FORMAT = "dl_inference tensorrt engine"


@dataclass(frozen=True)
class TargetEnv:
    """Where an engine is built or run: TensorRT version, GPU name, compute capability ("9.0")."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} ({self.compute_capability})"


@dataclass(frozen=True)
class EngineRequest:
    """An engine to build: the ONNX source, its hash, settings, resolved profile and precision."""

    onnx_path: Path
    onnx_sha256: str
    settings: BuildSettings
    profile: Mapping[str, ShapeRange]
    precision: str  # as resolved for the TensorRT version: fp32 | fp16 | int8 | typed
    strongly_typed: bool
    calibration_sha256: str | None = None
    source_kind: str = "onnx"  # or "caffe" (converted to ONNX first)

    def key_fields(self, env: TargetEnv) -> dict[str, Any]:
        """Everything that changes the engine (the timing cache does not: it only speeds builds)."""
        s = self.settings
        return {
            "builder": BUILDER_VERSION,
            "onnx_sha256": self.onnx_sha256,
            "tensorrt_version": env.tensorrt_version,
            "gpu_name": env.gpu_name,
            "compute_capability": env.compute_capability,
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "profile": {name: r.to_json() for name, r in sorted(self.profile.items())},
            "max_batch_size": s.max_batch_size,
            "opt_batch_size": s.opt_batch if s.max_batch_size else 0,
            "workspace_mb": s.workspace_mb,
            "calibration_sha256": self.calibration_sha256,
        }


class EngineMismatch(ServerError):
    """A prebuilt engine does not fit this worker (or its model config) and may not be rebuilt."""

    code = Code.FAILED_PRECONDITION


def cache_key(request: EngineRequest, env: TargetEnv) -> str:
    """32 hex digits naming the cache entry of ``request`` built in ``env``."""
    text = json.dumps(request.key_fields(env), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def metadata_path(plan: Path) -> Path:
    """``model.plan`` -> ``model.plan.json``."""
    return plan.with_name(plan.name + ".json")


def make_metadata(request: EngineRequest, env: TargetEnv, plan: bytes, build_seconds: float) -> dict[str, Any]:
    fields = request.key_fields(env)
    return {
        "format": METADATA_FORMAT,
        "format_version": 1,
        **fields,
        "source": {"kind": request.source_kind, "path": str(request.onnx_path), "sha256": request.onnx_sha256},
        "plan_sha256": hashlib.sha256(plan).hexdigest(),
        "plan_bytes": len(plan),
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "build_seconds": round(build_seconds, 2),
        "built_by": f"dl_inference {__version__}",
    }


def write_engine(plan_path: Path, plan: bytes, metadata: Mapping[str, Any]) -> None:
    """Write ``plan`` then its metadata, each atomically (the metadata last: a plan without it is
    incomplete and gets rebuilt)."""
    atomic_write_bytes(plan_path, plan)
    atomic_write_text(metadata_path(plan_path), json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def read_metadata(plan_path: Path) -> dict[str, Any] | None:
    """The metadata beside ``plan_path``; None when there is none. InvalidArgument when unreadable."""
    path = metadata_path(plan_path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"engine metadata {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != METADATA_FORMAT:
        raise InvalidArgument(f'{path} is not dl_inference engine metadata (no "format": "{METADATA_FORMAT}")')
    return data


def _built_env(meta: Mapping[str, Any]) -> TargetEnv:
    return TargetEnv(
        str(meta.get("tensorrt_version", "?")), str(meta.get("gpu_name", "?")), str(meta.get("compute_capability", "?"))
    )


def _profile_text(profile: Mapping[str, Any]) -> str:
    return ", ".join(f"{name} {ShapeRange.from_json(r)}" for name, r in sorted(profile.items()))


def engine_problems(
    meta: Mapping[str, Any],
    env: TargetEnv,
    request: EngineRequest | None = None,
    plan_path: Path | None = None,
    check_plan_hash: bool = False,
) -> list[str]:
    """What keeps the engine described by ``meta`` from serving here; empty when nothing does.

    Compares TensorRT version, GPU and compute capability with ``env``; with ``request`` also the
    source ONNX hash, precision and profile the model config now asks for; with ``plan_path`` the
    plan's size (and SHA-256 when ``check_plan_hash``) with the metadata's.
    """
    problems: list[str] = []
    built = _built_env(meta)
    if built != env:
        problems.append(f"it was built with {built.describe()}; this worker has {env.describe()}")
    if request is not None:
        wanted = request.key_fields(env)
        if meta.get("onnx_sha256") != request.onnx_sha256:
            problems.append(
                f"its source model changed since it was built (ONNX sha256 {str(meta.get('onnx_sha256'))[:12]} "
                f"then, {request.onnx_sha256[:12]} now)"
            )
        if meta.get("precision") != wanted["precision"]:
            problems.append(
                f"it was built for precision {meta.get('precision')}, the config asks for {wanted['precision']}"
            )
        if meta.get("profile") != wanted["profile"]:
            problems.append(
                f"it was built with the profile {_profile_text(meta.get('profile') or {})}, the config needs "
                f"{_profile_text(wanted['profile'])}"
            )
        for key in ("workspace_mb", "calibration_sha256"):
            if meta.get(key) != wanted[key]:
                problems.append(f"it was built with {key} {meta.get(key)}, the config asks for {wanted[key]}")
    if plan_path is not None:
        size = plan_path.stat().st_size
        if meta.get("plan_bytes") != size or (check_plan_hash and meta.get("plan_sha256") != sha256_file(plan_path)):
            problems.append(f"{plan_path.name} is not the engine its metadata describes (size or sha256 differ)")
    return problems


def rebuild_command(meta: Mapping[str, Any], onnx_path: Path | str, plan_path: Path) -> str:
    """The ``dl-inference convert onnx-to-tensorrt`` command that rebuilds the engine ``meta``
    describes, with the same settings, into ``plan_path``."""
    args = ["dl-inference", "convert", "onnx-to-tensorrt", "--onnx", str(onnx_path), "--output", str(plan_path)]
    max_batch = int(meta.get("max_batch_size") or 0)
    args += ["--max-batch-size", str(max_batch)]
    opt = int(meta.get("opt_batch_size") or 0)
    if max_batch and opt and opt != max_batch:
        args += ["--opt-batch", str(opt)]
    precision = meta.get("precision")
    if precision == "fp16":
        args.append("--fp16")
    elif precision == "int8":
        args += ["--int8", "--calibration-dir", "CALIBRATION_DIR"]
    elif precision == "typed":
        args.append("--strongly-typed")
    if meta.get("workspace_mb"):
        args += ["--workspace-mb", str(meta["workspace_mb"])]
    for name, rng in sorted((meta.get("profile") or {}).items()):
        r = ShapeRange.from_json(rng)
        dims = [r.min, r.opt, r.max]
        if max_batch:
            dims = [d[1:] for d in dims]
        if any(dims):
            text = ":".join("x".join(map(str, d)) for d in (dims if len(set(dims)) > 1 else dims[:1]))
            args += ["--shape", f"{name}:{text}"]
    return " ".join(shlex.quote(a) for a in args)


def mismatch_message(
    model: str, plan_path: Path, problems: list[str], meta: Mapping[str, Any], onnx_path: Path | None
) -> str:
    """The error text for an engine that does not fit: what differs, and how to fix it."""
    source = onnx_path if onnx_path is not None else (meta.get("source") or {}).get("path") or "model.onnx"
    return (
        f"model '{model}': engine {plan_path} cannot be used here: {'; '.join(problems)}: rebuild with "
        f"`{rebuild_command(meta, source, plan_path)}` or set parameter allow_rebuild"
        + ("" if onnx_path is not None else " (with the model's ONNX file in its version directory)")
    )


def cache_dir() -> Path:
    """``$DL_INFERENCE_CACHE_DIR/tensorrt`` (default ``~/.cache/dl_inference/tensorrt``)."""
    return cache_root("tensorrt")


def cached_engine(
    request: EngineRequest,
    env: TargetEnv,
    build: Callable[[], bytes],
    label: str = "model",
) -> tuple[Path, bool]:
    """``(plan path, built now)`` for ``request`` in the cache, calling ``build`` (once, across
    processes) when the cache lacks it."""
    root = cache_dir()
    key = cache_key(request, env)
    plan_path = root / f"{key}.plan"

    def usable() -> bool:
        if not plan_path.exists():
            return False
        try:
            meta = read_metadata(plan_path)
        except InvalidArgument as exc:
            log.warning("%s: %s; rebuilding", label, exc.message)
            return False
        return meta is not None and not engine_problems(meta, env, request, plan_path)

    if usable():
        log.info("%s: using cached TensorRT engine %s", label, plan_path)
        return plan_path, False
    lock = root / f"{key}.lock"
    with file_lock(lock, on_wait=lambda: log.info("%s: another process is building this engine; waiting", label)):
        if usable():
            log.info("%s: engine built by another process: %s", label, plan_path)
            return plan_path, False
        start = time.monotonic()
        plan = build()
        took = time.monotonic() - start
        write_engine(plan_path, plan, make_metadata(request, env, plan, took))
    log.info("%s: built TensorRT engine in %.1f s -> %s", label, took, plan_path)
    return plan_path, True
