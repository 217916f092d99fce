"""Benchmark models, built with the onnx helper API (no downloads, fixed seed).

:func:`make_resnet_like` writes a small ResNet-18-shaped CNN, the model the dynamic batching
benchmark (``load_tests.bench_batching``) serves: enough work per image (milliseconds, not
microseconds) that batching requests can pay off, small enough to run on a 2-core CPU box.

:func:`write_model_repo` writes one model of a model repository around it: ``root/name/1/model.onnx``
and a Triton ``config.pbtxt`` with or without ``dynamic_batching``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from dl_inference.examples import IR_VERSION, OPSET
from dl_inference.protocol.generated import model_config_pb2 as mc

__all__ = ["INPUT", "NUM_CLASSES", "OUTPUT", "make_resnet_like", "resnet_like_model", "write_model_repo"]

INPUT = "image"
OUTPUT = "logits"
NUM_CLASSES = 10
STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2


class _Builder:
    """Collects nodes and initializers; He-initialized weights from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def _const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, x: str, name: str, c_in: int, c_out: int, kernel: int, stride: int, scale: float = 1.0) -> str:
        """Conv with bias (a BatchNorm folded into it): He-normal weights, small random bias."""
        fan_in = c_in * kernel * kernel
        w = self.rng.standard_normal((c_out, c_in, kernel, kernel)) * (np.sqrt(2.0 / fan_in) * scale)
        b = self.rng.standard_normal(c_out) * 0.01
        pad = kernel // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self._const(f"{name}.w", w), self._const(f"{name}.b", b)],
                [name],
                name=name,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )
        )
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def basic_block(self, x: str, name: str, c_in: int, c_out: int, stride: int) -> str:
        """conv3x3-Relu-conv3x3, plus identity (or 1x1 stride-s projection), Add, Relu."""
        h = self.op("Relu", [self.conv(x, f"{name}.conv1", c_in, c_out, 3, stride)], f"{name}.relu1")
        # The residual branch's last conv is scaled down (as a folded BN with a small gamma would be)
        # so activations stay O(1) through the eight blocks instead of doubling in variance per block.
        h = self.conv(h, f"{name}.conv2", c_out, c_out, 3, 1, scale=0.5)
        shortcut = x
        if stride != 1 or c_in != c_out:
            shortcut = self.conv(x, f"{name}.proj", c_in, c_out, 1, stride, scale=0.5)
        return self.op("Relu", [self.op("Add", [h, shortcut], f"{name}.add")], f"{name}.out")


def resnet_like_model(image: int = 64, width: int = 32, seed: int = 0) -> onnx.ModelProto:
    """The CNN of :func:`make_resnet_like` as a checked ``onnx.ModelProto``."""
    if image < 8 or width < 1:
        raise ValueError(f"image must be >= 8 and width >= 1, got image={image} width={width}")
    b = _Builder(seed)
    x = b.op("Relu", [b.conv(INPUT, "stem.conv", 3, width, 3, 1)], "stem.relu")
    c_in = width
    for stage, stride in enumerate(STAGE_STRIDES):
        c_out = width * 2**stage
        for block in range(BLOCKS_PER_STAGE):
            x = b.basic_block(x, f"s{stage + 1}.b{block + 1}", c_in, c_out, stride if block == 0 else 1)
            c_in = c_out
    pooled = b.op("GlobalAveragePool", [x], "pool")
    flat = b.op("Flatten", [pooled], "flatten", axis=1)
    fc_w = b.rng.standard_normal((c_in, NUM_CLASSES)) * np.sqrt(1.0 / c_in)
    fc_b = b.rng.standard_normal(NUM_CLASSES) * 0.01
    b.nodes.append(
        helper.make_node("Gemm", [flat, b._const("fc.w", fc_w), b._const("fc.b", fc_b)], [OUTPUT], name="fc")
    )
    graph = helper.make_graph(
        b.nodes,
        "resnet_like",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, image, image])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="load_tests.models")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def make_resnet_like(path: Path, image: int = 64, width: int = 32, seed: int = 0) -> None:
    """Write a ResNet-18-like CNN as ONNX (opset 17) to ``path``.

    Input ``image`` FP32 [-1,3,image,image] (dynamic batch) -> output ``logits`` FP32 [-1,10].
    Stem conv3x3 + Relu; four stages of two basic residual blocks (conv3x3-Relu-conv3x3, identity
    or 1x1 stride-2 projection shortcut, Add, Relu) with ``width``, 2, 4 and 8 x ``width`` channels
    and strides 1, 2, 2, 2; GlobalAveragePool, Flatten, Gemm to 10 classes. BatchNorm is taken as
    folded into the convs (Conv with bias). Weights are He-normal from ``seed``: the same arguments
    give the same file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(resnet_like_model(image, width, seed).SerializeToString())


def write_model_repo(
    root: Path,
    name: str,
    batching: bool,
    max_batch_size: int = 32,
    delay_us: int = 2000,
    instances: int = 1,
    preferred: list[int] | None = None,
    *,
    image: int = 64,
    width: int = 32,
    seed: int = 0,
) -> None:
    """Write ``root/name/1/model.onnx`` (:func:`make_resnet_like`) and ``root/name/config.pbtxt``.

    The config: backend onnxruntime, ``max_batch_size``, input ``image`` [3,image,image] and output
    ``logits`` [10] (FP32), ``instance_group [{count: instances, kind: KIND_CPU}]``, and when
    ``batching`` is true ``dynamic_batching { max_queue_delay_microseconds: delay_us }`` with
    ``preferred_batch_size`` when ``preferred`` lists sizes.
    """
    model_dir = Path(root) / name
    make_resnet_like(model_dir / "1" / "model.onnx", image=image, width=width, seed=seed)
    config = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size)
    config.input.add(name=INPUT, data_type=mc.TYPE_FP32, dims=[3, image, image])
    config.output.add(name=OUTPUT, data_type=mc.TYPE_FP32, dims=[NUM_CLASSES])
    config.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    if batching:
        config.dynamic_batching.SetInParent()  # present even when every field is left at 0
        config.dynamic_batching.max_queue_delay_microseconds = delay_us
        config.dynamic_batching.preferred_batch_size.extend(preferred or [])
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
