"""TensorFlowBackend on real SavedModels: signatures, config completion, datatypes, batching, errors,
and the per-process CPU settings (oneDNN, threads, affinity) checked in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from dl_inference.backends.base import get_backend  # noqa: E402
from dl_inference.backends.tensorflow_backend import TensorFlowBackend, parse_cpu_list  # noqa: E402
from dl_inference.errors import InternalError, InvalidArgument, NotFound  # noqa: E402
from dl_inference.examples_tensorflow import LINEAR_B, LINEAR_W, make_tensorflow_examples  # noqa: E402
from dl_inference.protocol.generated import model_config_pb2 as mc  # noqa: E402


class TwoHeads(tf.Module):
    """Two inputs (FP32 features, INT64 ids) and two outputs, plus a second signature."""

    def __init__(self) -> None:
        super().__init__()
        self.table = tf.Variable(np.arange(10, dtype=np.float32) * 0.5)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 3], tf.float32, name="features"),
            tf.TensorSpec([None, 2], tf.int64, name="ids"),
        ]
    )
    def serve(self, features: tf.Tensor, ids: tf.Tensor) -> dict[str, tf.Tensor]:
        looked_up = tf.reduce_sum(tf.gather(self.table, ids), axis=1)
        return {"score": tf.reduce_sum(features, axis=1, keepdims=True) + looked_up[:, None], "ids_out": ids * 2}

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="features")])
    def double(self, features: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"doubled": features * 2}


class Fixed(tf.Module):
    """No batch dimension: FP64 [2, 2] in, its transpose out."""

    @tf.function(input_signature=[tf.TensorSpec([2, 2], tf.float64, name="m")])
    def serve(self, m: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"t": tf.transpose(m)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tfrepo")
    assert make_tensorflow_examples(root) == ["tf_linear", "tf_text"]
    two = TwoHeads()
    tf.saved_model.save(
        two,
        str(root / "two" / "1" / "model.savedmodel"),
        signatures={"serving_default": two.serve, "double": two.double},
    )
    fixed = Fixed()
    tf.saved_model.save(
        fixed, str(root / "fixed" / "1" / "model.savedmodel"), signatures={"serving_default": fixed.serve}
    )
    return root


def load(repo: Path, name: str, **parameters: str) -> tuple[TensorFlowBackend, mc.ModelConfig]:
    config = mc.ModelConfig(name=name)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    backend = TensorFlowBackend()
    return backend, backend.load(repo / name / "1", config)


def io(entries) -> list[tuple[str, str, list[int]]]:
    return [(e.name, mc.DataType.Name(e.data_type), list(e.dims)) for e in entries]


def test_registry_and_aliases() -> None:
    assert isinstance(get_backend("tensorflow"), TensorFlowBackend)
    assert isinstance(get_backend("tensorflow_savedmodel"), TensorFlowBackend)


def test_config_completed_from_signature(repo: Path) -> None:
    backend, config = load(repo, "two")
    assert config.platform == "tensorflow_savedmodel" and config.backend == "tensorflow"
    assert config.max_batch_size == 8  # every tensor has a dynamic first dimension
    assert sorted(io(config.input)) == [("features", "TYPE_FP32", [3]), ("ids", "TYPE_INT64", [2])]
    assert sorted(io(config.output)) == [("ids_out", "TYPE_INT64", [2]), ("score", "TYPE_FP32", [1])]
    assert config.parameters["tensorflow_runtime"].string_value.startswith(f"TensorFlow {tf.__version__}")
    backend.unload()


def test_two_inputs_two_outputs_numerics_and_subset(repo: Path) -> None:
    backend, _ = load(repo, "two")
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = np.array([[0, 1], [2, 3], [9, 9], [4, 0]], dtype=np.int64)
    out = backend.infer({"features": features, "ids": ids}, [])
    table = np.arange(10, dtype=np.float32) * 0.5
    expected = features.sum(axis=1, keepdims=True) + table[ids].sum(axis=1)[:, None]
    np.testing.assert_allclose(out["score"], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["ids_out"], ids * 2)
    assert out["ids_out"].dtype == np.int64
    only = backend.infer({"features": features, "ids": ids}, ["ids_out"])
    assert list(only) == ["ids_out"]


def test_other_signature_by_parameter(repo: Path) -> None:
    backend, config = load(repo, "two", signature_name="double")
    assert io(config.input) == [("features", "TYPE_FP32", [3])]
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(backend.infer({"features": x}, [])["doubled"], x * 2)


def test_unknown_signature_lists_the_available_ones(repo: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"no signature 'nope'; its signatures are: double, serving_default"):
        load(repo, "two", signature_name="nope")


def test_linear_example_exact(repo: Path) -> None:
    backend, config = load(repo, "tf_linear")
    assert config.max_batch_size == 8  # a bare config: batching from the signature (the example's file sets 16)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(backend.infer({"x": x}, [])["y"], x @ LINEAR_W + LINEAR_B, rtol=1e-6, atol=1e-6)


def test_bytes_in_and_out(repo: Path) -> None:
    backend, config = load(repo, "tf_text")
    # A rank-1 signature batched: Triton's batched scalar, dims [1] + reshape [].
    assert io(config.input) == [("text", "TYPE_STRING", [1])]
    assert config.input[0].HasField("reshape")
    text = np.array([[b"abc"], ["h\u00e9".encode()], [b""]], dtype=object)
    out = backend.infer({"text": text}, [])
    assert out["upper"].shape == (3, 1) and out["upper"].dtype == object
    assert out["upper"][:, 0].tolist() == [b"ABC", "H\u00c9".encode(), b""]  # Unicode-aware
    assert out["length"][:, 0].tolist() == [3, 3, 0]


def test_no_batch_dimension(repo: Path) -> None:
    backend, config = load(repo, "fixed")
    assert config.max_batch_size == 0 and io(config.input) == [("m", "TYPE_FP64", [2, 2])]
    m = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(backend.infer({"m": m}, [])["t"], m.T)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"features": np.ones((2, 3), np.float64), "ids": np.zeros((2, 2), np.int64)},
         r"input 'features': expected datatype FP32 \(numpy float32\), got numpy float64"),
        ({"features": np.ones((2, 4), np.float32), "ids": np.zeros((2, 2), np.int64)},
         r"input 'features': expected shape \[-1,3\], got \[2,4\]"),
        ({"features": np.ones((2, 3), np.float32)}, r"missing input 'ids'"),
        ({"features": np.ones((2, 3), np.float32), "ids": np.zeros((3, 2), np.int64)},
         r"input '(ids|features)' has batch size [23], other inputs have [23]"),
        ({"features": np.ones((1, 3), np.float32), "ids": np.zeros((1, 2), np.int64), "x": np.ones(1)},
         r"unknown input 'x'"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_tensor(repo: Path, inputs: dict[str, np.ndarray], message: str) -> None:
    backend, _ = load(repo, "two")
    with pytest.raises(InvalidArgument, match=message):
        backend.infer(inputs, [])


def test_error_inside_the_graph_is_a_client_error(repo: Path) -> None:
    backend, _ = load(repo, "two")
    with pytest.raises(InvalidArgument, match=r"TensorFlow refused the inputs: .*indices"):
        backend.infer({"features": np.ones((1, 3), np.float32), "ids": np.array([[0, 99]], np.int64)}, [])
    assert backend.infer({"features": np.ones((1, 3), np.float32), "ids": np.zeros((1, 2), np.int64)}, [])


def test_unknown_output(repo: Path) -> None:
    backend, _ = load(repo, "two")
    with pytest.raises(InvalidArgument, match=r"unknown output 'nope'; outputs are: "):
        backend.infer({"features": np.ones((1, 3), np.float32), "ids": np.zeros((1, 2), np.int64)}, ["nope"])


def test_config_that_contradicts_the_signature(repo: Path) -> None:
    config = mc.ModelConfig(name="two")
    config.input.add(name="features", data_type=mc.TYPE_FP16)
    with pytest.raises(InvalidArgument, match=r"input 'features': config data_type TYPE_FP16 does not match"):
        TensorFlowBackend().load(repo / "two" / "1", config)
    config = mc.ModelConfig(name="two")
    config.output.add(name="logits")
    with pytest.raises(InvalidArgument, match=r"config output 'logits' is not an output of the SavedModel signature"):
        TensorFlowBackend().load(repo / "two" / "1", config)


def test_missing_or_broken_savedmodel(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    with pytest.raises(NotFound, match=r"no SavedModel at .*model.savedmodel"):
        TensorFlowBackend().load(tmp_path / "m" / "1", mc.ModelConfig(name="m"))
    broken = tmp_path / "m" / "1" / "model.savedmodel"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"\x00not a saved model")
    with pytest.raises(InvalidArgument, match=r"TensorFlow cannot load the SavedModel"):
        TensorFlowBackend().load(tmp_path / "m" / "1", mc.ModelConfig(name="m"))


def test_infer_after_unload_is_unavailable(repo: Path) -> None:
    backend, _ = load(repo, "tf_linear")
    backend.unload()
    backend.unload()
    with pytest.raises(Exception, match="no model loaded"):
        backend.infer({"x": np.ones((1, 4), np.float32)}, [])


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,6", "m") == {0, 1, 2, 3, 6}
    assert parse_cpu_list(" 1 ", "m") == {1}
    for bad in ("a", "3-1", ",", "-1"):
        with pytest.raises(InvalidArgument, match="cpu_affinity"):
            parse_cpu_list(bad, "m")


_CHILD = """
import json, os, sys
from pathlib import Path
from dl_inference.backends.tensorflow_backend import TensorFlowBackend
from dl_inference.protocol.generated import model_config_pb2 as mc
config = mc.ModelConfig(name="tf_linear")
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    config.parameters[k].string_value = v
try:
    completed = TensorFlowBackend().load(Path(sys.argv[1]), config)
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    raise SystemExit(0)
import tensorflow as tf
threads = {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
print(json.dumps({
    "runtime": completed.parameters["tensorflow_runtime"].string_value,
    "intra": tf.config.threading.get_intra_op_parallelism_threads(),
    "inter": tf.config.threading.get_inter_op_parallelism_threads(),
    "affinity": sorted({tuple(v) for v in threads.values()}),
}))
"""


def _child(repo: Path, *params: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(repo / "tf_linear" / "1"), *params],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cpu_settings_applied_in_a_fresh_worker(repo: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    got = _child(repo, "onednn=on", "intra_op_threads=2", "inter_op_threads=3", f"cpu_affinity={cpu}")
    assert "TF_ENABLE_ONEDNN_OPTS=1" in got["runtime"]
    assert (got["intra"], got["inter"]) == (2, 3)
    assert got["affinity"] == [[cpu]]  # every thread, TensorFlow's included
    default = _child(repo)
    assert "TF_ENABLE_ONEDNN_OPTS=unset" in default["runtime"] and (default["intra"], default["inter"]) == (1, 1)
    off = _child(repo, "onednn=off")
    assert "TF_ENABLE_ONEDNN_OPTS=0" in off["runtime"]


def test_bad_cpu_settings_are_clear(repo: Path) -> None:
    assert "parameter 'onednn' must be one of default, on, off" in _child(repo, "onednn=maybe")["error"]
    far = max(os.sched_getaffinity(0)) + 1000
    assert "cpu_affinity names CPUs" in _child(repo, f"cpu_affinity={far}")["error"]


def test_output_dtype_mismatch_is_internal(repo: Path) -> None:
    backend, _ = load(repo, "tf_linear")
    backend._outputs["y"] = backend._outputs["y"].__class__(
        "y", "FP64", np.dtype(np.float64), backend._outputs["y"].shape, None
    )
    with pytest.raises(InternalError, match=r"output 'y' came back as float32, expected float64"):
        backend.infer({"x": np.ones((1, 4), np.float32)}, [])
