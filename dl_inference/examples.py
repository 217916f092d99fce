"""Small example ONNX models, built with the onnx helper API (no downloads, fixed seed).

:func:`make_example_repository` writes a model repository that tests, demos and benchmarks use:

``simple``
    the tiny benchmark model ``y = Relu(x @ W + b)``, x FP32 [-1,16] -> y FP32 [-1,4];
    ``config.pbtxt`` with max_batch_size 8 and one KIND_CPU instance.
``identity_all``
    one Identity per V2 datatype: ``in_<TYPE>`` -> ``out_<TYPE>``, shape [batch, n] with both
    dimensions dynamic (BYTES is an ONNX string tensor); no config file, so everything is
    auto-completed from the model (max_batch_size becomes 8).
``add_sub``
    INPUT0, INPUT1 FP32 [-1,16] -> OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1;
    ``config.yaml`` with max_batch_size 8 and two KIND_CPU instances, inputs/outputs auto-completed.
``versioned``
    versions 1, 2, 3 where version N computes y = x * N, x and y FP32 [-1,4];
    ``config.pbtxt`` with ``version_policy: { all {} }``.
``image_classifier``
    a model behind a ``handler.py``: clients send JPEG/PNG bytes (``image`` BYTES [-1,1]) and get the
    top-k colour labels (``labels`` BYTES [-1,-1], ``"score:index:label"``, ``top_k`` parameter,
    default 3). The handler decodes and resizes to 32x32 in ``preprocess``; the ONNX model
    (``pixels`` FP32 [-1,3,32,32] -> ``probabilities`` FP32 [-1,8]) averages the image's colour and
    scores it against 8 reference colours (red, green, blue, yellow, cyan, magenta, white, black),
    so its answers are predictable; dynamic batching, max_batch_size 8.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import yaml
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from dl_inference.protocol.datatypes import V2_DATATYPES
from dl_inference.protocol.generated import model_config_pb2 as mc

logger = logging.getLogger(__name__)

__all__ = ["EXAMPLE_MODELS", "ONNX_ELEMENT_TYPE", "make_example_repository"]

#: ONNX opset and IR version of the examples: old enough for any onnxruntime >= 1.14.
OPSET = 17
IR_VERSION = 8
SEED = 20240607

#: V2 datatype -> ONNX TensorProto element type.
ONNX_ELEMENT_TYPE: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BF16": TensorProto.BFLOAT16,
    "BYTES": TensorProto.STRING,
}


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dl_inference.examples"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _save(model: onnx.ModelProto, model_dir: Path, version: int = 1) -> None:
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.onnx").write_bytes(model.SerializeToString())


def _write_pbtxt(model_dir: Path, config: mc.ModelConfig) -> None:
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")


def _simple(root: Path) -> None:
    rng = np.random.default_rng(SEED)
    weight = rng.standard_normal((16, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W", "b"], ["xw_b"], name="gemm"),
            helper.make_node("Relu", ["xw_b"], ["y"], name="relu"),
        ],
        "simple",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model_dir = root / "simple"
    _save(_model(graph), model_dir)
    config = mc.ModelConfig(name="simple", backend="onnxruntime", max_batch_size=8)
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[16])
    config.output.add(name="y", data_type=mc.TYPE_FP32, dims=[4])
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    _write_pbtxt(model_dir, config)


def _identity_all(root: Path) -> None:
    nodes, inputs, outputs = [], [], []
    for datatype in V2_DATATYPES:
        elem = ONNX_ELEMENT_TYPE[datatype]
        dims = ["batch", f"n_{datatype}"]
        nodes.append(helper.make_node("Identity", [f"in_{datatype}"], [f"out_{datatype}"], name=f"id_{datatype}"))
        inputs.append(helper.make_tensor_value_info(f"in_{datatype}", elem, dims))
        outputs.append(helper.make_tensor_value_info(f"out_{datatype}", elem, dims))
    graph = helper.make_graph(nodes, "identity_all", inputs, outputs)
    _save(_model(graph), root / "identity_all")  # no config: auto-completed from the model


def _add_sub(root: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="add"),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="sub"),
        ],
        "add_sub",
        [
            helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 16]),
            helper.make_tensor_value_info("INPUT1", TensorProto.FLOAT, ["batch", 16]),
        ],
        [
            helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 16]),
            helper.make_tensor_value_info("OUTPUT1", TensorProto.FLOAT, ["batch", 16]),
        ],
    )
    model_dir = root / "add_sub"
    _save(_model(graph), model_dir)
    # Field names as in ModelConfig (google.protobuf.json_format.ParseDict accepts this mapping).
    config = {
        "name": "add_sub",
        "backend": "onnxruntime",
        "max_batch_size": 8,
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
    }
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _versioned(root: Path) -> None:
    model_dir = root / "versioned"
    for version in (1, 2, 3):
        graph = helper.make_graph(
            [helper.make_node("Mul", ["x", "factor"], ["y"], name="mul")],
            "versioned",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
            initializer=[numpy_helper.from_array(np.array(float(version), dtype=np.float32), "factor")],
        )
        _save(_model(graph), model_dir, version)
    config = mc.ModelConfig(name="versioned", backend="onnxruntime", max_batch_size=8)
    config.version_policy.all.SetInParent()
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[4])
    config.output.add(name="y", data_type=mc.TYPE_FP32, dims=[4])
    _write_pbtxt(model_dir, config)


#: The image classifier's classes and their reference colours (RGB in [0, 1]).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1, 0, 0),
    "green": (0, 1, 0),
    "blue": (0, 0, 1),
    "yellow": (1, 1, 0),
    "cyan": (0, 1, 1),
    "magenta": (1, 0, 1),
    "white": (1, 1, 1),
    "black": (0, 0, 0),
}
_SHARPNESS = 5.0  # softmax temperature: logits are -sharpness * squared distance to each colour


def _image_classifier(root: Path) -> None:
    # logit_k = -s * |x - p_k|^2 = s * (2 x.p_k - |p_k|^2) - s |x|^2; the last term is the same for
    # every class, so softmax ignores it and a Gemm computes the rest.
    ref = np.array(list(COLOURS.values()), dtype=np.float32)  # [K, 3]
    weight = (2 * _SHARPNESS * ref.T).astype(np.float32)  # [3, K]
    bias = (-_SHARPNESS * (ref**2).sum(axis=1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["pixels"], ["mean"], name="mean_colour"),
            helper.make_node("Flatten", ["mean"], ["rgb"], axis=1, name="flatten"),
            helper.make_node("Gemm", ["rgb", "W", "b"], ["logits"], name="score"),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
        ],
        "image_classifier",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", len(COLOURS)])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model_dir = root / "image_classifier"
    _save(_model(graph), model_dir)
    (model_dir / "labels.txt").write_text("".join(f"{name}\n" for name in COLOURS), encoding="utf-8")
    shutil.copyfile(Path(__file__).parent / "example_handlers" / "image_classifier.py", model_dir / "handler.py")
    config = mc.ModelConfig(name="image_classifier", backend="onnxruntime", max_batch_size=8)
    # What clients send and get; the handler turns these into the model's pixels/probabilities.
    config.input.add(name="image", data_type=mc.TYPE_STRING, dims=[1])
    config.output.add(name="labels", data_type=mc.TYPE_STRING, dims=[-1])
    config.dynamic_batching.max_queue_delay_microseconds = 2000
    config.parameters["top_k"].string_value = "3"
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    _write_pbtxt(model_dir, config)


#: Example model name -> builder writing ``root/<name>``.
EXAMPLE_MODELS: dict[str, Callable[[Path], None]] = {
    "simple": _simple,
    "identity_all": _identity_all,
    "add_sub": _add_sub,
    "versioned": _versioned,
    "image_classifier": _image_classifier,
}


def make_example_repository(root: Path) -> list[str]:
    """Write the example models under ``root`` (created if missing; existing files are overwritten)
    and return their names. Output is byte-for-byte the same on every call."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, build in EXAMPLE_MODELS.items():
        build(root)
        logger.info("example model '%s' written to %s", name, root / name)
    return list(EXAMPLE_MODELS)
