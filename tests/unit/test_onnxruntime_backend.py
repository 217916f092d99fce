"""OnnxRuntimeBackend against the example repository: config auto-completion and validation,
every V2 datatype through Identity, numerics, output subsets and error messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import yaml
from google.protobuf import json_format, text_format
from onnx import TensorProto, helper, numpy_helper

from dl_inference.backends.base import Backend, available_backends, get_backend
from dl_inference.backends.onnxruntime_backend import OnnxRuntimeBackend
from dl_inference.errors import Code, InternalError, InvalidArgument, NotFound, ServerError, Unavailable
from dl_inference.examples import make_example_repository
from dl_inference.protocol.datatypes import V2_DATATYPES, numpy_dtype
from dl_inference.protocol.generated import model_config_pb2 as mc


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    assert make_example_repository(root) == ["simple", "identity_all", "add_sub", "versioned", "image_classifier"]
    return root


def read_config(model_dir: Path) -> mc.ModelConfig:
    """The model's config file (pbtxt or yaml), or an empty config with just the name."""
    config = mc.ModelConfig()
    if (model_dir / "config.pbtxt").exists():
        text_format.Parse((model_dir / "config.pbtxt").read_text(), config)
    elif (model_dir / "config.yaml").exists():
        json_format.ParseDict(yaml.safe_load((model_dir / "config.yaml").read_text()), config)
    else:
        config.name = model_dir.name
    return config


def load(repo: Path, name: str, config: mc.ModelConfig | None = None, version: int = 1):
    backend = OnnxRuntimeBackend()
    completed = backend.load(repo / name / str(version), config if config is not None else read_config(repo / name))
    return backend, completed


def io(entries) -> list[tuple[str, str, list[int]]]:
    return [(e.name, mc.DataType.Name(e.data_type), list(e.dims)) for e in entries]


def write_model(path: Path, graph: onnx.GraphProto) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (path / "1").mkdir(parents=True, exist_ok=True)
    (path / "1" / "model.onnx").write_bytes(model.SerializeToString())
    return path / "1"


# --- example repository ------------------------------------------------------------------------


def test_example_repository_layout_and_determinism(repo: Path, tmp_path: Path) -> None:
    assert (repo / "simple" / "config.pbtxt").is_file()
    assert not list((repo / "identity_all").glob("config.*"))
    assert (repo / "add_sub" / "config.yaml").is_file()
    assert sorted(p.name for p in (repo / "versioned").iterdir() if p.is_dir()) == ["1", "2", "3"]
    make_example_repository(tmp_path)
    for path in repo.rglob("*"):
        if path.is_file():
            assert (tmp_path / path.relative_to(repo)).read_bytes() == path.read_bytes(), path

    add_sub = read_config(repo / "add_sub")
    assert add_sub.max_batch_size == 8 and add_sub.instance_group[0].count == 2
    versioned = read_config(repo / "versioned")
    assert versioned.version_policy.WhichOneof("policy_choice") == "all"
    simple = read_config(repo / "simple")
    assert simple.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


# --- registry ----------------------------------------------------------------------------------


def test_registry() -> None:
    assert "onnxruntime" in available_backends()
    assert isinstance(get_backend("onnxruntime"), OnnxRuntimeBackend)
    assert isinstance(get_backend("onnxruntime_onnx"), Backend)
    with pytest.raises(InvalidArgument, match=r"unknown backend 'nope'.*onnxruntime"):
        get_backend("nope")


