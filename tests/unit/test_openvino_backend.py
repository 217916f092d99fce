"""The OpenVINO backend in-process: the model formats it reads, parity with ONNX Runtime, every datatype it
serves, dynamic batch, errors that name the tensor, the compiled-model cache, and its settings."""

from __future__ import annotations

import logging
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
import pytest

ov = pytest.importorskip("openvino")

from dl_inference.backends.base import get_backend  # noqa: E402
from dl_inference.backends.openvino_backend import OpenVinoBackend  # noqa: E402
from dl_inference.errors import InvalidArgument, NotFound  # noqa: E402
from dl_inference.examples import make_example_repository  # noqa: E402
from dl_inference.protocol.generated import model_config_pb2 as mc  # noqa: E402
from dl_inference.repository.config import backend_name  # noqa: E402

TYPES = {  # V2 datatype -> (ONNX type, numpy dtype); BYTES is refused (see the backend's docstring)
    "BOOL": (onnx.TensorProto.BOOL, np.bool_),
    "UINT8": (onnx.TensorProto.UINT8, np.uint8),
    "UINT16": (onnx.TensorProto.UINT16, np.uint16),
    "UINT32": (onnx.TensorProto.UINT32, np.uint32),
    "UINT64": (onnx.TensorProto.UINT64, np.uint64),
    "INT8": (onnx.TensorProto.INT8, np.int8),
    "INT16": (onnx.TensorProto.INT16, np.int16),
    "INT32": (onnx.TensorProto.INT32, np.int32),
    "INT64": (onnx.TensorProto.INT64, np.int64),
    "FP16": (onnx.TensorProto.FLOAT16, np.float16),
    "FP32": (onnx.TensorProto.FLOAT, np.float32),
    "FP64": (onnx.TensorProto.DOUBLE, np.float64),
    "BF16": (onnx.TensorProto.BFLOAT16, ml_dtypes.bfloat16),
}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("DL_INFERENCE_CACHE_DIR", str(cache))
    return cache / "openvino"


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    make_example_repository(root)
    return root


def config(name: str, **parameters: str) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=name, backend="openvino")
    for key, value in parameters.items():
        cfg.parameters[key].string_value = value
    return cfg


def identity_model(path: Path, types: list[str]) -> None:
    """One Identity per datatype: in_<T> [N, 3] -> out_<T>."""
    nodes, inputs, outputs = [], [], []
    for t in types:
        onnx_type = TYPES[t][0]
        nodes.append(oh.make_node("Identity", [f"in_{t}"], [f"out_{t}"]))
        inputs.append(oh.make_tensor_value_info(f"in_{t}", onnx_type, ["N", 3]))
        outputs.append(oh.make_tensor_value_info(f"out_{t}", onnx_type, ["N", 3]))
    model = oh.make_model(oh.make_graph(nodes, "identity", inputs, outputs), opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / "model.onnx"))


def test_onnx_model_matches_onnxruntime_with_dynamic_batch(examples: Path) -> None:
    ours, ort = get_backend("openvino"), get_backend("onnxruntime")
    completed = ours.load(examples / "simple" / "1", config("simple"))
    ort.load(examples / "simple" / "1", mc.ModelConfig(name="simple"))
    assert completed.max_batch_size == 8 and [t.name for t in completed.input] == ["x"]
    assert completed.parameters["openvino_runtime"].string_value.startswith("OpenVINO 20")
    for batch in (1, 3, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 16)).astype(np.float32)
        got = ours.infer({"x": x}, [])["y"]
        assert got.shape == (batch, 4) and got.dtype == np.float32
        np.testing.assert_allclose(got, ort.infer({"x": x}, [])["y"], rtol=1e-5, atol=1e-5)


def test_every_datatype_but_bytes_round_trips(tmp_path: Path) -> None:
    identity_model(tmp_path / "m" / "1", list(TYPES))
    backend = get_backend("openvino")
    completed = backend.load(tmp_path / "m" / "1", config("m"))
    assert {mc.DataType.Name(t.data_type) for t in completed.input} == {f"TYPE_{t}" for t in TYPES}
    rng = np.random.default_rng(0)
    feed = {f"in_{t}": (rng.standard_normal((2, 3)) * 10).astype(dtype) for t, (_, dtype) in TYPES.items()}
    out = backend.infer(feed, [])
    for t, (_, dtype) in TYPES.items():
        assert out[f"out_{t}"].dtype == np.dtype(dtype), t
        np.testing.assert_array_equal(out[f"out_{t}"], feed[f"in_{t}"], err_msg=t)


def test_string_models_are_refused_naming_the_tensor(examples: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"tensor 'in_BYTES' is a string \(BYTES\) tensor.*onnxruntime"):
        get_backend("openvino").load(examples / "identity_all" / "1", config("identity_all"))


