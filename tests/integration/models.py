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
    config = (
        f'name: "{model_dir.name}"\nmax_batch_size: 64\n'
        f"instance_group [{{ count: {instances} kind: KIND_CPU }}]\n"
    )
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