def test_importing_backends_does_not_import_frameworks() -> None:
    code = (
        "import sys\n"
        "import dl_inference.backends\n"
        "import dl_inference.backends.base as b\n"
        "b.available_backends()\n"
        "loaded = [m for m in ('onnxruntime', 'torch', 'tensorflow') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "b.get_backend('onnxruntime')\n"
        "assert 'onnxruntime' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# --- auto-completion ---------------------------------------------------------------------------


def test_simple_config_and_numerics(repo: Path) -> None:
    backend, config = load(repo, "simple")
    assert config.max_batch_size == 8
    assert io(config.input) == [("x", "TYPE_FP32", [16])]
    assert io(config.output) == [("y", "TYPE_FP32", [4])]
    assert config.backend == "onnxruntime"
    assert backend.providers == ["CPUExecutionProvider"]

    model = onnx.load(str(repo / "simple" / "1" / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    y = backend.infer({"x": x}, ["y"])["y"]
    expected = np.maximum(x @ weights["W"] + weights["b"], 0)
    assert y.dtype == np.float32 and y.shape == (5, 4)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    backend.unload()


def test_identity_all_autocompleted(repo: Path) -> None:
    _, config = load(repo, "identity_all")
    assert config.name == "identity_all"
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    expected_type = {t: ("TYPE_STRING" if t == "BYTES" else f"TYPE_{t}") for t in V2_DATATYPES}
    assert io(config.input) == [(f"in_{t}", expected_type[t], [-1]) for t in V2_DATATYPES]
    assert io(config.output) == [(f"out_{t}", expected_type[t], [-1]) for t in V2_DATATYPES]


def identity_inputs(batch: int = 2) -> dict[str, np.ndarray]:
    """An input per datatype, with edge values; each tensor has its own second dimension."""
    rng = np.random.default_rng(7)
    arrays: dict[str, np.ndarray] = {}
    for i, datatype in enumerate(V2_DATATYPES):
        n = 3 + i % 4
        dtype = numpy_dtype(datatype)
        if datatype == "BYTES":
            values = [b"", b"abc", "h\u00e9llo \u4e16\u754c \U0001f600".encode(), b"a\x00b", b"", b"x" * 100]
            array = np.array(values[: batch * n] + [b""] * max(0, batch * n - len(values)), dtype=object)
            array = array.reshape(batch, n)
        elif datatype == "BOOL":
            array = rng.integers(0, 2, (batch, n)).astype(bool)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            array = rng.integers(info.min, info.max, (batch, n), dtype=dtype, endpoint=True)
            array.flat[0], array.flat[1] = info.min, info.max
        else:
            array = (rng.standard_normal((batch, n)) * 100).astype(dtype)
            array.flat[0] = np.inf
            array.flat[1] = -0.0
            array.flat[2] = np.finfo(dtype).max if datatype != "BF16" else ml_dtypes.finfo(dtype).max
        arrays[f"in_{datatype}"] = array
    return arrays


def test_identity_all_every_datatype_exact(repo: Path) -> None:
    backend, _ = load(repo, "identity_all")
    inputs = identity_inputs()
    outputs = backend.infer(inputs, [])
    assert sorted(outputs) == sorted(f"out_{t}" for t in V2_DATATYPES)
    for datatype in V2_DATATYPES:
        sent, got = inputs[f"in_{datatype}"], outputs[f"out_{datatype}"]
        assert got.dtype == numpy_dtype(datatype), datatype
        assert got.shape == sent.shape, datatype
        if datatype == "BYTES":
            assert got.tolist() == sent.tolist()
            assert all(type(v) is bytes for v in got.flat)
        else:
            assert got.tobytes() == sent.tobytes(), datatype  # bit-exact, incl. -0.0 and inf


def test_identity_all_bytes_and_bf16_alone_and_subsets(repo: Path) -> None:
    backend, _ = load(repo, "identity_all")
    inputs = identity_inputs(batch=1)
    out = backend.infer(inputs, ["out_BF16"])
    assert list(out) == ["out_BF16"] and out["out_BF16"].dtype == ml_dtypes.bfloat16
    assert out["out_BF16"].tobytes() == inputs["in_BF16"].tobytes()
    out = backend.infer(inputs, ["out_BYTES", "out_FP16"])
    assert list(out) == ["out_BYTES", "out_FP16"]
    assert out["out_BYTES"].tolist() == inputs["in_BYTES"].tolist()
    # str elements and numpy bytes arrays are accepted for BYTES too
    inputs["in_BYTES"] = np.array([["\u00e9", "", "z"]], dtype=object)
    assert backend.infer(inputs, ["out_BYTES"])["out_BYTES"].tolist() == [["\u00e9".encode(), b"", b"z"]]
    inputs["in_BYTES"] = np.array([[b"a", b"bc"]], dtype="S2")
    assert backend.infer(inputs, ["out_BYTES"])["out_BYTES"].tolist() == [[b"a", b"bc"]]
    # empty batch item dimension
    inputs["in_BYTES"] = np.empty((1, 0), dtype=object)
    assert backend.infer(inputs, ["out_BYTES"])["out_BYTES"].shape == (1, 0)


def test_add_sub_numerics_and_subsets(repo: Path) -> None:
    backend, config = load(repo, "add_sub")
    assert config.max_batch_size == 8
    assert io(config.input) == [("INPUT0", "TYPE_FP32", [16]), ("INPUT1", "TYPE_FP32", [16])]
    assert io(config.output) == [("OUTPUT0", "TYPE_FP32", [16]), ("OUTPUT1", "TYPE_FP32", [16])]
    assert config.instance_group[0].count == 2
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 16)).astype(np.float32)
    b = rng.standard_normal((4, 16)).astype(np.float32)
    out = backend.infer({"INPUT0": a, "INPUT1": b}, [])
    np.testing.assert_array_equal(out["OUTPUT0"], a + b)
    np.testing.assert_array_equal(out["OUTPUT1"], a - b)
    only = backend.infer({"INPUT0": a, "INPUT1": b}, ["OUTPUT1"])
    assert list(only) == ["OUTPUT1"]
    np.testing.assert_array_equal(only["OUTPUT1"], a - b)


def test_versioned(repo: Path) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for version in (1, 2, 3):
        backend, config = load(repo, "versioned", version=version)
        assert config.version_policy.WhichOneof("policy_choice") == "all"
        assert io(config.input) == [("x", "TYPE_FP32", [4])]
        np.testing.assert_array_equal(backend.infer({"x": x}, ["y"])["y"], x * version)


def test_partial_config_is_filled(repo: Path) -> None:
    config = mc.ModelConfig(name="add_sub")
    config.input.add(name="INPUT1")
    config.output.add(name="OUTPUT0", dims=[16])
    _, completed = load(repo, "add_sub", config)
    assert completed.max_batch_size == 8
    assert io(completed.input) == [("INPUT1", "TYPE_FP32", [16]), ("INPUT0", "TYPE_FP32", [16])]
    assert io(completed.output) == [("OUTPUT0", "TYPE_FP32", [16])]  # a listed subset stays a subset


def test_no_batching_when_config_dims_have_full_rank(repo: Path) -> None:
    config = mc.ModelConfig(name="versioned")
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[-1, 4])
    backend, completed = load(repo, "versioned", config, version=2)
    assert completed.max_batch_size == 0
    assert io(completed.output) == [("y", "TYPE_FP32", [-1, 4])]
    x = np.ones((3, 4), np.float32)
    np.testing.assert_array_equal(backend.infer({"x": x}, [])["y"], x * 2)


