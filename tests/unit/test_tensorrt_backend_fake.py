"""TensorRT backend against a FAKE tensorrt module and a FAKE CUDA layer (tests/unit/trt_fakes.py).

Real TensorRT has NOT run here: it cannot be installed on these machines. These tests check our own
logic: the engine is found, built once and cached, checked against this worker, and run with the
right calls (set_input_shape, set_tensor_address with the pointers the inputs were copied to,
execute_async_v3 with the instance's stream), and the right bytes come back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from dl_inference.backends.base import get_backend
from dl_inference.backends.tensorrt_backend import TensorRTBackend
from dl_inference.convert.tensorrt.engine_cache import read_metadata
from dl_inference.convert.tensorrt.pipeline import convert_onnx_file
from dl_inference.convert.tensorrt.settings import BuildSettings
from dl_inference.errors import Code, InvalidArgument, ServerError
from dl_inference.protocol.generated import model_config_pb2 as mc
from tests.unit.trt_fakes import FakeCuda, make_fake_tensorrt

RNG = np.random.default_rng(0)
W = RNG.standard_normal((16, 4)).astype(np.float32)
B = RNG.standard_normal(4).astype(np.float32)


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"y": np.maximum(x @ W + B, 0), "total": x.sum(axis=1, keepdims=True)}


def write_onnx(path: Path) -> Path:
    """y = Relu(x·W + b) [N,4] and total = ReduceSum(x, axis 1) [N,1], x FP32 [N,16]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N", 1])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["y"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1),
    ]
    inits = [
        numpy_helper.from_array(W, "W"),
        numpy_helper.from_array(B, "B"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y, total], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def config(text: str = "") -> mc.ModelConfig:
    return text_format.Parse('name: "mlp" backend: "tensorrt" ' + text, mc.ModelConfig())


@pytest.fixture
def cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    monkeypatch.setenv("DL_INFERENCE_CACHE_DIR", str(tmp_path / "cache"))
    fake = FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(fake))
    return fake


@pytest.fixture
def version_dir(tmp_path: Path) -> Path:
    write_onnx(tmp_path / "repo" / "mlp" / "1" / "model.onnx")
    return tmp_path / "repo" / "mlp" / "1"


def trt_record() -> object:
    return sys.modules["tensorrt"].record  # type: ignore[attr-defined]


def test_fake_builds_from_onnx_at_load_once_and_completes_the_config(
    cuda: FakeCuda, version_dir: Path, tmp_path: Path
) -> None:
    backend = TensorRTBackend(cuda=cuda)
    completed = backend.load(version_dir, config("max_batch_size: 8"), "gpu", 0)
    assert completed.platform == "tensorrt_plan" and completed.max_batch_size == 8
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in completed.input] == [
        ("x", "TYPE_FP32", [16])
    ]
    assert [(t.name, list(t.dims)) for t in completed.output] == [("y", [4]), ("total", [1])]
    record = trt_record()
    (built,) = record.configs  # type: ignore[attr-defined]
    assert built.profiles[0].shapes == {"x": ((1, 16), (8, 16), (8, 16))}
    assert not built.flags  # fp32 on TensorRT 10: no precision flags
    assert backend.engine_path is not None and backend.engine_path.parent == tmp_path / "cache" / "tensorrt"
    meta = read_metadata(backend.engine_path)
    assert meta is not None and meta["gpu_name"] == "NVIDIA H200" and meta["compute_capability"] == "9.0"
    assert meta["source"]["path"] == str(version_dir / "model.onnx")
    # the default timing cache was written, and the next instance finds the engine in the cache
    assert (tmp_path / "cache" / "tensorrt" / "timing-NVIDIA_H200-sm9.0-trt10.8.0.43.cache").read_bytes() == b"+timed"
    other = TensorRTBackend(cuda=cuda)
    other.load(version_dir, config("max_batch_size: 8"), "gpu", 0)
    assert len(record.builders) == 1 and other.engine_path == backend.engine_path  # type: ignore[attr-defined]
    backend.unload()
    other.unload()


