"""Caffe-style input pre-processing folded into the converted ONNX graph.

Caffe deploy nets expect inputs already transformed (channel order, mean subtraction, scale), work
that dl_inference's PyTorch/Caffe services used to do in hand-written code. Here it is part of the
model: the input keeps its name and shape, and the graph first computes
``y = (x[:, channel_swap] - mean) * scale`` (NCHW), the order pycaffe's Transformer applies them.

Configured per model with ``parameters`` in its config: ``caffe_channel_swap`` ("2,1,0" turns RGB
input into the BGR a Caffe net was trained on), ``caffe_mean`` (one value per channel, or one for
all), ``caffe_scale`` (one number), and optionally ``caffe_preprocess_input`` (which input; default
the first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dl_inference.errors import InvalidArgument
from dl_inference.protocol.generated import model_config_pb2 as mc


@dataclass(frozen=True)
class Preprocess:
    input: str | None = None
    channel_swap: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    scale: float | None = None

    @property
    def empty(self) -> bool:
        return self.channel_swap is None and self.mean is None and self.scale is None


def _floats(model: str, key: str, raw: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in raw.replace(" ", "").split(",") if v)
    except ValueError:
        raise InvalidArgument(
            f"model '{model}': parameter '{key}' must be comma-separated numbers, got '{raw}'"
        ) from None


def preprocess_from_config(config: mc.ModelConfig) -> Preprocess:
    params = {k: v.string_value for k, v in config.parameters.items()}
    swap = mean = None
    scale = None
    if "caffe_channel_swap" in params:
        values = _floats(config.name, "caffe_channel_swap", params["caffe_channel_swap"])
        swap = tuple(int(v) for v in values)
        if sorted(swap) != list(range(len(swap))):
            raise InvalidArgument(
                f"model '{config.name}': caffe_channel_swap must be a permutation of 0..{len(swap) - 1}, got {swap}"
            )
    if "caffe_mean" in params:
        mean = _floats(config.name, "caffe_mean", params["caffe_mean"])
    if "caffe_scale" in params:
        (scale,) = _floats(config.name, "caffe_scale", params["caffe_scale"]) or (1.0,)
    return Preprocess(params.get("caffe_preprocess_input") or None, swap, mean, scale)


def apply_preprocess(model: onnx.ModelProto, pre: Preprocess) -> onnx.ModelProto:
    """Prepend ``pre`` to the graph's chosen input (NCHW); the input's name and shape are kept."""
    if pre.empty:
        return model
    graph = model.graph
    initializer_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names]
    target = next((i for i in inputs if i.name == pre.input), None) if pre.input else (inputs[0] if inputs else None)
    if target is None:
        raise InvalidArgument(f"pre-processing input '{pre.input}' is not an input of the converted model")
    dims = target.type.tensor_type.shape.dim
    channels = dims[1].dim_value if len(dims) > 1 and dims[1].HasField("dim_value") else None
    for label, values in (("caffe_channel_swap", pre.channel_swap), ("caffe_mean", pre.mean)):
        if values is not None and channels is not None and len(values) not in (1, channels):
            raise InvalidArgument(f"{label} has {len(values)} values but input '{target.name}' has {channels} channels")
    raw = target.name
    inner = f"{raw}__caffe_preprocessed"
    for node in graph.node:
        node.input[:] = [inner if name == raw else name for name in node.input]
    for out in graph.output:
        if out.name == raw:
            raise InvalidArgument(f"input '{raw}' is also a model output; cannot pre-process it")
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = raw
    step = 0

    def next_name() -> str:
        nonlocal step
        step += 1
        return f"{raw}__caffe_pre{step}"

    if pre.channel_swap is not None:
        inits.append(numpy_helper.from_array(np.array(pre.channel_swap, np.int64), f"{raw}__caffe_swap"))
        out = next_name()
        nodes.append(helper.make_node("Gather", [current, f"{raw}__caffe_swap"], [out], axis=1))
        current = out
    if pre.mean is not None:
        mean = np.array(pre.mean, np.float32).reshape(1, -1, 1, 1)
        inits.append(numpy_helper.from_array(mean, f"{raw}__caffe_mean"))
        out = next_name()
        nodes.append(helper.make_node("Sub", [current, f"{raw}__caffe_mean"], [out]))
        current = out
    if pre.scale is not None:
        inits.append(numpy_helper.from_array(np.array(pre.scale, np.float32), f"{raw}__caffe_scale"))
        out = next_name()
        nodes.append(helper.make_node("Mul", [current, f"{raw}__caffe_scale"], [out]))
        current = out
    nodes.append(helper.make_node("Identity", [current], [inner]))
    new_nodes = nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(inits)
    return model
