"""`dl-inference convert repository` and `convert onnx-to-tensorrt`: which models are converted, what
a dry run prints, the summary and exit code, and the CLI's error without TensorRT. Builds run against
the FAKE tensorrt module of tests/unit/trt_fakes.py (real TensorRT has NOT run here)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from dl_inference.cli import main
from dl_inference.convert.tensorrt.engine_cache import read_metadata
from dl_inference.convert.tensorrt.repository import plan_repository, run_conversion
from dl_inference.repository.config import backend_name, load_model_config
from tests.samples import CAFFE_SAMPLES
from tests.unit.test_tensorrt_backend_fake import write_onnx
from tests.unit.trt_fakes import FakeCuda, make_fake_tensorrt

CAFFE = CAFFE_SAMPLES / "synthetic_single"


def make_repository(root: Path) -> Path:
    def model(name: str, config: str) -> Path:
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config)
        return root / name / "1"

    write_onnx(model("mlp", 'backend: "tensorrt" max_batch_size: 8') / "model.onnx")
    write_onnx(
        model("mlp_convert", 'parameters { key: "convert_to" value: { string_value: "tensorrt" } }') / "model.onnx"
    )
    img = model("img", 'platform: "tensorrt_plan"')
    _dynamic_image_onnx(img / "model.onnx")
    tf = model("tf", 'backend: "tensorrt"')
    (tf / "model.savedmodel").mkdir()
    write_onnx(model("plain", "max_batch_size: 8") / "model.onnx")
    prebuilt = model("prebuilt", 'platform: "tensorrt_plan"')
    (prebuilt / "model.plan").write_bytes(b"someone's engine")
    if CAFFE.is_dir():
        caffe = model("caffe_net", 'backend: "tensorrt" max_batch_size: 4')
        for name in ("conv_rect.prototxt", "conv_rect.caffemodel"):
            shutil.copy(CAFFE / name, caffe / name)
    return root


def _dynamic_image_onnx(path: Path) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DL_INFERENCE_CACHE_DIR", str(tmp_path / "cache"))
    return make_repository(tmp_path / "repo")


def test_dry_run_plans_without_tensorrt(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    planned, summary = plan_repository(repo)
    lines: list[str] = []
    summary = run_conversion(planned, summary, lines.append, dry_run=True)
    text = "\n".join(lines)
    assert summary.not_tensorrt == ["plain"]
    labels = [p.label for p in planned]
    assert "model 'mlp' version 1" in labels and "model 'mlp_convert' version 1" in labels
    assert (
        f"model 'mlp' version 1: would build from model.onnx: fp32, profile x [1,16]..[8,16]..[8,16] -> "
        f"{repo}/mlp/1/model.plan" in text
    )
    assert "model 'img' version 1: cannot build: model 'img': input 'image' has dynamic dimension(s) [2, 3]" in text
    assert "model 'tf' version 1: cannot build: model.savedmodel is a TensorFlow SavedModel" in text
    assert "dl-inference convert tf-to-onnx" in text
    assert "model 'prebuilt' version 1: would check prebuilt model.plan, nothing to build it from" in text
    if CAFFE.is_dir():
        assert "model 'caffe_net' version 1: would build from conv_rect.prototxt + conv_rect.caffemodel" in text
    assert summary.exit_code == 1
    assert sorted(label for label, _ in summary.failed) == ["model 'img' version 1", "model 'tf' version 1"]
    assert not list(repo.glob("*/1/model.plan.json"))


def test_fake_conversion_writes_plans_and_is_idempotent(repo: Path) -> None:
    cuda = FakeCuda()
    trt = make_fake_tensorrt(cuda)
    planned, summary = plan_repository(repo)
    lines: list[str] = []
    summary = run_conversion(planned, summary, lines.append, trt=trt, cuda=cuda)
    assert lines[0] == "building for TensorRT 10.8.0.43 on NVIDIA H200 (9.0)"
    built = ["model 'mlp' version 1", "model 'mlp_convert' version 1"] + (
        ["model 'caffe_net' version 1"] if CAFFE.is_dir() else []
    )
    assert sorted(summary.built) == sorted(built)
    assert summary.checked == ["model 'prebuilt' version 1"]
    assert summary.exit_code == 1 and len(summary.failed) == 2
    assert summary.lines()[0].startswith(f"summary: {len(built)} built, 0 up to date, 1 prebuilt checked, 2 failed")
    meta = read_metadata(repo / "mlp" / "1" / "model.plan")
    assert meta is not None and meta["max_batch_size"] == 8 and meta["source"]["kind"] == "onnx"
    if CAFFE.is_dir():
        caffe_meta = read_metadata(repo / "caffe_net" / "1" / "model.plan")
        assert caffe_meta is not None and caffe_meta["source"]["kind"] == "caffe"
        assert caffe_meta["profile"]["data"]["max"] == [4, 3, 10, 12]
    # convert_to models are served by the TensorRT backend once model.plan sits beside model.onnx
    config = load_model_config(repo / "mlp_convert")
    assert backend_name(config, repo / "mlp_convert" / "1") == "tensorrt"

    again, summary2 = plan_repository(repo)
    summary2 = run_conversion(again, summary2, lambda line: None, trt=trt, cuda=cuda)
    assert summary2.built == [] and sorted(summary2.up_to_date) == sorted(built)


def test_fake_conversion_into_the_cache(repo: Path, tmp_path: Path) -> None:
    cuda = FakeCuda()
    trt = make_fake_tensorrt(cuda)
    planned, summary = plan_repository(repo, into="cache")
    summary = run_conversion([p for p in planned if p.model == "mlp"], summary, lambda line: None, trt=trt, cuda=cuda)
    assert summary.built == ["model 'mlp' version 1"]
    assert not (repo / "mlp" / "1" / "model.plan").exists()
    assert len(list((tmp_path / "cache" / "tensorrt").glob("*.plan"))) == 1


def test_cli_convert_without_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    onnx_path = write_onnx(tmp_path / "model.onnx")
    code = main(["convert", "onnx-to-tensorrt", "--onnx", str(onnx_path), "--output", str(tmp_path / "model.plan")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dl-inference: TensorRT is not installed in this environment: ")
    assert not (tmp_path / "model.plan").exists()
    code = main(["convert", "repository", "--model-repository", str(tmp_path / "nowhere"), "--dry-run"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_cli_dry_run_and_fake_build(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code = main(["convert", "repository", "--model-repository", str(repo), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 1
    assert "TensorRT model version(s) in" in out and "(dry run)" in out
    assert "  FAILED model 'tf' version 1: model.savedmodel is a TensorFlow SavedModel" in out

    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(cuda))
    monkeypatch.setattr("dl_inference.convert.tensorrt.pipeline.load_cuda_api", lambda: cuda)
    output = tmp_path / "out" / "mlp.plan"
    args = ["convert", "onnx-to-tensorrt", "--onnx", str(repo / "mlp" / "1" / "model.onnx"), "--output", str(output)]
    code = main([*args, "--max-batch-size", "16", "--opt-batch", "4", "--fp16", "--workspace-mb", "256"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "model.onnx: parsing" in out and "Tactic selection (3 steps)" in out
    assert f"wrote {output} (" in out and "fp16, max batch 16) for TensorRT 10.8.0.43 on NVIDIA H200 (9.0)" in out
    meta = read_metadata(output)
    assert meta is not None and meta["opt_batch_size"] == 4 and meta["workspace_mb"] == 256
    code = main([*args, "--int8"])
    assert code == 2 and "int8 needs calibration samples" in capsys.readouterr().err