def test_fake_infer_sets_shapes_addresses_and_stream(cuda: FakeCuda, version_dir: Path) -> None:
    backend = TensorRTBackend(cuda=cuda)
    backend.load(version_dir, config("max_batch_size: 8"), "gpu", 0)
    (context,) = trt_record().contexts  # type: ignore[attr-defined]
    context.calls.clear()
    cuda.calls.clear()
    x = RNG.standard_normal((3, 16)).astype(np.float32)
    out = backend.infer({"x": x}, [])
    want = reference(x)
    np.testing.assert_allclose(out["y"], want["y"], rtol=1e-5)
    np.testing.assert_allclose(out["total"], want["total"], rtol=1e-5)

    (htod,) = [c for c in cuda.calls if c[0] == "htod"]
    stream = cuda.streams[0].handle
    assert htod[3] == x.nbytes and htod[4] == stream
    addresses = {c[1]: c[2] for c in context.calls if c[0] == "set_tensor_address"}
    assert addresses["x"] == htod[1]  # TensorRT reads the input where it was copied
    assert context.calls[0] == ("set_input_shape", "x", (3, 16))
    assert context.calls[-1] == ("execute_async_v3", stream)
    dtoh = {c[2]: c[3] for c in cuda.calls if c[0] == "dtoh"}
    assert dtoh == {addresses["y"]: 3 * 4 * 4, addresses["total"]: 3 * 4}
    assert cuda.calls[-1] == ("stream_synchronize", stream)
    assert [c[0] for c in cuda.calls].count("malloc") == 0  # buffers were sized for max_batch_size at load

    # only "y" asked for: every output still gets an address, only y is copied back
    context.calls.clear()
    cuda.calls.clear()
    out = backend.infer({"x": x[:1]}, ["y"])
    assert list(out) == ["y"] and out["y"].shape == (1, 4)
    assert {c[1] for c in context.calls if c[0] == "set_tensor_address"} == {"x", "y", "total"}
    assert len([c for c in cuda.calls if c[0] == "dtoh"]) == 1
    backend.unload()
    assert cuda.live_allocations() == 0
    assert cuda.calls[-1] == ("stream_destroy", stream)
    backend.unload()  # twice is harmless


def test_fake_infer_rejects_bad_inputs(cuda: FakeCuda, version_dir: Path) -> None:
    backend = TensorRTBackend(cuda=cuda)
    backend.load(version_dir, config("max_batch_size: 8"), "gpu", 0)
    with pytest.raises(
        InvalidArgument, match=r"input 'x': expected datatype FP32 \(numpy float32\), got numpy float64"
    ):
        backend.infer({"x": np.zeros((2, 16))}, [])
    with pytest.raises(InvalidArgument, match=r"input 'x': expected shape \[-1,16\], got \[2,15\]"):
        backend.infer({"x": np.zeros((2, 15), np.float32)}, [])
    with pytest.raises(InvalidArgument, match=r"batch of 9 rows exceeds max_batch_size 8"):
        backend.infer({"x": np.zeros((9, 16), np.float32)}, [])
    with pytest.raises(InvalidArgument, match=r"unknown output 'z'; outputs are: y, total"):
        backend.infer({"x": np.zeros((1, 16), np.float32)}, ["z"])
    with pytest.raises(InvalidArgument, match=r"missing input 'x'"):
        backend.infer({}, [])
    backend.unload()


def test_fake_prebuilt_plan_checked_against_this_worker(cuda: FakeCuda, version_dir: Path, monkeypatch) -> None:
    a100 = FakeCuda("NVIDIA A100-SXM4-80GB", (8, 0))
    old_trt = make_fake_tensorrt(a100, "10.3.0.26")
    plan = version_dir / "model.plan"
    lines: list[str] = []
    convert_onnx_file(
        version_dir / "model.onnx", plan, BuildSettings(max_batch_size=8), lines.append, trt=old_trt, cuda=a100
    )
    assert any("Tactic selection (3 steps)" in line for line in lines)

    with pytest.raises(ServerError) as err:
        TensorRTBackend(cuda=cuda).load(version_dir, config(), "gpu", 0)
    assert err.value.code == Code.FAILED_PRECONDITION
    assert (
        f"engine {plan} cannot be used here: it was built with TensorRT 10.3.0.26 on NVIDIA A100-SXM4-80GB (8.0); "
        "this worker has TensorRT 10.8.0.43 on NVIDIA H200 (9.0): rebuild with `dl-inference convert "
        f"onnx-to-tensorrt --onnx {version_dir}/model.onnx --output {plan} --max-batch-size 8 --shape x:16` "
        "or set parameter allow_rebuild" in err.value.message
    )

    allow = config('parameters { key: "allow_rebuild" value: { string_value: "true" } }')
    backend = TensorRTBackend(cuda=cuda)
    completed = backend.load(version_dir, allow, "gpu", 0)
    assert completed.max_batch_size == 8  # rebuilt with the old engine's settings, into the cache
    assert backend.engine_path is not None and backend.engine_path != plan
    backend.unload()

    # without model.onnx there is nothing to rebuild from
    (version_dir / "model.onnx").unlink()
    with pytest.raises(ServerError, match=r"allow_rebuild is set but .* has no model\.onnx or Caffe files"):
        TensorRTBackend(cuda=cuda).load(version_dir, allow, "gpu", 0)


def test_fake_prebuilt_plan_for_this_worker_loads_without_building(cuda: FakeCuda, version_dir: Path) -> None:
    plan = version_dir / "model.plan"
    trt = sys.modules["tensorrt"]
    convert_onnx_file(version_dir / "model.onnx", plan, BuildSettings(max_batch_size=4), print, trt=trt, cuda=cuda)
    builds = len(trt_record().builders)  # type: ignore[attr-defined]
    backend = TensorRTBackend(cuda=cuda)
    completed = backend.load(version_dir, config(), "gpu", 0)
    assert backend.engine_path == plan and completed.max_batch_size == 4
    assert len(trt_record().builders) == builds  # type: ignore[attr-defined]
    backend.unload()
    # the config asks for more than the engine takes
    with pytest.raises(ServerError, match=r"it takes batches up to 4, the config's max_batch_size is 16"):
        TensorRTBackend(cuda=cuda).load(version_dir, config("max_batch_size: 16"), "gpu", 0)
    # the ONNX file changed since
    write_onnx(version_dir / "model.onnx")
    (version_dir / "model.onnx").write_bytes((version_dir / "model.onnx").read_bytes() + b"\n")
    with pytest.raises(ServerError, match=r"model\.onnx changed since it was built"):
        TensorRTBackend(cuda=cuda).load(version_dir, config(), "gpu", 0)


