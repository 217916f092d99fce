"""load_tests.models: the benchmark CNN builds, checks, runs row-independently; its repository configs parse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.repository.config import load_model_config
from load_tests.models import make_resnet_like, write_model_repo

IMAGE = 16  # small, so the test stays fast; the structure does not depend on the size
WIDTH = 4


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cnn") / "model.onnx"
    make_resnet_like(path, image=IMAGE, width=WIDTH, seed=0)
    return path


def test_cnn_checks_and_declares_dynamic_batch(cnn: Path) -> None:
    model = onnx.load(str(cnn))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "image" and out.name == "logits"
    in_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in out.type.tensor_type.shape.dim]
    assert in_dims == [-1, 3, IMAGE, IMAGE]
    assert out_dims == [-1, 10]
    ops = [n.op_type for n in model.graph.node]
    # stem + 8 blocks x 2 convs + 3 projections (stages 2-4)
    assert ops.count("Conv") == 1 + 16 + 3
    assert ops.count("Add") == 8
    assert ops[-3:] == ["GlobalAveragePool", "Flatten", "Gemm"]


def test_cnn_is_deterministic(cnn: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.onnx"
    make_resnet_like(again, image=IMAGE, width=WIDTH, seed=0)
    assert again.read_bytes() == cnn.read_bytes()


def test_cnn_runs_rows_independently(cnn: Path) -> None:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(cnn), sess_options=so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 3, IMAGE, IMAGE)).astype(np.float32)
    (one,) = session.run(None, {"image": x[:1]})
    (three,) = session.run(None, {"image": x})
    assert one.shape == (1, 10) and one.dtype == np.float32
    assert three.shape == (3, 10)
    assert np.all(np.isfinite(three))
    np.testing.assert_allclose(three[0], one[0], rtol=0, atol=1e-5)
    assert not np.allclose(three[1], three[0])  # different images, different logits


@pytest.mark.parametrize("batching", [False, True])
def test_write_model_repo_config(tmp_path: Path, batching: bool) -> None:
    write_model_repo(
        tmp_path,
        "cnn",
        batching,
        max_batch_size=16,
        delay_us=1500,
        instances=2,
        preferred=[4, 8] if batching else None,
        image=IMAGE,
        width=WIDTH,
    )
    assert (tmp_path / "cnn" / "1" / "model.onnx").is_file()
    config = load_model_config(tmp_path / "cnn")
    assert config.name == "cnn"
    assert config.max_batch_size == 16
    assert [(t.name, list(t.dims)) for t in config.input] == [("image", [3, IMAGE, IMAGE])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [10])]
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    assert [t.data_type for t in (*config.input, *config.output)] == [mc.TYPE_FP32, mc.TYPE_FP32]
    assert config.HasField("dynamic_batching") is batching
    if batching:
        assert config.dynamic_batching.max_queue_delay_microseconds == 1500
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]


def test_write_model_repo_batching_defaults(tmp_path: Path) -> None:
    write_model_repo(tmp_path, "cnn_batch", True, image=IMAGE, width=WIDTH)
    text = (tmp_path / "cnn_batch" / "config.pbtxt").read_text()
    assert "dynamic_batching" in text
    config = load_model_config(tmp_path / "cnn_batch")
    assert config.max_batch_size == 32
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(config.dynamic_batching.preferred_batch_size) == []