def test_parameters(repo: Path) -> None:
    config = mc.ModelConfig(name="add_sub")
    config.parameters["default_max_batch_size"].string_value = "4"
    config.parameters["intra_op_thread_count"].string_value = "2"
    config.parameters["allow_spinning"].string_value = "true"
    _, completed = load(repo, "add_sub", config)
    assert completed.max_batch_size == 4
    config.parameters["intra_op_thread_count"].string_value = "two"
    with pytest.raises(InvalidArgument, match="intra_op_thread_count"):
        load(repo, "add_sub", config)


def test_reshape(repo: Path) -> None:
    config = mc.ModelConfig(name="simple", max_batch_size=4)
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[4, 4]).reshape.shape.extend([16])
    config.output.add(name="y", data_type=mc.TYPE_FP32, dims=[2, 2]).reshape.shape.extend([4])
    backend, completed = load(repo, "simple", config)
    assert io(completed.input) == [("x", "TYPE_FP32", [4, 4])]
    x = np.random.default_rng(0).standard_normal((3, 4, 4)).astype(np.float32)
    reference, _ = load(repo, "simple")
    expected = reference.infer({"x": x.reshape(3, 16)}, [])["y"]
    y = backend.infer({"x": x}, [])["y"]
    assert y.shape == (3, 2, 2)
    np.testing.assert_array_equal(y, expected.reshape(3, 2, 2))


def test_scalar_per_item_gets_dims_1_and_empty_reshape(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["b"])],
        "neg",
        [helper.make_tensor_value_info("a", TensorProto.INT32, ["batch"])],
        [helper.make_tensor_value_info("b", TensorProto.INT32, ["batch"])],
    )
    backend = OnnxRuntimeBackend()
    config = backend.load(write_model(tmp_path / "neg", graph), mc.ModelConfig(name="neg"))
    assert config.max_batch_size == 8
    assert list(config.input[0].dims) == [1] and config.input[0].HasField("reshape")
    assert list(config.input[0].reshape.shape) == []
    out = backend.infer({"a": np.array([[1], [2], [3]], np.int32)}, [])
    np.testing.assert_array_equal(out["b"], [[-1], [-2], [-3]])


