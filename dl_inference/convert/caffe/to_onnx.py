"""Caffe net (from :mod:`dl_inference.convert.caffe.loader`) -> ONNX model with Caffe's exact outputs.

    model = convert_net(load_net(prototxt, caffemodel))           # onnx.ModelProto
    convert_caffe(prototxt, caffemodel, "model.onnx")               # load, convert, check, save

Graph inputs and outputs keep the Caffe blob names. With ``dynamic_batch`` the batch dimension of
inputs and outputs is symbolic (``batch``) and no Reshape/Flatten bakes the declared batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from dl_inference.convert.caffe.layers import EMITTERS, SUPPORTED, GraphBuilder, Shape, Tensor
from dl_inference.errors import InvalidArgument

BATCH_DIM = "batch"
IR_VERSION = 8  # enough for opset 17, and loadable by older onnxruntime builds


def _value_info(name: str, shape: Sequence[int], symbolic_batch: bool) -> onnx.ValueInfoProto:
    dims: list[Any] = list(shape)
    if symbolic_batch and dims:
        dims[0] = BATCH_DIM
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _input_layer_shapes(layer: Any) -> list[Shape]:
    shapes = [[int(d) for d in bs.dim] for bs in layer.param.input_param.shape]
    if len(shapes) == 1 and len(layer.tops) > 1:
        shapes = shapes * len(layer.tops)
    if len(shapes) != len(layer.tops):
        raise InvalidArgument(f"layer '{layer.name}' (Input): {len(shapes)} shapes for {len(layer.tops)} tops")
    return shapes


def convert_net(net: Any, dynamic_batch: bool = True, opset: int = 17) -> onnx.ModelProto:
    """Convert a loaded :class:`CaffeNet` into an ONNX model (checked with ``onnx.checker``)."""
    if opset < 13:
        raise InvalidArgument(f"opset {opset} is too old for the Caffe converter (13 or newer)")
    declared_outputs = list(net.outputs)
    g = GraphBuilder(reserved=declared_outputs)
    blobs: dict[str, Tensor] = {}
    inputs: list[tuple[str, Shape]] = []

    def add_input(name: str, shape: Sequence[int]) -> None:
        if name in blobs:
            return
        g.claim(name)
        inputs.append((name, [int(d) for d in shape]))
        blobs[name] = (name, [int(d) for d in shape])

    for name, shape in net.inputs:
        add_input(name, shape)

    consumed: set[str] = set()
    produced: list[str] = []
    for layer in net.layers:
        if layer.type == "Input":
            for top, shape in zip(layer.tops, _input_layer_shapes(layer)):
                add_input(top, shape)
            continue
        emit = EMITTERS.get(layer.type)
        if emit is None:
            raise InvalidArgument(
                f"layer '{layer.name}' has type '{layer.type}', which the converter does not support "
                f"(supported: {', '.join(SUPPORTED)})"
            )
        missing = [b for b in layer.bottoms if b not in blobs]
        if missing:
            raise InvalidArgument(f"layer '{layer.name}' ({layer.type}) reads blob(s) {missing} that nothing produces")
        bottoms = [blobs[b] for b in layer.bottoms]
        consumed.update(layer.bottoms)
        outs = emit(g, layer, bottoms)
        if len(outs) != len(layer.tops):
            raise InvalidArgument(
                f"layer '{layer.name}' ({layer.type}) has {len(layer.tops)} tops, expected {len(outs)}"
            )
        for top, t in zip(layer.tops, outs):
            blobs[top] = t
            produced.append(top)

    outputs = declared_outputs or [t for t in dict.fromkeys(produced) if t not in consumed]
    if not outputs:
        raise InvalidArgument(f"net '{net.name}' has no output blob")
    batches = {shape[0] for _, shape in inputs if shape}
    graph_inputs = {name for name, _ in inputs}
    init_names = {i.name for i in g.initializers}
    out_infos = []
    renamed: set[str] = set()
    for out in outputs:
        if out not in blobs:
            raise InvalidArgument(f"net '{net.name}' declares output '{out}', which no layer produces")
        tensor, shape = blobs[out]
        if tensor != out:
            if tensor in graph_inputs or tensor in init_names or tensor in renamed:
                g.nodes.append(helper.make_node("Identity", [tensor], [out], name=g.fresh(f"{out}/Identity")))
            else:
                for node in g.nodes:
                    node.input[:] = [out if i == tensor else i for i in node.input]
                    node.output[:] = [out if o == tensor else o for o in node.output]
                for key, (name, shp) in list(blobs.items()):
                    if name == tensor:
                        blobs[key] = (out, shp)
                renamed.add(out)
        out_infos.append(_value_info(out, shape, dynamic_batch and bool(shape) and shape[0] in batches))

    graph = helper.make_graph(
        g.nodes,
        net.name or "caffe_net",
        [_value_info(n, s, dynamic_batch) for n, s in inputs],
        out_infos,
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="dl_inference.convert.caffe",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model)
    return model


def convert_caffe(
    prototxt: str | Path,
    caffemodel: str | Path | None,
    output_path: str | Path | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
) -> onnx.ModelProto:
    """Load a Caffe deploy prototxt (+ weights), convert it, and save it to ``output_path`` if given."""
    from dl_inference.convert.caffe.loader import load_net

    net = load_net(Path(prototxt), Path(caffemodel) if caffemodel else None)
    model = convert_net(net, dynamic_batch=dynamic_batch, opset=opset)
    if output_path is not None:
        out = Path(output_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(out))
    return model
