"""Small ONNX models built in tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def write_model(model_dir: Path, graph: onnx.GraphProto, version: int = 1, config: str | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    path = model_dir / str(version) / "model.onnx"
    onnx.save(model, str(path))
    if config is not None:
        (model_dir / "config.pbtxt").write_text(config)
    return path


def slow_model(model_dir: Path, instances: int, layers: int = 24, width: int = 512) -> None:
    """x FP32 [-1, width] -> y: a chain of MatMul+Tanh, slow enough to have requests in flight."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        out = "y" if i == layers - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", width])],
        inits,
    )
    config = f'name: "{model_dir.name}"\nmax_batch_size: 64\ninstance_group [{{ count: {instances} kind: KIND_CPU }}]\n'
    write_model(model_dir, graph, config=config)


def scale_model(model_dir: Path, factor: float, version: int = 1) -> None:
    """x FP32 [-1, 4] -> y = x * factor."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        [numpy_helper.from_array(np.array(factor, np.float32), "k")],
    )
    write_model(model_dir, graph, version=version)


def looping_model(model_dir: Path, config: str, iterations: int = 200, width: int = 512) -> None:
    """x FP32 [-1, width] -> y: ``iterations`` rounds of Tanh(MatMul(y, W)) in an ONNX Loop.

    Slow on purpose (about 1 ms per row per 30 rounds here) with a small file: tests that need a
    request to stay running while others queue behind it use it.
    """
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["y_in", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["y_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_in", TensorProto.FLOAT, ["b", width]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_out", TensorProto.FLOAT, ["b", width]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body)],
        "looping",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", width])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(iterations, np.int64), "trip"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    write_model(model_dir, graph, config=config)
