"""Engine cache and metadata without TensorRT: cache keys, metadata checks and their messages,
concurrent builders building once, calibration samples, build progress lines.
(Real TensorRT has not run here; builds are stand-in functions returning bytes.)"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dl_inference.convert.tensorrt.calibration import calibration_digest, iter_calibration_batches
from dl_inference.convert.tensorrt.engine_cache import (
    EngineRequest,
    TargetEnv,
    cache_key,
    cached_engine,
    engine_problems,
    make_metadata,
    metadata_path,
    mismatch_message,
    read_metadata,
    rebuild_command,
    write_engine,
)
from dl_inference.convert.tensorrt.progress import BuildProgress, ElapsedTicker
from dl_inference.convert.tensorrt.settings import BuildSettings, ShapeRange, TensorDesc
from dl_inference.errors import InvalidArgument

A100 = TargetEnv("10.3.0", "NVIDIA A100-SXM4-80GB", "8.0")
H200 = TargetEnv("10.8.0", "NVIDIA H200", "9.0")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DL_INFERENCE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def request(**changes: object) -> EngineRequest:
    base = EngineRequest(
        onnx_path=Path("model.onnx"),
        onnx_sha256="a" * 64,
        settings=BuildSettings(max_batch_size=8),
        profile={"x": ShapeRange((1, 16), (8, 16), (8, 16))},
        precision="fp16",
        strongly_typed=False,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_cache_key_covers_everything_that_changes_the_engine() -> None:
    key = cache_key(request(), H200)
    assert key == cache_key(request(), H200) and len(key) == 32
    variants = [
        cache_key(request(), A100),
        cache_key(request(), dataclasses.replace(H200, tensorrt_version="10.9.0")),
        cache_key(request(), dataclasses.replace(H200, gpu_name="NVIDIA H100")),
        cache_key(request(), dataclasses.replace(H200, compute_capability="9.1")),
        cache_key(request(onnx_sha256="b" * 64), H200),
        cache_key(request(precision="fp32"), H200),
        cache_key(request(profile={"x": ShapeRange((1, 16), (4, 16), (8, 16))}), H200),
        cache_key(request(settings=BuildSettings(max_batch_size=8, workspace_mb=512)), H200),
        cache_key(request(calibration_sha256="c" * 64), H200),
    ]
    assert len({key, *variants}) == len(variants) + 1
    # the timing cache only speeds builds up: same engine, same key
    assert cache_key(request(settings=BuildSettings(max_batch_size=8, timing_cache=Path("t"))), H200) == key


def test_metadata_round_trip_and_env_mismatch_message(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    write_engine(plan, b"engine bytes", make_metadata(request(), A100, b"engine bytes", 12.5))
    assert metadata_path(plan).name == "model.plan.json"
    meta = read_metadata(plan)
    assert meta is not None and meta["tensorrt_version"] == "10.3.0" and meta["build_seconds"] == 12.5
    assert engine_problems(meta, A100, request(), plan, check_plan_hash=True) == []

    problems = engine_problems(meta, H200)
    assert problems == [
        "it was built with TensorRT 10.3.0 on NVIDIA A100-SXM4-80GB (8.0); "
        "this worker has TensorRT 10.8.0 on NVIDIA H200 (9.0)"
    ]
    message = mismatch_message("resnet", plan, problems, meta, tmp_path / "model.onnx")
    assert message.startswith(f"model 'resnet': engine {plan} cannot be used here: it was built with TensorRT 10.3.0")
    assert (
        f"rebuild with `dl-inference convert onnx-to-tensorrt --onnx {tmp_path}/model.onnx --output {plan} "
        "--max-batch-size 8 --fp16 --shape x:16` or set parameter allow_rebuild" in message
    )


def test_problems_name_what_the_config_changed(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    write_engine(plan, b"x" * 10, make_metadata(request(), H200, b"x" * 10, 1.0))
    meta = read_metadata(plan)
    assert meta is not None
    wanted = request(onnx_sha256="b" * 64, precision="fp32", profile={"x": ShapeRange((1, 16), (16, 16), (16, 16))})
    problems = engine_problems(meta, H200, wanted)
    assert (
        problems[0] == "its source model changed since it was built (ONNX sha256 aaaaaaaaaaaa then, bbbbbbbbbbbb now)"
    )
    assert "it was built for precision fp16, the config asks for fp32" in problems
    assert (
        "it was built with the profile x [1,16]..[8,16]..[8,16], the config needs x [1,16]..[16,16]..[16,16]"
        in problems
    )
    plan.write_bytes(b"another engine")
    assert engine_problems(meta, H200, plan_path=plan) == [
        "model.plan is not the engine its metadata describes (size or sha256 differ)"
    ]


def test_rebuild_command_keeps_the_settings() -> None:
    meta = make_metadata(
        request(
            precision="typed",
            settings=BuildSettings(max_batch_size=32, opt_batch_size=4, workspace_mb=1024),
            profile={"image": ShapeRange((1, 3, 224, 224), (4, 3, 224, 224), (32, 3, 224, 224))},
        ),
        H200,
        b"",
        0,
    )
    assert rebuild_command(meta, "m.onnx", Path("m.plan")) == (
        "dl-inference convert onnx-to-tensorrt --onnx m.onnx --output m.plan --max-batch-size 32 --opt-batch 4 "
        "--strongly-typed --workspace-mb 1024 --shape image:3x224x224"
    )


def test_unreadable_metadata_is_a_clear_error(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    assert read_metadata(plan) is None
    metadata_path(plan).write_text("{not json")
    with pytest.raises(InvalidArgument, match=r"engine metadata .*model\.plan\.json cannot be read"):
        read_metadata(plan)
    metadata_path(plan).write_text(json.dumps({"hello": 1}))
    with pytest.raises(InvalidArgument, match=r"is not dl_inference engine metadata"):
        read_metadata(plan)


def test_concurrent_builders_build_once(cache_dir: Path) -> None:
    builds: list[int] = []

    def build() -> bytes:
        builds.append(threading.get_ident())
        time.sleep(0.2)
        return b"the engine"

    results: list[tuple[Path, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cached_engine(request(), H200, build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert sorted(built for _, built in results) == [False, False, False, True]
    paths = {p for p, _ in results}
    assert len(paths) == 1
    (path,) = paths
    assert path.parent == cache_dir / "tensorrt" and path.read_bytes() == b"the engine"
    assert read_metadata(path)["gpu_name"] == "NVIDIA H200"  # type: ignore[index]
    # a plan whose metadata went missing (crash between the two writes) is rebuilt
    metadata_path(path).unlink()
    assert cached_engine(request(), H200, build) == (path, True)
    assert len(builds) == 2


# --- calibration samples ---------------------------------------------------------------------------


def test_calibration_batches_from_npy_and_npz(tmp_path: Path) -> None:
    x = TensorDesc("x", "FP32", (-1, 4))
    profile = {"x": ShapeRange((1, 4), (8, 4), (8, 4))}
    np.save(tmp_path / "a.npy", np.arange(20, dtype=np.float64).reshape(5, 4))  # float64: cast to FP32
    np.save(tmp_path / "b.npy", np.full(4, 100, np.float32))  # one sample without the batch dimension
    np.savez(tmp_path / "c.npz", x=np.ones((4, 4), np.float32))
    batches = list(iter_calibration_batches(tmp_path, [x], profile, batch_size=3, batching=True))
    assert [b["x"].shape for b in batches] == [(3, 4), (3, 4), (3, 4)]  # 10 rows: the last one is left out
    assert batches[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(batches[1]["x"][2], np.full(4, 100))
    assert calibration_digest(tmp_path, 3) != calibration_digest(tmp_path, 4)


def test_calibration_errors_name_file_and_tensor(tmp_path: Path) -> None:
    x = TensorDesc("x", "FP32", (-1, 4))
    y = TensorDesc("y", "INT64", (-1, 2))
    profile = {"x": ShapeRange((1, 4), (8, 4), (8, 4)), "y": ShapeRange((1, 2), (8, 2), (8, 2))}
    with pytest.raises(InvalidArgument, match=r"holds no \.npy or \.npz files"):
        list(iter_calibration_batches(tmp_path, [x], profile, 2, True))
    np.save(tmp_path / "a.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(InvalidArgument, match=r"a\.npy holds one array but the model has inputs x, y"):
        list(iter_calibration_batches(tmp_path, [x, y], profile, 2, True))
    with pytest.raises(InvalidArgument, match=r"holds 2 sample row\(s\), fewer than one calibration batch of 4"):
        list(iter_calibration_batches(tmp_path, [x], profile, 4, True))
    (tmp_path / "a.npy").unlink()
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 4), np.float32), y=np.zeros((2, 2), np.float32))
    with pytest.raises(InvalidArgument, match=r"b\.npz: input 'y' is float32, the model takes INT64"):
        list(iter_calibration_batches(tmp_path, [x, y], profile, 2, True))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 5), np.float32), y=np.zeros((2, 2), np.int64))
    with pytest.raises(InvalidArgument, match=r"input 'x' has shape \[2, 5\], calibration needs \[n,4\]"):
        list(iter_calibration_batches(tmp_path, [x, y], profile, 2, True))


# --- progress lines --------------------------------------------------------------------------------


def test_build_progress_lines_and_cancel() -> None:
    now = [0.0]
    lines: list[str] = []
    progress = BuildProgress(lines.append, "model 'm'", max_depth=2, step_interval=5.0, clock=lambda: now[0])
    progress.phase_start("Building engine", None, 2)
    progress.phase_start("Tactic selection", "Building engine", 40)
    progress.phase_start("Timing conv1", "Tactic selection", 7)  # depth 2: not shown
    assert progress.current() == "Timing conv1 (step 0/7)"
    for step in range(40):
        now[0] += 0.5
        assert progress.step_complete("Tactic selection", step)
    progress.phase_finish("Timing conv1")
    progress.phase_finish("Tactic selection")
    progress.phase_finish("Building engine")
    assert lines[0] == "model 'm': [   0.0s] Building engine (2 steps)"
    assert lines[1] == "model 'm': [   0.0s]   Tactic selection (40 steps)"
    steps = [line for line in lines if ": step " in line]
    assert steps[0] == "model 'm': [   5.0s]   Tactic selection: step 10/40"
    assert steps[-1].endswith("step 40/40") and len(steps) == 4  # every 5 s of a 20 s phase
    assert lines[-1] == "model 'm': [  20.0s] Building engine done in 20.0s"
    progress.cancel()
    assert progress.step_complete("anything", 0) is False


def test_elapsed_ticker_reports_while_building() -> None:
    lines: list[str] = []
    progress = BuildProgress(lines.append, "m")
    progress.phase_start("Building engine", None, 3)
    with ElapsedTicker(progress, interval=0.02):
        time.sleep(0.1)
    ticks = [line for line in lines if "still building" in line]
    assert ticks and ticks[0].startswith("m: still building, ") and ticks[0].endswith("Building engine (step 0/3)")
