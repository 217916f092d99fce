"""TensorRT build settings without TensorRT: optimization profiles, shape specs, precision per
TensorRT version, and settings read from a model config. (Real TensorRT has not run here.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper

from dl_inference.convert.tensorrt.pipeline import settings_from_config
from dl_inference.convert.tensorrt.settings import (
    BuildSettings,
    ShapeRange,
    TensorDesc,
    compute_profile,
    onnx_io,
    parse_shape_specs,
    resolve_precision,
)
from dl_inference.errors import InvalidArgument
from dl_inference.protocol.generated import model_config_pb2 as mc

X = TensorDesc("x", "FP32", (-1, 16))
IMAGE = TensorDesc("image", "FP32", (-1, 3, -1, -1))
TOKENS = TensorDesc("tokens", "INT64", (-1, -1))


def test_batch_profile_defaults_opt_to_max() -> None:
    profile = compute_profile([X], BuildSettings(max_batch_size=8))
    assert profile == {"x": ShapeRange((1, 16), (8, 16), (8, 16))}
    assert str(profile["x"]) == "[1,16]..[8,16]..[8,16]"


def test_opt_batch_overrides_and_is_checked() -> None:
    assert compute_profile([X], BuildSettings(max_batch_size=32, opt_batch_size=4))["x"].opt == (4, 16)
    with pytest.raises(InvalidArgument, match="optimal batch size 9 must be between 1 and max_batch_size 8"):
        BuildSettings(max_batch_size=8, opt_batch_size=9)
    with pytest.raises(InvalidArgument, match="needs max_batch_size > 0"):
        BuildSettings(max_batch_size=0, opt_batch_size=1)


def test_dynamic_non_batch_dims_need_shapes_and_name_the_tensor() -> None:
    with pytest.raises(InvalidArgument) as err:
        compute_profile([IMAGE], BuildSettings(max_batch_size=4), "resnet")
    message = err.value.message
    assert "model 'resnet': input 'image' has dynamic dimension(s) [2, 3]" in message
    assert "--shape image:3x224x224" in message
    shapes = parse_shape_specs(["image:3x224x224"])
    assert compute_profile([IMAGE], BuildSettings(max_batch_size=4, shapes=shapes))["image"] == ShapeRange(
        (1, 3, 224, 224), (4, 3, 224, 224), (4, 3, 224, 224)
    )


def test_min_opt_max_shapes_and_names_with_colons() -> None:
    specs = parse_shape_specs("tokens:1:128:512; input:0:3x8")
    assert specs["tokens"] == ShapeRange((1,), (128,), (512,))
    assert specs["input:0"] == ShapeRange((3, 8), (3, 8), (3, 8))
    profile = compute_profile(
        [TOKENS], BuildSettings(max_batch_size=16, opt_batch_size=8, shapes={"tokens": specs["tokens"]})
    )
    assert profile["tokens"] == ShapeRange((1, 1), (8, 128), (16, 512))


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("image", "must look like NAME:3x224x224"),
        ("x:", "must look like"),
        (":3x4", "has no tensor name"),
        ("t:4:2:8", "need min <= opt <= max"),
        ("t:1x2:1x2:1", "same rank"),
    ],
)
def test_bad_shape_specs(spec: str, error: str) -> None:
    with pytest.raises(InvalidArgument, match=error):
        parse_shape_specs(spec)


def test_given_shapes_must_agree_with_the_model() -> None:
    with pytest.raises(InvalidArgument, match="differs from the model's fixed dimension 0 \\(3\\)"):
        compute_profile([IMAGE], BuildSettings(max_batch_size=4, shapes=parse_shape_specs("image:4x224x224")))
    with pytest.raises(InvalidArgument, match="rank 2, but the model's dimensions after the batch"):
        compute_profile([IMAGE], BuildSettings(max_batch_size=4, shapes=parse_shape_specs("image:224x224")))
    with pytest.raises(InvalidArgument, match="shapes were given for 'nope', which is not an input"):
        compute_profile([X], BuildSettings(shapes=parse_shape_specs("nope:3")))


def test_fixed_batch_dimension_cannot_batch() -> None:
    fixed = TensorDesc("x", "FP32", (1, 16))
    with pytest.raises(InvalidArgument, match="input 'x' has a fixed first dimension 1"):
        compute_profile([fixed], BuildSettings(max_batch_size=8))
    assert compute_profile([fixed], BuildSettings(max_batch_size=0))["x"] == ShapeRange((1, 16), (1, 16), (1, 16))


def test_precision_per_tensorrt_version() -> None:
    assert resolve_precision("fp16", "10.8.0.43") == ("fp16", False)
    assert resolve_precision("typed", "10.8.0.43") == ("typed", True)
    assert resolve_precision("fp32", "11.4.0") == ("typed", True)
    with pytest.raises(InvalidArgument) as err:
        resolve_precision("fp16", "11.4.0")
    assert "TensorRT 11 builds strongly typed networks only" in err.value.message
    assert "convert_float_to_float16" in err.value.message and "QuantFormat.QDQ" in err.value.message


def test_settings_checks() -> None:
    with pytest.raises(InvalidArgument, match="int8 needs calibration samples"):
        BuildSettings(precision="int8")
    with pytest.raises(InvalidArgument, match="precision must be one of"):
        BuildSettings(precision="fp8")
    with pytest.raises(InvalidArgument, match="only used with int8"):
        BuildSettings(calibration_dir=Path("x"))


def _onnx(path: Path, shape: list) -> Path:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_settings_from_config(tmp_path: Path) -> None:
    inputs, outputs = onnx_io(_onnx(tmp_path / "m.onnx", ["N", 3, "H", "W"]))
    assert inputs == [TensorDesc("image", "FP32", (-1, 3, -1, -1))]
    (tmp_path / "calib").mkdir()
    config = text_format.Parse(
        """name: "m" max_batch_size: 16
        input { name: "image" data_type: TYPE_FP32 dims: [3, 320, 320] }
        parameters { key: "precision" value: { string_value: "int8" } }
        parameters { key: "opt_batch_size" value: { string_value: "4" } }
        parameters { key: "workspace_mb" value: { string_value: "2048" } }
        parameters { key: "calibration_dir" value: { string_value: "calib" } }""",
        mc.ModelConfig(),
    )
    settings = settings_from_config(config, tmp_path / "1", inputs, outputs)
    assert settings.max_batch_size == 16 and settings.opt_batch == 4 and settings.workspace_mb == 2048
    assert settings.precision == "int8" and settings.calibration_dir == tmp_path / "calib"
    # the config's fixed dims give the non-batch shape
    assert compute_profile(inputs, settings)["image"] == ShapeRange(
        (1, 3, 320, 320), (4, 3, 320, 320), (16, 3, 320, 320)
    )

    # no max_batch_size: a model with dynamic batch everywhere batches (default 8)
    bare = mc.ModelConfig(name="m")
    bare.parameters["tensorrt_shapes"].string_value = "image:3x64x64"
    settings = settings_from_config(bare, tmp_path / "1", inputs, outputs)
    assert settings.max_batch_size == 8 and settings.shapes["image"].max == (3, 64, 64)

    bad = mc.ModelConfig(name="m")
    bad.parameters["precision"].string_value = "fp8"
    with pytest.raises(InvalidArgument, match="model 'm': precision must be one of"):
        settings_from_config(bad, tmp_path / "1", inputs, outputs)