# --- errors ------------------------------------------------------------------------------------


def test_input_dtype_mismatch_names_tensor(repo: Path) -> None:
    backend, _ = load(repo, "add_sub")
    a = np.zeros((2, 16), np.float32)
    with pytest.raises(InvalidArgument, match=r"'INPUT1'.*FP32.*float64") as info:
        backend.infer({"INPUT0": a, "INPUT1": a.astype(np.float64)}, [])
    assert info.value.code is Code.INVALID_ARGUMENT and info.value.http_status == 400
    identity, _ = load(repo, "identity_all")
    inputs = identity_inputs()
    inputs["in_BF16"] = inputs["in_BF16"].astype(np.float32)
    with pytest.raises(InvalidArgument, match=r"'in_BF16'.*BF16"):
        identity.infer(inputs, [])
    inputs = identity_inputs()
    inputs["in_BYTES"] = np.zeros((2, 3), np.int32)
    with pytest.raises(InvalidArgument, match=r"'in_BYTES'.*BYTES"):
        identity.infer(inputs, [])


def test_bad_inputs(repo: Path) -> None:
    backend, _ = load(repo, "add_sub")
    a = np.zeros((2, 16), np.float32)
    with pytest.raises(InvalidArgument, match=r"'INPUT1'.*\[-1,16\].*\[2,15\]"):
        backend.infer({"INPUT0": a, "INPUT1": a[:, :15]}, [])
    with pytest.raises(InvalidArgument, match=r"'INPUT1'.*batch size 3"):
        backend.infer({"INPUT0": a, "INPUT1": np.zeros((3, 16), np.float32)}, [])
    with pytest.raises(InvalidArgument, match="missing input 'INPUT1'"):
        backend.infer({"INPUT0": a}, [])
    with pytest.raises(InvalidArgument, match="unknown input 'INPUT9'"):
        backend.infer({"INPUT0": a, "INPUT1": a, "INPUT9": a}, [])
    with pytest.raises(InvalidArgument, match="unknown output 'OUTPUT9'"):
        backend.infer({"INPUT0": a, "INPUT1": a}, ["OUTPUT9"])
    identity, _ = load(repo, "identity_all")
    inputs = identity_inputs()
    inputs["in_BYTES"] = np.array([[b"\xff\xfe", b"ok"]], dtype=object).repeat(2, axis=0)
    with pytest.raises(InvalidArgument, match=r"'in_BYTES'.*UTF-8"):
        identity.infer(inputs, [])
    # the backend still works after bad requests
    np.testing.assert_array_equal(backend.infer({"INPUT0": a + 1, "INPUT1": a}, ["OUTPUT0"])["OUTPUT0"], a + 1)


def test_ort_runtime_errors_are_mapped(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "n"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "m"]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", "n"])],
    )
    backend = OnnxRuntimeBackend()
    backend.load(write_model(tmp_path / "add", graph), mc.ModelConfig(name="add"))
    with pytest.raises(ServerError, match="Add") as info:  # broadcast failure inside the kernel: ORT FAIL
        backend.infer({"a": np.zeros((1, 3), np.float32), "b": np.zeros((1, 4), np.float32)}, [])
    assert isinstance(info.value, InternalError | InvalidArgument)
    assert backend.infer({"a": np.ones((1, 3), np.float32), "b": np.ones((1, 1), np.float32)}, [])["c"].sum() == 6


def test_config_model_mismatches(repo: Path) -> None:
    def cfg(**kwargs) -> mc.ModelConfig:
        return mc.ModelConfig(name="add_sub", max_batch_size=8, **kwargs)

    bad_type = cfg()
    bad_type.input.add(name="INPUT0", data_type=mc.TYPE_FP16, dims=[16])
    with pytest.raises(InvalidArgument, match=r"'INPUT0'.*TYPE_FP16.*TYPE_FP32"):
        load(repo, "add_sub", bad_type)

    unknown = cfg()
    unknown.output.add(name="OUTPUT7", data_type=mc.TYPE_FP32, dims=[16])
    with pytest.raises(InvalidArgument, match=r"'OUTPUT7'.*OUTPUT0, OUTPUT1"):
        load(repo, "add_sub", unknown)

    bad_dims = cfg()
    bad_dims.input.add(name="INPUT1", data_type=mc.TYPE_FP32, dims=[8])
    with pytest.raises(InvalidArgument, match=r"'INPUT1'.*\[8\].*\[-1,8\].*\[-1,16\]"):
        load(repo, "add_sub", bad_dims)

    bad_rank = cfg()
    bad_rank.input.add(name="INPUT1", data_type=mc.TYPE_FP32, dims=[-1, 16])
    with pytest.raises(InvalidArgument, match="'INPUT1'"):
        load(repo, "add_sub", bad_rank)

    duplicate = cfg()
    duplicate.input.add(name="INPUT0")
    duplicate.input.add(name="INPUT0")
    with pytest.raises(InvalidArgument, match="twice"):
        load(repo, "add_sub", duplicate)


