"""Caffe -> ONNX converter: hand-built layers against NumPy references of Caffe's own code, and every
real model in /work/shared/caffe against the outputs of real BVLC Caffe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from dl_inference.convert.caffe.loader import CaffeLayer, CaffeNet, load_net
from dl_inference.convert.caffe.to_onnx import convert_caffe, convert_net
from dl_inference.errors import InvalidArgument
from dl_inference.protocol.generated import caffe_pb2
from tests.samples import CAFFE_SAMPLES, CAFFE_SKIP_REASON

SHARED = CAFFE_SAMPLES


def _layer(name: str, type_: str, bottoms: list[str], tops: list[str], text: str = "", blobs=()) -> CaffeLayer:
    param = caffe_pb2.LayerParameter(name=name, type=type_, bottom=bottoms, top=tops)
    text_format.Parse(text, param)
    return CaffeLayer(name, type_, list(bottoms), list(tops), param, [np.asarray(b, np.float32) for b in blobs])


def _run(layers: list[CaffeLayer], inputs: dict[str, np.ndarray], outputs: list[str], **kw) -> dict[str, np.ndarray]:
    net = CaffeNet("t", [(k, list(v.shape)) for k, v in inputs.items()], layers, outputs)
    model = convert_net(net, **kw)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))


def _one(type_: str, x: np.ndarray, text: str = "", blobs=()) -> np.ndarray:
    return _run([_layer("op", type_, ["data"], ["out"], text, blobs)], {"data": x}, ["out"])["out"]


RNG = np.random.default_rng(0)


def _x(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- pooling, Caffe's loop


def _caffe_pool(x: np.ndarray, method: str, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, ceil: bool):
    n, c, h, w = x.shape
    rnd = math.ceil if ceil else math.floor
    oh = int(rnd((h + 2 * ph - kh) / sh)) + 1
    ow = int(rnd((w + 2 * pw - kw) / sw)) + 1
    if ph or pw:
        oh -= (oh - 1) * sh >= h + ph
        ow -= (ow - 1) * sw >= w + pw
    y = np.zeros((n, c, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            if method == "MAX":
                he, we = min(hs + kh, h), min(ws + kw, w)
                hs, ws = max(hs, 0), max(ws, 0)
                y[:, :, i, j] = x[:, :, hs:he, ws:we].max(axis=(2, 3))
            else:
                he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                y[:, :, i, j] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / size
    return y


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize(
    "hw,k,s,p,floor",
    [
        ((7, 7), (3, 3), (2, 2), (1, 1), False),
        ((10, 9), (3, 3), (2, 2), (0, 0), False),
        ((8, 8), (2, 2), (2, 2), (0, 0), False),
        ((9, 10), (3, 3), (3, 3), (1, 1), False),
        ((6, 6), (3, 3), (1, 1), (1, 1), False),
        ((11, 12), (5, 5), (3, 3), (2, 2), False),
        ((11, 12), (5, 5), (3, 3), (2, 2), True),
        ((10, 10), (3, 3), (2, 2), (0, 0), True),
        ((9, 13), (3, 2), (2, 1), (1, 0), False),
        ((12, 7), (4, 2), (3, 2), (1, 1), True),
    ],
)
def test_pooling_matches_caffe_loop(method, hw, k, s, p, floor) -> None:
    x = _x(2, 3, *hw)
    text = (
        f"pooling_param {{ pool: {method} kernel_h: {k[0]} kernel_w: {k[1]} stride_h: {s[0]} stride_w: {s[1]}"
        f" pad_h: {p[0]} pad_w: {p[1]} {'round_mode: FLOOR' if floor else ''} }}"
    )
    y = _one("Pooling", x, text)
    ref = _caffe_pool(x, method, *k, *s, *p, ceil=not floor)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_global_pooling() -> None:
    x = _x(2, 3, 5, 7)
    np.testing.assert_allclose(_one("Pooling", x, "pooling_param { pool: MAX global_pooling: true }"),
                               x.max(axis=(2, 3), keepdims=True))  # fmt: skip


# --------------------------------------------------------------------------- other layers


def test_inner_product_axis2_and_transpose() -> None:
    x = _x(2, 3, 4, 5)
    w = _x(6, 20)
    b = _x(6)
    y = _one("InnerProduct", x, "inner_product_param { num_output: 6 axis: 2 }", [w, b])
    np.testing.assert_allclose(y, x.reshape(2, 3, 20) @ w.T + b, rtol=1e-5, atol=1e-5)
    wt = _x(60, 6)
    y = _one("InnerProduct", x, "inner_product_param { num_output: 6 transpose: true bias_term: false }",
             [wt.reshape(1, 1, 60, 6)])  # fmt: skip
    np.testing.assert_allclose(y, x.reshape(2, 60) @ wt, rtol=1e-5, atol=1e-5)


def test_batch_norm_statistics_and_batch_stats() -> None:
    x = _x(2, 3, 4, 4)
    mean, var = _x(3), np.abs(_x(3)) + 0.5
    y = _one("BatchNorm", x, "batch_norm_param { eps: 0.01 }", [mean * 4, var * 4, [4.0]])
    ref = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 0.01)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    y = _one("BatchNorm", x, "batch_norm_param { use_global_stats: false }", [mean, var, [1.0]])
    m = x.mean(axis=(0, 2, 3), keepdims=True)
    ref = (x - m) / np.sqrt(((x - m) ** 2).mean(axis=(0, 2, 3), keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_scale_two_bottoms_axis0_and_bias_layer() -> None:
    x, f = _x(2, 3, 4, 5), _x(2, 3)
    layers = [_layer("op", "Scale", ["data", "f"], ["out"], "scale_param { axis: 0 }")]
    y = _run(layers, {"data": x, "f": f}, ["out"], dynamic_batch=False)["out"]
    np.testing.assert_allclose(y, x * f[:, :, None, None], rtol=1e-6)
    b = _x(4, 5)
    y = _one("Bias", x, "bias_param { axis: 2 num_axes: 2 }", [b])
    np.testing.assert_allclose(y, x + b, rtol=1e-6)
    s = _x(3)
    y = _one("Scale", x, "scale_param { bias_term: true }", [s, b[0, :3]])
    np.testing.assert_allclose(y, x * s[:, None, None] + b[0, :3, None, None], rtol=1e-5, atol=1e-6)


def test_power_permute_crop_concat_slice() -> None:
    x = np.abs(_x(2, 3, 4, 5)) + 0.1
    np.testing.assert_allclose(_one("Power", x, "power_param { power: 1.5 scale: 2 shift: 0.5 }"),
                               (0.5 + 2 * x) ** 1.5, rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(_one("Permute", x, "permute_param { order: 0 order: 3 }"), x.transpose(0, 3, 1, 2))
    ref = _x(2, 3, 2, 3)
    layers = [_layer("op", "Crop", ["data", "ref"], ["out"], "crop_param { axis: 2 offset: 1 offset: 2 }")]
    y = _run(layers, {"data": x, "ref": ref}, ["out"])["out"]
    np.testing.assert_array_equal(y, x[:, :, 1:3, 2:5])
    layers = [
        _layer("s", "Slice", ["data"], ["a", "b", "c"], "slice_param { slice_dim: 3 slice_point: 1 slice_point: 3 }"),
        _layer("cat", "Concat", ["c", "a"], ["out"], "concat_param { concat_dim: 3 }"),
        _layer("s2", "Slice", ["data"], ["e0", "e1", "e2"], "slice_param { axis: 1 }"),
    ]
    got = _run(layers, {"data": x}, ["out", "b", "e2"])
    np.testing.assert_array_equal(got["out"], np.concatenate([x[..., 3:], x[..., :1]], axis=3))
    np.testing.assert_array_equal(got["b"], x[..., 1:3])
    np.testing.assert_array_equal(got["e2"], x[:, 2:3])


def test_reshape_axis_num_axes_and_dynamic_batch() -> None:
    x = _x(2, 3, 4, 5)
    y = _one("Reshape", x, "reshape_param { shape { dim: 2 dim: -1 } axis: 2 num_axes: 1 }")
    np.testing.assert_array_equal(y, x.reshape(2, 3, 2, 2, 5))
    layers = [
        _layer("r", "Reshape", ["data"], ["r"], "reshape_param { shape { dim: 2 dim: -1 dim: 5 } }"),
        _layer("f", "Flatten", ["r"], ["out"]),
    ]
    net = CaffeNet("t", [("data", [2, 3, 4, 5])], layers, ["out"])
    sess = ort.InferenceSession(convert_net(net).SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch" and sess.get_outputs()[0].shape == ["batch", 60]
    x5 = _x(5, 3, 4, 5)
    np.testing.assert_array_equal(sess.run(None, {"data": x5})[0], x5.reshape(5, 60))
    fixed = convert_net(net, dynamic_batch=False)
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 4, 5]


def test_in_place_layers_split_and_eltwise() -> None:
    x = _x(1, 3, 4, 4)
    layers = [
        _layer("relu", "ReLU", ["data"], ["data"], "relu_param { negative_slope: 0.2 }"),
        _layer("sp", "Split", ["data"], ["a", "b"]),
        _layer("sig", "Sigmoid", ["a"], ["a"]),
        _layer(
            "e", "Eltwise", ["a", "b", "b"], ["out"], "eltwise_param { operation: SUM coeff: 1 coeff: 2 coeff: -1 }"
        ),
        _layer("m", "Eltwise", ["a", "b"], ["mx"], "eltwise_param { operation: MAX }"),
    ]
    got = _run(layers, {"data": x}, ["out", "mx"])
    r = np.where(x > 0, x, 0.2 * x)
    s = 1 / (1 + np.exp(-r))
    np.testing.assert_allclose(got["out"], s + r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["mx"], np.maximum(s, r), rtol=1e-6)


def test_unsupported_layer_is_named() -> None:
    with pytest.raises(InvalidArgument, match=r"layer 'op' has type 'PriorBox', which the converter does not support"):
        _one("PriorBox", _x(1, 3, 4, 4))


# --------------------------------------------------------------------------- real models vs real Caffe


def _real_cases() -> list:
    if not SHARED.is_dir():
        return []
    pairs: dict[Path, Path] = {}
    inv = SHARED / "inventory.json"
    if inv.exists():
        for weights, info in json.loads(inv.read_text()).items():
            pairs[SHARED / weights] = SHARED / info["prototxt"]
    for proto in SHARED.rglob("*.prototxt"):
        weights = proto.with_suffix(".caffemodel")
        if weights.exists():
            pairs.setdefault(weights, proto)
    cases = []
    for weights, proto in sorted(pairs.items()):
        name = str(weights.relative_to(SHARED))
        inputs = [p for p in (Path(f"{weights}.cv2_input_seed0.npy"), Path(f"{weights}.input.npy")) if p.exists()]
        if not inputs:
            continue
        golden = {}
        for g in weights.parent.glob(f"{weights.name}.caffe_*.npy"):
            blob = g.name[len(weights.name) + len(".caffe_") : -len(".npy")]
            golden[blob.removesuffix("_seed0")] = g
        if golden:
            cases.append(pytest.param(proto, weights, inputs[0], golden, id=name))
    return cases


def _compare(got: dict[str, np.ndarray], golden: dict[str, np.ndarray]) -> None:
    failures = []
    for blob, ref in golden.items():
        assert blob in got, f"no output '{blob}' (outputs: {sorted(got)})"
        y = got[blob]
        assert y.shape == ref.shape, f"{blob}: shape {y.shape} vs golden {ref.shape}"
        diff = float(np.abs(y.astype(np.float64) - ref).max())
        tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
        if diff > tol:
            failures.append(f"{blob}: max abs diff {diff:.3g} > {tol:.3g}")
    assert not failures, "; ".join(failures)


REAL = _real_cases()


@pytest.mark.skipif(not REAL, reason=CAFFE_SKIP_REASON)
@pytest.mark.parametrize("proto,weights,input_path,golden", REAL)
def test_real_model_matches_caffe(proto: Path, weights: Path, input_path: Path, golden: dict, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    convert_caffe(proto, weights, out)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(input_path)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))
    _compare(got, {blob: np.load(p) for blob, p in golden.items()})


ULTRAFACE = SHARED / "ultraface_rfb320"


@pytest.mark.skipif(not (ULTRAFACE / "RFB-320.caffemodel").exists(), reason="ultraface data missing")
def test_ultraface_matches_opencv_and_runs_batched() -> None:
    # No real-Caffe golden for this SSD-fork model; OpenCV agrees with Caffe to ~1e-6 on its layers.
    net = load_net(ULTRAFACE / "RFB-320.prototxt", ULTRAFACE / "RFB-320.caffemodel")
    sess = ort.InferenceSession(convert_net(net).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.load(ULTRAFACE / "RFB-320.caffemodel.cv2_input_seed0.npy")
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"input": x})))
    ref = np.load(ULTRAFACE / "RFB-320.caffemodel.cv2_outputs_seed0.npz")
    _compare(got, {k: ref[k] for k in ref.files})
    batched = sess.run(None, {"input": np.concatenate([x, x])})
    for y, name in zip(batched, names):
        np.testing.assert_allclose(y[1:], got[name], rtol=1e-5, atol=1e-5)


LENET = SHARED / "lenet"


@pytest.mark.skipif(not (LENET / "lenet_iter_10000.caffemodel").exists(), reason="lenet data missing")
def test_cli_convert_caffe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dl_inference.cli import main

    out = tmp_path / "lenet.onnx"
    args = ["convert", "caffe", "--prototxt", str(LENET / "lenet.prototxt")]
    args += ["--caffemodel", str(LENET / "lenet_iter_10000.caffemodel"), "-o", str(out), "--no-batch-dynamic"]
    assert main(args) == 0
    assert "outputs [prob]" in capsys.readouterr().out
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [64, 1, 28, 28]  # the batch the prototxt declares
    assert main(["convert", "caffe", "--prototxt", str(tmp_path / "missing.prototxt"), "-o", str(out)]) == 2
