"""Caffe pre-processing folded into the graph, and how a version directory's Caffe files are found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper

from dl_inference.convert.caffe.cache import find_caffe_files
from dl_inference.convert.caffe.preprocess import Preprocess, apply_preprocess, preprocess_from_config
from dl_inference.errors import InvalidArgument
from dl_inference.protocol.generated import model_config_pb2 as mc


def _identity() -> object:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["data"], ["out"])],
        "g",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["b", 3, 2, 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 3, 2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_swap_mean_scale_in_caffe_order() -> None:
    model = apply_preprocess(_identity(), Preprocess(None, (2, 1, 0), (1.0, 2.0, 3.0), 0.5))  # type: ignore[arg-type]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["data"]
    x = np.random.default_rng(0).uniform(0, 10, (2, 3, 2, 2)).astype(np.float32)
    (got,) = session.run(None, {"data": x})
    expected = np.maximum((x[:, [2, 1, 0]] - np.array([1, 2, 3], np.float32).reshape(1, 3, 1, 1)) * 0.5, 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_settings_from_config_and_their_errors() -> None:
    config = text_format.Parse(
        'name: "m" parameters { key: "caffe_mean" value: { string_value: "104, 117,123" } }'
        ' parameters { key: "caffe_scale" value: { string_value: "0.017" } }',
        mc.ModelConfig(),
    )
    pre = preprocess_from_config(config)
    assert pre.mean == (104.0, 117.0, 123.0) and pre.scale == pytest.approx(0.017) and pre.channel_swap is None
    assert preprocess_from_config(mc.ModelConfig(name="m")).empty
    config.parameters["caffe_channel_swap"].string_value = "0,0,1"
    with pytest.raises(InvalidArgument, match="permutation"):
        preprocess_from_config(config)
    with pytest.raises(InvalidArgument, match="4 values"):
        apply_preprocess(_identity(), Preprocess(mean=(1.0, 2.0, 3.0, 4.0)))  # type: ignore[arg-type]


def test_find_caffe_files(tmp_path: Path) -> None:
    assert find_caffe_files(tmp_path) is None
    (tmp_path / "a.prototxt").write_text("")
    with pytest.raises(InvalidArgument, match="exactly one"):
        find_caffe_files(tmp_path)
    (tmp_path / "w.caffemodel").write_bytes(b"")
    assert find_caffe_files(tmp_path) == (tmp_path / "a.prototxt", tmp_path / "w.caffemodel")