def test_fake_plan_that_does_not_deserialize(cuda: FakeCuda, tmp_path: Path) -> None:
    version_dir = tmp_path / "m" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.plan").write_bytes(b"not an engine")
    with pytest.raises(ServerError, match=r"could not deserialize the engine .*model\.plan"):
        TensorRTBackend(cuda=cuda).load(version_dir, config(), "gpu", 0)


def test_fake_precision_flags_workspace_and_tensorrt_11(
    cuda: FakeCuda, version_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp16 = config(
        'max_batch_size: 8 parameters { key: "precision" value: { string_value: "fp16" } }'
        ' parameters { key: "workspace_mb" value: { string_value: "64" } }'
        ' parameters { key: "opt_batch_size" value: { string_value: "2" } }'
    )
    TensorRTBackend(cuda=cuda).load(version_dir, fp16, "gpu", 0).Clear()
    (built,) = trt_record().configs  # type: ignore[attr-defined]
    assert [f.name for f in built.flags] == ["FP16"]
    assert list(built.pool_limits.values()) == [64 << 20]
    assert built.profiles[0].shapes["x"][1] == (2, 16)

    trt11 = make_fake_tensorrt(cuda, "11.4.0.1")
    monkeypatch.setitem(sys.modules, "tensorrt", trt11)
    with pytest.raises(
        InvalidArgument, match=r"cannot build an fp16 engine with TensorRT 11\.4\.0\.1: TensorRT 11 builds"
    ):
        TensorRTBackend(cuda=cuda).load(version_dir, fp16, "gpu", 0)
    backend = TensorRTBackend(cuda=cuda)
    backend.load(version_dir, config("max_batch_size: 8"), "gpu", 0)
    (network,) = trt11.record.networks  # type: ignore[attr-defined]
    assert network.flags == 1 << 1  # STRONGLY_TYPED
    assert read_metadata(backend.engine_path)["precision"] == "typed"  # type: ignore[arg-type, index]
    backend.unload()


def test_fake_int8_calibration_feeds_the_samples(cuda: FakeCuda, version_dir: Path) -> None:
    calib = version_dir.parent / "calibration"
    calib.mkdir()
    samples = RNG.standard_normal((10, 16)).astype(np.float32)
    np.save(calib / "part1.npy", samples[:6])
    np.savez(calib / "part2.npz", x=samples[6:])
    int8 = config(
        'max_batch_size: 8 parameters { key: "precision" value: { string_value: "int8" } }'
        ' parameters { key: "calibration_dir" value: { string_value: "calibration" } }'
        ' parameters { key: "calibration_batch_size" value: { string_value: "4" } }'
    )
    backend = TensorRTBackend(cuda=cuda)
    backend.load(version_dir, int8, "gpu", 0)
    record = trt_record()
    (built,) = record.configs  # type: ignore[attr-defined]
    assert sorted(f.name for f in built.flags) == ["FP16", "INT8"]
    assert built.calibration_profile.shapes["x"] == ((4, 16), (4, 16), (4, 16))
    batches = [b["x"] for b in record.calibration]  # type: ignore[attr-defined]
    assert len(batches) == 2  # 10 rows in batches of 4: the last 2 are left out
    np.testing.assert_array_equal(np.concatenate(batches), samples[:8])
    meta = read_metadata(backend.engine_path)  # type: ignore[arg-type]
    assert meta is not None and meta["precision"] == "int8" and meta["calibration_sha256"]
    backend.unload()


def test_fake_parser_errors_and_cpu_instances(cuda: FakeCuda, tmp_path: Path) -> None:
    version_dir = tmp_path / "bad" / "1"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("UnsupportedOp", ["x"], ["y"], domain="custom")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(InvalidArgument, match=r"TensorRT's ONNX parser rejected .*No importer registered for op"):
        TensorRTBackend(cuda=cuda).load(version_dir, config(), "gpu", 0)
    cpu = config("instance_group { kind: KIND_CPU }")
    with pytest.raises(ServerError, match=r"TensorRT engines run on GPUs only") as err:
        TensorRTBackend(cuda=cuda).load(version_dir, cpu, "cpu", None)
    assert err.value.code == Code.FAILED_PRECONDITION


def test_without_tensorrt_installed(monkeypatch: pytest.MonkeyPatch, version_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    backend = get_backend("tensorrt_plan")  # the module itself imports without TensorRT
    assert isinstance(backend, TensorRTBackend)
    with pytest.raises(ServerError, match=r"TensorRT is not installed in this environment") as err:
        backend.load(version_dir, config(), "gpu", 0)
    assert err.value.code == Code.FAILED_PRECONDITION
