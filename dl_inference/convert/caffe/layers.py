"""Per-layer Caffe -> ONNX emitters, with Caffe's own shape rules.

Each emitter takes the graph builder (:class:`GraphBuilder`), the Caffe layer, and its bottoms as
``(onnx_tensor_name, caffe_shape)`` pairs, adds ONNX nodes, and returns one ``(name, shape)`` pair
per top. Shapes are tracked with the batch size the net declares; emitters never bake that batch
size into a Reshape (dim 0 is copied from the input with ONNX's ``0``) so the model also runs with
other batch sizes when the caller makes the batch dimension symbolic.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dl_inference.errors import InvalidArgument

Shape = list[int]
Tensor = tuple[str, Shape]


class GraphBuilder:
    """Collects ONNX nodes and initializers, and hands out unique tensor names."""

    def __init__(self, reserved: Sequence[str] = ()) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: set[str] = set(reserved)
        self._reserved = set(reserved)

    def claim(self, name: str) -> None:
        self._used.add(name)

    def fresh(self, hint: str) -> str:
        hint = hint or "t"
        if hint not in self._used:
            self._used.add(hint)
            return hint
        i = 1
        while f"{hint}_{i}" in self._used:
            i += 1
        name = f"{hint}_{i}"
        self._used.add(name)
        return name

    def const(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, hint: str, values: Sequence[int]) -> str:
        return self.const(hint, np.asarray(list(values), dtype=np.int64), np.int64)

    def op(self, op_type: str, inputs: Sequence[str], hint: str, n_out: int = 1, **attrs: Any) -> list[str]:
        outs = [self.fresh(hint if n_out == 1 else f"{hint}_{i}") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{hint}/{op_type}"), **attrs))
        return outs

    def op1(self, op_type: str, inputs: Sequence[str], hint: str, **attrs: Any) -> str:
        return self.op(op_type, inputs, hint, 1, **attrs)[0]


Emitter = Callable[[GraphBuilder, Any, list[Tensor]], list[Tensor]]
EMITTERS: dict[str, Emitter] = {}


def _register(*types: str) -> Callable[[Emitter], Emitter]:
    def deco(fn: Emitter) -> Emitter:
        for t in types:
            EMITTERS[t] = fn
        return fn

    return deco


# --------------------------------------------------------------------------- helpers


def _bad(layer: Any, why: str) -> InvalidArgument:
    return InvalidArgument(f"layer '{layer.name}' ({layer.type}): {why}")


def _axis(layer: Any, axis: int, rank: int) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < max(rank, 1):
        raise _bad(layer, f"axis {axis} is out of range for a blob of {rank} axes")
    return a


def _blob(layer: Any, i: int) -> np.ndarray:
    if len(layer.blobs) <= i:
        raise _bad(layer, f"needs weight blob {i} but the caffemodel gives it {len(layer.blobs)} blobs")
    return np.asarray(layer.blobs[i], dtype=np.float32)


def _has(msg: Any, field: str) -> bool:
    """proto2 presence; for plain objects (tests) a field is present when it is set and non-empty."""
    try:
        return bool(msg.HasField(field))
    except (ValueError, AttributeError):
        v = getattr(msg, field, None)
        if v is None:
            return False
        return bool(len(v)) if isinstance(v, (list, tuple)) else True


def _rep(msg: Any, field: str) -> list[Any]:
    """A field that is repeated in one Caffe message and scalar in another, as a list ([] if unset)."""
    v = getattr(msg, field, None)
    if v is None:
        return []
    if isinstance(v, (int, float)):
        return [v] if _has(msg, field) else []
    return list(v)


def _spatial(layer: Any, p: Any, base: str, n: int, default: int | None) -> list[int]:
    """kernel/pad/stride: ``<base>_h``/``<base>_w`` (2-D only), else ``<base>[_size]`` (1 or n values)."""
    if n == 2 and _has(p, f"{base}_h"):
        return [int(getattr(p, f"{base}_h")), int(getattr(p, f"{base}_w"))]
    vals = _rep(p, "kernel_size" if base == "kernel" else base)
    if not vals:
        if default is None:
            raise _bad(layer, f"{base} size is not set")
        return [default] * n
    if len(vals) == 1:
        return [int(vals[0])] * n
    if len(vals) != n:
        raise _bad(layer, f"{base} has {len(vals)} values for {n} spatial axes")
    return [int(v) for v in vals]


def _batch_safe_shape(out: Shape, in_shape: Shape) -> list[int]:
    """Reshape target that keeps the batch dimension symbolic when it is carried through."""
    target = list(out)
    if target and in_shape and target[0] == in_shape[0]:
        target[0] = 0
    return target


def _reshape(g: GraphBuilder, x: str, in_shape: Shape, out: Shape, hint: str) -> str:
    return g.op1("Reshape", [x, g.ints(f"{hint}_shape", _batch_safe_shape(out, in_shape))], hint)


def _chan_shape(c_shape: Sequence[int], rank: int, axis: int = 1) -> list[int]:
    return list(c_shape) + [1] * (rank - axis - len(c_shape))


# --------------------------------------------------------------------------- activations


@_register("ReLU")
def _relu(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    slope = float(layer.param.relu_param.negative_slope) if _has(layer.param, "relu_param") else 0.0
    if slope != 0.0:
        return [(g.op1("LeakyRelu", [x], top, alpha=slope), s)]
    return [(g.op1("Relu", [x], top), s)]


@_register("PReLU")
def _prelu(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    w = _blob(layer, 0).reshape(-1)
    if w.size == 1:
        slope = w.reshape(1)
    else:
        if len(s) < 2 or w.size != s[1]:
            raise _bad(layer, f"slope has {w.size} values for input shape {s}")
        slope = w.reshape(_chan_shape([w.size], len(s)))
    return [(g.op1("PRelu", [x, g.const(f"{layer.name}_slope", slope)], top), s)]


def _unary(op: str) -> Emitter:
    def emit(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
        (x, s) = bottoms[0]
        return [(g.op1(op, [x], layer.tops[0]), s)]

    return emit


EMITTERS["Sigmoid"] = _unary("Sigmoid")
EMITTERS["TanH"] = _unary("Tanh")
EMITTERS["AbsVal"] = _unary("Abs")
EMITTERS["BNLL"] = _unary("Softplus")


@_register("ELU")
def _elu(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s) = bottoms[0]
    alpha = float(layer.param.elu_param.alpha) if _has(layer.param, "elu_param") else 1.0
    return [(g.op1("Elu", [x], layer.tops[0], alpha=alpha), s)]


@_register("Dropout", "Split")
def _identity(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    # Caffe's dropout scales at training time, so at test time it is the identity; Split fans out.
    return [bottoms[0] for _ in layer.tops]


@_register("Power")
def _power(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    p = layer.param.power_param
    power, scale, shift = float(p.power), float(p.scale), float(p.shift)
    y = x
    if scale != 1.0:
        y = g.op1("Mul", [y, g.const(f"{layer.name}_scale", scale)], f"{top}_scaled")
    if shift != 0.0:
        y = g.op1("Add", [y, g.const(f"{layer.name}_shift", shift)], f"{top}_shifted")
    if power != 1.0:
        y = g.op1("Pow", [y, g.const(f"{layer.name}_power", power)], top)
    if y == x:
        y = g.op1("Identity", [x], top)
    return [(y, s)]


# --------------------------------------------------------------------------- convolution


def _conv_geometry(layer: Any, n: int) -> tuple[list[int], list[int], list[int], list[int]]:
    p = layer.param.convolution_param
    k = _spatial(layer, p, "kernel", n, None)
    pad = _spatial(layer, p, "pad", n, 0)
    stride = _spatial(layer, p, "stride", n, 1)
    dil = [int(v) for v in _rep(p, "dilation")] or [1]
    dil = dil * n if len(dil) == 1 else dil
    return k, pad, stride, dil


@_register("Convolution")
def _conv(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    p = layer.param.convolution_param
    n = len(s) - 2
    k, pad, stride, dil = _conv_geometry(layer, n)
    group = int(p.group) or 1
    cout = int(p.num_output)
    if s[1] % group or cout % group:
        raise _bad(layer, f"group {group} does not divide {s[1]} input / {cout} output channels")
    w = _blob(layer, 0).reshape([cout, s[1] // group, *k])
    inputs = [x, g.const(f"{layer.name}_W", w)]
    if p.bias_term:
        inputs.append(g.const(f"{layer.name}_b", _blob(layer, 1).reshape(cout)))
    y = g.op1("Conv", inputs, top, kernel_shape=k, pads=pad + pad, strides=stride, dilations=dil, group=group)
    out = [s[0], cout] + [
        (h + 2 * pp - (d * (kk - 1) + 1)) // st + 1 for h, kk, pp, st, d in zip(s[2:], k, pad, stride, dil)
    ]
    return [(y, out)]


@_register("Deconvolution")
def _deconv(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    p = layer.param.convolution_param
    n = len(s) - 2
    k, pad, stride, dil = _conv_geometry(layer, n)
    group = int(p.group) or 1
    cout = int(p.num_output)
    if s[1] % group or cout % group:
        raise _bad(layer, f"group {group} does not divide {s[1]} input / {cout} output channels")
    w = _blob(layer, 0).reshape([s[1], cout // group, *k])  # Caffe and ONNX agree: [Cin, Cout/g, k...]
    inputs = [x, g.const(f"{layer.name}_W", w)]
    if p.bias_term:
        inputs.append(g.const(f"{layer.name}_b", _blob(layer, 1).reshape(cout)))
    y = g.op1("ConvTranspose", inputs, top, kernel_shape=k, pads=pad + pad, strides=stride, dilations=dil, group=group)
    out = [s[0], cout] + [
        (h - 1) * st - 2 * pp + d * (kk - 1) + 1 for h, kk, pp, st, d in zip(s[2:], k, pad, stride, dil)
    ]
    return [(y, out)]


# --------------------------------------------------------------------------- pooling


def caffe_pool(
    g: GraphBuilder,
    layer: Any,
    x: str,
    s: Shape,
    method: str,
    k: list[int],
    pad: list[int],
    stride: list[int],
    ceil_mode: bool,
    top: str,
) -> Tensor:
    """Caffe's pooling, exactly: its output size rule, its clipping and its AVE divisor."""
    out = []
    for h, kk, pp, st in zip(s[2:], k, pad, stride):
        o = (math.ceil((h + 2 * pp - kk) / st) if ceil_mode else (h + 2 * pp - kk) // st) + 1
        out.append(o)
    if any(pad):
        out = [o - 1 if (o - 1) * st >= h + pp else o for o, h, pp, st in zip(out, s[2:], pad, stride)]
    n = len(k)
    if method == "MAX":
        # MaxPool pads never win a max; pad the end far enough to get Caffe's (clipped) last window.
        begin = list(pad)
        end = [max(0, (o - 1) * st + kk - h - pp) for o, h, kk, pp, st in zip(out, s[2:], k, pad, stride)]
        y = g.op1("MaxPool", [x], top, kernel_shape=k, strides=stride, pads=begin + end)
        got = [(h + b + e - kk) // st + 1 for h, b, e, kk, st in zip(s[2:], begin, end, k, stride)]
    else:
        # Caffe's AVE divides by the window clipped to [-pad, H + pad): explicit zero padding counts,
        # the extra end padding does not (count_include_pad=0 on the implicit pads).
        if any(pad):
            pads = [0, 0, *pad, 0, 0, *pad]
            x = g.op1("Pad", [x, g.ints(f"{layer.name}_pads", pads)], f"{top}_padded", mode="constant")
        sp = [h + 2 * pp for h, pp in zip(s[2:], pad)]
        end = [max(0, (o - 1) * st + kk - h) for o, h, kk, st in zip(out, sp, k, stride)]
        y = g.op1("AveragePool", [x], top, kernel_shape=k, strides=stride, pads=[0] * n + end, count_include_pad=0)
        got = [(h + e - kk) // st + 1 for h, e, kk, st in zip(sp, end, k, stride)]
    if got != out:  # cannot happen for Caffe-valid parameters; keep the ONNX model honest anyway
        starts = [0] * n
        y = g.op1(
            "Slice",
            [y, g.ints(f"{top}_st", starts), g.ints(f"{top}_en", out), g.ints(f"{top}_ax", range(2, 2 + n))],
            f"{top}_cropped",
        )
    return y, [s[0], s[1], *out]


@_register("Pooling")
def _pooling(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    p = layer.param.pooling_param
    method = {0: "MAX", 1: "AVE"}.get(int(p.pool))
    if method is None:
        raise _bad(layer, "only MAX and AVE pooling are supported (not STOCHASTIC)")
    n = len(s) - 2
    if p.global_pooling:
        op = "GlobalMaxPool" if method == "MAX" else "GlobalAveragePool"
        return [(g.op1(op, [x], top), [s[0], s[1]] + [1] * n)]
    k = _spatial(layer, p, "kernel", n, None)
    pad = _spatial(layer, p, "pad", n, 0)
    stride = _spatial(layer, p, "stride", n, 1)
    ceil_mode = int(getattr(p, "round_mode", 0)) == 0  # CEIL = 0, FLOOR = 1
    return [caffe_pool(g, layer, x, s, method, k, pad, stride, ceil_mode, top)]


# --------------------------------------------------------------------------- fully connected


@_register("InnerProduct")
def _inner_product(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    p = layer.param.inner_product_param
    axis = _axis(layer, int(p.axis), len(s))
    n_out = int(p.num_output)
    k = int(np.prod(s[axis:], dtype=np.int64))
    w = _blob(layer, 0)
    if w.size != n_out * k:
        raise _bad(layer, f"weights have {w.size} values, expected {n_out}x{k}")
    w_kn = w.reshape(k, n_out) if p.transpose else w.reshape(n_out, k).T
    bias = _blob(layer, 1).reshape(n_out) if p.bias_term else None
    if axis == 1:
        flat = x if len(s) == 2 else g.op1("Flatten", [x], f"{top}_flat", axis=1)
        ins = [flat, g.const(f"{layer.name}_W", np.ascontiguousarray(w_kn))]
        if bias is not None:
            ins.append(g.const(f"{layer.name}_b", bias))
        return [(g.op1("Gemm", ins, top), [s[0], n_out])]
    flat = x if axis == len(s) - 1 else _reshape(g, x, s, [*s[:axis], k], f"{top}_flat")
    y = g.op1(
        "MatMul",
        [flat, g.const(f"{layer.name}_W", np.ascontiguousarray(w_kn))],
        f"{top}_mm" if bias is not None else top,
    )
    if bias is not None:
        y = g.op1("Add", [y, g.const(f"{layer.name}_b", bias)], top)
    return [(y, [*s[:axis], n_out])]


# --------------------------------------------------------------------------- normalization


@_register("BatchNorm")
def _batch_norm(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    p = layer.param.batch_norm_param
    eps = float(p.eps)
    if _has(p, "use_global_stats") and not p.use_global_stats:
        axes = [0, *range(2, len(s))]
        bmean = g.op1("ReduceMean", [x], f"{top}_mean", axes=axes, keepdims=1)
        d = g.op1("Sub", [x, bmean], f"{top}_centered")
        bvar = g.op1("ReduceMean", [g.op1("Mul", [d, d], f"{top}_sq")], f"{top}_var", axes=axes, keepdims=1)
        std = g.op1("Sqrt", [g.op1("Add", [bvar, g.const(f"{layer.name}_eps", eps)], f"{top}_vare")], f"{top}_std")
        return [(g.op1("Div", [d, std], top), s)]
    mean = _blob(layer, 0).reshape(-1).astype(np.float64)
    var = _blob(layer, 1).reshape(-1).astype(np.float64)
    sf = float(_blob(layer, 2).reshape(-1)[0]) if len(layer.blobs) > 2 else 1.0
    f = 0.0 if sf == 0 else 1.0 / sf  # Caffe: a zero scale factor zeroes the statistics
    mean, var = mean * f, var * f
    inv = 1.0 / np.sqrt(var + eps)
    cs = _chan_shape([mean.size], len(s))
    y = g.op1("Mul", [x, g.const(f"{layer.name}_scale", inv.reshape(cs))], f"{top}_scaled")
    return [(g.op1("Add", [y, g.const(f"{layer.name}_shift", (-mean * inv).reshape(cs))], top), s)]


def _affine(g: GraphBuilder, layer: Any, bottoms: list[Tensor], is_scale: bool) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    p = layer.param.scale_param if is_scale else layer.param.bias_param
    axis = _axis(layer, int(p.axis), len(s)) if s else 0
    op = "Mul" if is_scale else "Add"
    blob_i = 0
    if len(bottoms) > 1:
        other, os_ = bottoms[1]
        trailing = len(s) - axis - len(os_)
        if trailing > 0:
            other = g.op1(
                "Unsqueeze", [other, g.ints(f"{top}_ax", range(len(os_), len(os_) + trailing))], f"{top}_param"
            )
        y = g.op1(op, [x, other], top if not (is_scale and p.bias_term) else f"{top}_scaled")
    else:
        num_axes = int(p.num_axes)
        end = len(s) if num_axes < 0 else axis + num_axes
        pshape = s[axis:end]
        val = _blob(layer, 0)
        blob_i = 1
        if val.size != int(np.prod(pshape, dtype=np.int64)):
            raise _bad(layer, f"parameter has {val.size} values for axes {pshape} of {s}")
        val = val.reshape(_chan_shape(pshape, len(s), axis)) if pshape else val.reshape(())
        y = g.op1(op, [x, g.const(f"{layer.name}_{'scale' if is_scale else 'bias'}", val)],
                  top if not (is_scale and p.bias_term) else f"{top}_scaled")  # fmt: skip
        pshape_b = pshape
    if is_scale and p.bias_term:
        if len(bottoms) > 1:
            pshape_b = bottoms[1][1]
            blob_i = 0
        b = _blob(layer, blob_i)
        b = b.reshape(_chan_shape(pshape_b, len(s), axis)) if pshape_b else b.reshape(())
        y = g.op1("Add", [y, g.const(f"{layer.name}_bias", b)], top)
    return [(y, s)]


@_register("Scale")
def _scale(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    return _affine(g, layer, bottoms, True)


@_register("Bias")
def _bias(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    return _affine(g, layer, bottoms, False)


@_register("LRN")
def _lrn(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    p = layer.param.lrn_param
    size, alpha, beta, k = int(p.local_size), float(p.alpha), float(p.beta), float(p.k)
    if size % 2 == 0:
        raise _bad(layer, "LRN only supports odd local_size")
    if int(p.norm_region) == 0:  # ACROSS_CHANNELS: k + alpha/n * sum(x^2) -- same as ONNX LRN
        return [(g.op1("LRN", [x], top, size=size, alpha=alpha, beta=beta, bias=k), s)]
    # WITHIN_CHANNEL: Caffe builds x * (1 + alpha * avgpool(x^2))^-beta (k is not used), the
    # average being its AVE pooling with pad (size-1)/2, stride 1.
    pre = (size - 1) // 2
    n = len(s) - 2
    sq = g.op1("Mul", [x, x], f"{top}_sq")
    avg, _ = caffe_pool(g, layer, sq, s, "AVE", [size] * n, [pre] * n, [1] * n, True, f"{top}_avg")
    t = g.op1("Add", [g.op1("Mul", [avg, g.const(f"{layer.name}_alpha", alpha)], f"{top}_as"),
                      g.const(f"{layer.name}_one", 1.0)], f"{top}_base")  # fmt: skip
    scale = g.op1("Pow", [t, g.const(f"{layer.name}_negbeta", -beta)], f"{top}_scale")
    return [(g.op1("Mul", [x, scale], top), s)]


@_register("Softmax")
def _softmax(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    axis = _axis(layer, int(layer.param.softmax_param.axis), len(s))
    return [(g.op1("Softmax", [x], top, axis=axis), s)]


# --------------------------------------------------------------------------- blob plumbing


@_register("Eltwise")
def _eltwise(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    top = layer.tops[0]
    p = layer.param.eltwise_param
    op = int(p.operation)  # PROD = 0, SUM = 1, MAX = 2
    names = [b[0] for b in bottoms]
    s = bottoms[0][1]
    if op == 0:
        y = names[0]
        for i, n in enumerate(names[1:]):
            y = g.op1("Mul", [y, n], top if i == len(names) - 2 else f"{top}_p{i}")
        return [(y, s)]
    if op == 2:
        return [(g.op1("Max", names, top), s)]
    coeff = [float(c) for c in p.coeff]
    if coeff and len(coeff) != len(names):
        raise _bad(layer, f"{len(coeff)} coefficients for {len(names)} bottoms")
    if coeff and any(c != 1.0 for c in coeff):
        names = [
            n if c == 1.0 else g.op1("Mul", [n, g.const(f"{layer.name}_c{i}", c)], f"{top}_c{i}")
            for i, (n, c) in enumerate(zip(names, coeff))
        ]
    return [(g.op1("Sum", names, top), s)]


@_register("Concat")
def _concat(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    p = layer.param.concat_param
    s = bottoms[0][1]
    axis = int(p.concat_dim) if _has(p, "concat_dim") else int(p.axis)
    axis = _axis(layer, axis, len(s))
    out = list(s)
    out[axis] = sum(b[1][axis] for b in bottoms)
    if len(bottoms) == 1:
        return [(bottoms[0][0], out)]
    return [(g.op1("Concat", [b[0] for b in bottoms], layer.tops[0], axis=axis), out)]


@_register("Slice")
def _slice(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s) = bottoms[0]
    p = layer.param.slice_param
    axis = int(p.slice_dim) if _has(p, "slice_dim") else int(p.axis)
    axis = _axis(layer, axis, len(s))
    n_top = len(layer.tops)
    points = [int(v) for v in p.slice_point]
    if points:
        if len(points) != n_top - 1:
            raise _bad(layer, f"{len(points)} slice points for {n_top} tops")
        bounds = [0, *points, s[axis]]
        sizes = [b - a for a, b in itertools.pairwise(bounds)]
    else:
        if s[axis] % n_top:
            raise _bad(layer, f"cannot split {s[axis]} evenly into {n_top} tops")
        sizes = [s[axis] // n_top] * n_top
    if any(v <= 0 for v in sizes):
        raise _bad(layer, f"slice sizes {sizes} must be positive")
    outs = g.op("Split", [x, g.ints(f"{layer.name}_split", sizes)], layer.name, n_out=n_top, axis=axis)
    res = []
    for name, size in zip(outs, sizes):
        sh = list(s)
        sh[axis] = size
        res.append((name, sh))
    return res


@_register("Flatten")
def _flatten(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    p = layer.param.flatten_param
    axis = _axis(layer, int(p.axis), len(s))
    end = _axis(layer, int(p.end_axis), len(s))
    out = [*s[:axis], int(np.prod(s[axis : end + 1], dtype=np.int64)), *s[end + 1 :]]
    return [(_reshape(g, x, s, out, top), out)]


@_register("Reshape")
def _reshape_layer(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    p = layer.param.reshape_param
    dims = [int(d) for d in p.shape.dim]
    axis = int(p.axis)
    axis = axis + len(s) + 1 if axis < 0 else axis
    num_axes = int(p.num_axes)
    end = len(s) if num_axes == -1 else axis + num_axes
    if not 0 <= axis <= end <= len(s):
        raise _bad(layer, f"axis {p.axis} / num_axes {num_axes} do not fit a blob of {len(s)} axes")
    mid: list[int] = []
    for i, d in enumerate(dims):
        if d == 0:
            if axis + i >= len(s):
                raise _bad(layer, f"dim {i} copies axis {axis + i}, which the input lacks")
            mid.append(s[axis + i])
        else:
            mid.append(d)
    out = s[:axis] + mid + s[end:]
    total = int(np.prod(s, dtype=np.int64))
    if mid.count(-1) > 1:
        raise _bad(layer, "more than one -1 in the shape")
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        if known == 0 or total % known:
            raise _bad(layer, f"cannot reshape {s} to {dims}")
        out[out.index(-1)] = total // known
    if int(np.prod(out, dtype=np.int64)) != total:
        raise _bad(layer, f"cannot reshape {s} ({total} values) to {out}")
    return [(_reshape(g, x, s, out, top), out)]


@_register("Crop")
def _crop(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    if len(bottoms) != 2:
        raise _bad(layer, "needs 2 bottoms (blob to crop, reference blob)")
    ref = bottoms[1][1]
    p = layer.param.crop_param
    axis = _axis(layer, int(p.axis), len(s))
    axes = list(range(axis, len(s)))
    offs = [int(v) for v in p.offset]
    if not offs:
        offs = [0] * len(axes)
    elif len(offs) == 1:
        offs = offs * len(axes)
    elif len(offs) != len(axes):
        raise _bad(layer, f"{len(offs)} offsets for {len(axes)} cropped axes")
    ends = [o + ref[a] for o, a in zip(offs, axes)]
    if any(e > s[a] for e, a in zip(ends, axes)):
        raise _bad(layer, f"crop to {ref} at offsets {offs} goes beyond {s}")
    out = s[:axis] + [ref[a] for a in axes]
    y = g.op1("Slice", [x, g.ints(f"{top}_st", offs), g.ints(f"{top}_en", ends), g.ints(f"{top}_ax", axes)], top)
    return [(y, out)]


@_register("Permute")
def _permute(g: GraphBuilder, layer: Any, bottoms: list[Tensor]) -> list[Tensor]:
    (x, s), top = bottoms[0], layer.tops[0]
    order = [int(o) for o in layer.param.permute_param.order]
    perm: list[int] = []
    for o in order:
        o = _axis(layer, o, len(s))
        if o in perm:
            raise _bad(layer, f"axis {o} appears twice in order {order}")
        perm.append(o)
    perm += [a for a in range(len(s)) if a not in perm]
    if perm == list(range(len(s))):
        return [(x, s)]
    return [(g.op1("Transpose", [x], top, perm=perm), [s[a] for a in perm])]


SUPPORTED: tuple[str, ...] = ("Input", *sorted(EMITTERS))


def supported_types() -> tuple[str, ...]:
    return SUPPORTED


def float_type() -> int:
    return TensorProto.FLOAT