def test_ir_and_savedmodel_files(examples: Path, tmp_path: Path) -> None:
    version = tmp_path / "ir" / "1"
    version.mkdir(parents=True)
    ov.save_model(
        ov.Core().read_model(str(examples / "simple" / "1" / "model.onnx")),
        str(version / "model.xml"),
        compress_to_fp16=False,
    )
    assert backend_name(mc.ModelConfig(name="ir"), version) == "openvino"  # model.xml picks the backend
    x = np.ones((2, 16), np.float32)
    ir = get_backend("openvino")
    ir.load(version, mc.ModelConfig(name="ir"))
    reference = get_backend("openvino")
    reference.load(examples / "simple" / "1", config("simple"))
    np.testing.assert_allclose(ir.infer({"x": x}, [])["y"], reference.infer({"x": x}, [])["y"], rtol=1e-6)

    tf = pytest.importorskip("dl_inference.examples_tensorflow")  # TensorFlow writes the SavedModel
    tf.make_tensorflow_examples(tmp_path / "tf")
    saved = get_backend("openvino")  # which OpenVINO reads with its own front end
    completed = saved.load(tmp_path / "tf" / "tf_linear" / "1", config("tf_linear"))
    assert [(t.name, list(t.dims)) for t in completed.input] == [("x", [4])]
    x4 = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(saved.infer({"x": x4}, [])["y"], x4 @ tf.LINEAR_W + tf.LINEAR_B, rtol=1e-5)


def test_bad_inputs_name_the_tensor(examples: Path) -> None:
    backend = get_backend("openvino")
    backend.load(examples / "simple" / "1", config("simple"))
    with pytest.raises(InvalidArgument, match=r"input 'x': expected datatype FP32.*got numpy int32"):
        backend.infer({"x": np.ones((1, 16), np.int32)}, [])
    with pytest.raises(InvalidArgument, match=r"input 'x': expected shape \[-1,16\], got \[1,5\]"):
        backend.infer({"x": np.ones((1, 5), np.float32)}, [])
    with pytest.raises(InvalidArgument, match="missing input 'x'"):
        backend.infer({}, [])
    with pytest.raises(InvalidArgument, match="unknown output 'z'"):
        backend.infer({"x": np.ones((1, 16), np.float32)}, ["z"])


def test_settings_are_checked(examples: Path) -> None:
    version = examples / "simple" / "1"
    with pytest.raises(InvalidArgument, match="'precision' must be one of f32, bf16, f16, got 'int4'"):
        get_backend("openvino").load(version, config("simple", precision="int4"))
    with pytest.raises(InvalidArgument, match="'num_streams' must be >= 1"):
        get_backend("openvino").load(version, config("simple", num_streams="0"))
    with pytest.raises(InvalidArgument, match="'performance_hint' must be LATENCY or THROUGHPUT"):
        get_backend("openvino").load(version, config("simple", performance_hint="FAST"))
    with pytest.raises(InvalidArgument, match="runs on the CPU; use instance_group kind KIND_CPU"):
        get_backend("openvino").load(version, config("simple"), device="gpu")
    with pytest.raises(NotFound, match=r"none of model\.xml, model\.onnx, model\.savedmodel"):
        get_backend("openvino").load(version.parent, config("simple"))
    backend = get_backend("openvino")
    assert isinstance(backend, OpenVinoBackend)
    backend.load(version, config("simple", num_threads="2", performance_hint="LATENCY"))
    assert backend._compiled is not None and int(backend._compiled.get_property("INFERENCE_NUM_THREADS")) == 2


def test_the_cache_makes_a_second_load_skip_compiling(examples: Path, _cache: Path) -> None:
    first = get_backend("openvino")
    first.load(examples / "simple" / "1", config("simple"))
    entries = sorted(p.name for p in _cache.iterdir())
    assert entries, "nothing was cached"
    second = get_backend("openvino")
    second.load(examples / "simple" / "1", config("simple"))
    assert sorted(p.name for p in _cache.iterdir()) == entries  # the same blob served the second load
    off = get_backend("openvino")
    off.load(examples / "simple" / "1", config("simple", model_cache="false", num_threads="2"))
    assert sorted(p.name for p in _cache.iterdir()) == entries  # nothing written with the cache off


def test_bf16_precision_says_what_this_cpu_runs(examples: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = get_backend("openvino")
    assert isinstance(backend, OpenVinoBackend)
    with caplog.at_level(logging.WARNING):
        backend.load(examples / "simple" / "1", config("simple", precision="bf16"))
    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert backend.precision == ("bf16" if native else "f32")
    warned = [r.getMessage() for r in caplog.records if "precision bf16 was asked for" in r.getMessage()]
    assert bool(warned) != native, warned
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    reference = get_backend("openvino")
    reference.load(examples / "simple" / "1", config("simple"))
    np.testing.assert_allclose(
        backend.infer({"x": x}, [])["y"], reference.infer({"x": x}, [])["y"], rtol=0.05, atol=0.05
    )