def test_max_batch_size_needs_dynamic_first_dim(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])],
        "fixed",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3])],
    )
    version_dir = write_model(tmp_path / "fixed", graph)
    backend = OnnxRuntimeBackend()
    config = backend.load(version_dir, mc.ModelConfig(name="fixed"))
    assert config.max_batch_size == 0
    assert io(config.input) == [("a", "TYPE_FP32", [2, 3])]
    with pytest.raises(InvalidArgument, match=r"max_batch_size.*'a'.*\[2,3\]"):
        backend.load(version_dir, mc.ModelConfig(name="fixed", max_batch_size=4))


def test_missing_or_corrupt_model(tmp_path: Path) -> None:
    backend = OnnxRuntimeBackend()
    with pytest.raises(NotFound):
        backend.load(tmp_path / "nothing" / "1", mc.ModelConfig(name="nothing"))
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(InvalidArgument, match="broken"):
        backend.load(tmp_path / "broken" / "1", mc.ModelConfig(name="broken"))


def test_unload(repo: Path) -> None:
    backend, _ = load(repo, "simple")
    backend.unload()
    backend.unload()
    with pytest.raises(Unavailable):
        backend.infer({"x": np.zeros((1, 16), np.float32)}, [])


def _external_weight_model(version: Path, location: str, in_subgraph: bool = False) -> None:
    weight = numpy_helper.from_array(np.ones(4, np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "16"}.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    x, y = (
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
    )
    if in_subgraph:  # the weight sits in an If branch's graph, not the main graph
        branch = helper.make_graph(
            [helper.make_node("Add", ["x", "W"], ["z"])],
            "then",
            [],
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])],
            initializer=[weight],
        )
        other = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["z2"])],
            "else",
            [],
            [helper.make_tensor_value_info("z2", TensorProto.FLOAT, [4])],
        )
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)]
        graph = helper.make_graph(nodes, "g", [x], [y], initializer=[cond])
    else:
        graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "g", [x], [y], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.onnx").write_bytes(model.SerializeToString())


@pytest.mark.parametrize("how", ["relative path", "symlink", "absolute path", "subgraph"])
def test_external_data_outside_the_model_directory_is_refused(tmp_path: Path, how: str) -> None:
    """An ONNX file cannot make the worker read files outside its directory through external data: our
    own check names the tensor (ONNX Runtime 1.32 refuses too, but older releases did not)."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    version = tmp_path / "repo" / "m" / "1"
    version.mkdir(parents=True)
    location = {"relative path": "../../../secret.bin", "symlink": "weights.bin", "absolute path": str(secret),
                "subgraph": "../../../secret.bin"}[how]  # fmt: skip
    if how == "symlink":
        (version / "weights.bin").symlink_to(secret)
    _external_weight_model(version, location, in_subgraph=how == "subgraph")
    with pytest.raises(InvalidArgument, match=r"tensor 'W' keeps its data in .*outside the model's directory"):
        OnnxRuntimeBackend().load(version, mc.ModelConfig(name="m"))


def test_external_data_inside_the_model_directory_loads(tmp_path: Path) -> None:
    version = tmp_path / "repo" / "m" / "1"
    _external_weight_model(version, "weights/w.bin")
    (version / "weights").mkdir()
    (version / "weights" / "w.bin").write_bytes(np.full(4, 2.0, np.float32).tobytes())
    backend = OnnxRuntimeBackend()
    backend.load(version, mc.ModelConfig(name="m"))
    out = backend.infer({"x": np.ones(4, np.float32)}, [])
    np.testing.assert_array_equal(out["y"], np.full(4, 3.0, np.float32))
