"""Tests for dl_inference.convert.caffe.loader (prototxt + caffemodel -> CaffeNet).

Part one loads every real model in ../shared/caffe and checks it against inventory.json; part two
builds small nets in the test (text prototxt + caffemodel written with the generated classes).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dl_inference.convert.caffe.loader import V1_TYPE_NAMES, CaffeNet, load_net, read_caffemodel, read_prototxt
from dl_inference.errors import InvalidArgument
from dl_inference.protocol.generated import caffe_pb2
from tests.samples import CAFFE_SAMPLES, CAFFE_SKIP_REASON

SHARED = CAFFE_SAMPLES
INVENTORY: dict = json.loads((SHARED / "inventory.json").read_text()) if (SHARED / "inventory.json").is_file() else {}


def _pairs() -> list[tuple[Path, Path]]:
    """Every prototxt in the shared folder with its caffemodel (inventory first, then same stem)."""
    if not SHARED.is_dir():
        return []
    pairs: dict[Path, Path] = {}
    for model, entry in INVENTORY.items():
        pairs[SHARED / entry["prototxt"]] = SHARED / model
    for proto in sorted(SHARED.rglob("*.prototxt")):
        if proto not in pairs:
            model = proto.with_suffix(".caffemodel")
            if model.is_file():
                pairs[proto] = model
    return sorted(pairs.items())


PAIRS = _pairs()
PAIR_IDS = [str(p.relative_to(SHARED)) for p, _ in PAIRS]


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module", params=PAIRS, ids=PAIR_IDS)
def real(request: pytest.FixtureRequest) -> tuple[Path, Path, CaffeNet]:
    if not SHARED.is_dir():
        pytest.skip(CAFFE_SKIP_REASON)
    proto, model = request.param
    return proto, model, load_net(proto, model)


def _entry(model: Path) -> dict | None:
    return INVENTORY.get(str(model.relative_to(SHARED)))


def test_shared_folder_has_models() -> None:
    if not SHARED.is_dir():
        pytest.skip(CAFFE_SKIP_REASON)
    assert len(PAIRS) >= len(INVENTORY) > 0
    assert all(m.is_file() for _, m in PAIRS)


def test_real_model_loads_and_matches_inventory(real: tuple[Path, Path, CaffeNet]) -> None:
    _proto, model, net = real
    assert net.layers and net.inputs and net.outputs
    assert all(layer.type != "Input" for layer in net.layers)
    entry = _entry(model)
    if entry is None:
        return
    # Inventory counts use the file's own type names (V1 enums for V1 nets) and include Input.
    expected = Counter({V1_TYPE_NAMES.get(t, t): n for t, n in entry["layer_counts"].items()})
    expected.pop("Input", None)
    assert Counter(layer.type for layer in net.layers) == expected
    assert dict(net.inputs) == entry["inputs"]
    assert sum(1 for layer in net.layers if layer.blobs) == entry["weight_layers"]
    # Blob shapes exactly as recorded (legacy 4-D blobs stay 4-D).
    by_name = {layer.name: layer for layer in net.layers}
    for name, (_type, blobs) in entry["blobs_sample"].items():
        got = [list(b.shape) for b in by_name[name].blobs]
        assert got == [shape for shape, _kind, _form in blobs], name


def test_real_model_blobs_are_sane(real: tuple[Path, Path, CaffeNet]) -> None:
    _, _, net = real
    for layer in net.layers:
        for blob in layer.blobs:
            assert blob.dtype == np.float32 and np.isfinite(blob).all(), layer.name
        if layer.type in ("Convolution", "Deconvolution"):
            cp = layer.param.convolution_param
            weight = layer.blobs[0]
            assert weight.ndim == 4, layer.name
            out_ch = weight.shape[0] if layer.type == "Convolution" else weight.shape[1] * cp.group
            assert out_ch == cp.num_output, layer.name
            assert len(layer.blobs) == (2 if cp.bias_term else 1), layer.name
            if cp.bias_term:
                assert layer.blobs[1].size == cp.num_output
        if layer.type == "InnerProduct":
            ip = layer.param.inner_product_param
            assert layer.blobs[0].size % ip.num_output == 0
            assert layer.blobs[0].shape[-2 if layer.blobs[0].ndim == 4 else 0] == ip.num_output
        if layer.type == "BatchNorm":
            assert len(layer.blobs) == 3 and layer.blobs[2].size == 1


def test_real_model_outputs_are_produced_tops(real: tuple[Path, Path, CaffeNet]) -> None:
    _, model, net = real
    produced = {t for layer in net.layers for t in layer.tops}
    assert set(net.outputs) <= produced
    known = {name for name, _ in net.inputs} | produced
    for layer in net.layers:
        assert set(layer.bottoms) <= known, layer.name
    entry = _entry(model)
    if entry and "opencv" in entry:
        # OpenCV names each output after the layer that last writes it.
        last_writer = {top: layer.name for layer in net.layers for top in layer.tops}
        assert sorted(last_writer[o] for o in net.outputs) == sorted(entry["opencv"])


def test_real_caffemodel_extra_layers_ignored() -> None:
    if not SHARED.is_dir():
        pytest.skip(CAFFE_SKIP_REASON)
    for model, entry in INVENTORY.items():
        weights = read_caffemodel(SHARED / model)
        names = {layer.name for layer in weights.layer} | {layer.name for layer in weights.layers}
        net = load_net(SHARED / entry["prototxt"], SHARED / model)
        loaded = {layer.name for layer in net.layers}
        for extra in entry["model_layer_names_missing_from_proto"]:
            assert extra in names and extra not in loaded


def test_v1_net_types_and_params_mapped() -> None:
    proto = SHARED / "cifar10_quick_v1" / "cifar10_quick.prototxt"
    if not proto.is_file():
        pytest.skip(f"{proto} is not present")
    raw = read_prototxt(proto)
    assert len(raw.layers) and not len(raw.layer)
    net = load_net(proto, SHARED / "cifar10_quick_v1" / "cifar10_quick_iter_5000.caffemodel")
    assert net.inputs == [("data", [1, 3, 32, 32])]
    assert [layer.type for layer in net.layers][:3] == ["Convolution", "Pooling", "ReLU"]
    conv1 = net.layers[0]
    assert isinstance(conv1.param, caffe_pb2.LayerParameter)
    assert conv1.param.convolution_param.num_output == 32 and list(conv1.param.convolution_param.pad) == [2]
    assert [p.lr_mult for p in conv1.param.param] == [1, 2]  # blobs_lr upgraded to ParamSpec
    pools = [layer.param.pooling_param.pool for layer in net.layers if layer.type == "Pooling"]
    assert pools == [caffe_pb2.PoolingParameter.MAX, caffe_pb2.PoolingParameter.AVE, caffe_pb2.PoolingParameter.AVE]
    assert net.outputs == ["prob"]


def test_ssd_permute_param_parses() -> None:
    proto = SHARED / "ultraface_rfb320" / "RFB-320.prototxt"
    if not proto.is_file():
        pytest.skip(f"{proto} is not present")
    net = load_net(proto)  # structure only
    permutes = [layer for layer in net.layers if layer.type == "Permute"]
    assert permutes and all(list(p.param.permute_param.order) == [0, 2, 3, 1] for p in permutes)


def test_synthetic_ops_blobs_match_values() -> None:
    proto = SHARED / "synthetic_ops" / "synthetic_ops.prototxt"
    if not proto.is_file():
        pytest.skip(f"{proto} is not present")
    net = load_net(proto, proto.with_suffix(".caffemodel"))
    by_name = {layer.name: layer for layer in net.layers}
    assert [b.shape for b in by_name["bn"].blobs] == [(8,), (8,), (1,)]
    assert by_name["bn"].param.batch_norm_param.use_global_stats
    assert by_name["lrn"].param.lrn_param.k == 2
    assert by_name["slice"].tops == ["s1", "s2"]
    assert net.outputs == ["prob"]


# --------------------------------------------------------------------------- small nets


def _blob(arr: np.ndarray, legacy: bool = False) -> caffe_pb2.BlobProto:
    blob = caffe_pb2.BlobProto()
    if legacy:
        shape = [1] * (4 - arr.ndim) + list(arr.shape)
        blob.num, blob.channels, blob.height, blob.width = shape
    else:
        blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.astype(np.float32).ravel().tolist())
    return blob


def _write_model(path: Path, weights: dict[str, list[np.ndarray]], v1: bool = False, legacy: bool = False) -> Path:
    net = caffe_pb2.NetParameter(name="weights")
    for name, arrays in weights.items():
        layer = net.layers.add() if v1 else net.layer.add()
        layer.name = name
        layer.blobs.extend(_blob(a, legacy) for a in arrays)
    # Extra layers a trained caffemodel carries; they must be ignored.
    net.layer.add(name="loss", type="SoftmaxWithLoss")
    net.layer.add(name="conv_split", type="Split")
    path.write_bytes(net.SerializeToString())
    return path


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "drop_train" type: "Dropout" bottom: "conv" top: "conv" include { phase: TRAIN } }
layer { name: "not_in_test" type: "ReLU" bottom: "conv" top: "conv" exclude { phase: TEST } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { kernel_size: 2 } }
layer { name: "acc" type: "Accuracy" bottom: "pool" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool" bottom: "label" top: "loss" }
layer { name: "side" type: "Sigmoid" bottom: "data" top: "side" include { phase: TEST } }
"""

SMALL_WEIGHTS = {
    "conv": [np.arange(54, dtype=np.float32).reshape(3, 2, 3, 3), np.array([1, 2, 3], np.float32)],
    "prelu": [np.full(3, 0.25, np.float32)],
}


def test_small_net_in_place_and_phase_rules(tmp_path: Path) -> None:
    proto = _write(tmp_path, "small.prototxt", SMALL)
    net = load_net(proto, _write_model(tmp_path / "small.caffemodel", SMALL_WEIGHTS))
    assert net.name == "small"
    assert net.inputs == [("data", [1, 2, 5, 5])]
    assert [layer.name for layer in net.layers] == ["conv", "relu", "prelu", "pool", "side"]
    relu = net.layers[1]
    assert relu.bottoms == relu.tops == ["conv"] and relu.blobs == []
    assert net.outputs == ["pool", "side"]
    conv = net.layers[0]
    np.testing.assert_array_equal(conv.blobs[0], SMALL_WEIGHTS["conv"][0])
    assert conv.blobs[1].dtype == np.float32 and conv.blobs[1].shape == (3,)
    # Defaults of the schema apply.
    assert conv.param.convolution_param.bias_term and conv.param.convolution_param.group == 1
    pool = net.layers[3].param.pooling_param
    assert pool.pool == caffe_pb2.PoolingParameter.MAX and pool.stride == 1
    assert pool.round_mode == caffe_pb2.PoolingParameter.CEIL


def test_in_place_output_name_repeats(tmp_path: Path) -> None:
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
    layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
    """
    model = _write_model(tmp_path / "m.caffemodel", {"ip": [np.ones((2, 3)), np.zeros(2)]})
    net = load_net(_write(tmp_path, "m.prototxt", text), model)
    assert net.outputs == ["ip"]
    assert [b.shape for b in net.layers[0].blobs] == [(2, 3), (2,)]


def test_missing_weights_is_a_clear_error(tmp_path: Path) -> None:
    proto = _write(tmp_path, "small.prototxt", SMALL)
    model = _write_model(tmp_path / "small.caffemodel", {"conv": SMALL_WEIGHTS["conv"]})
    with pytest.raises(InvalidArgument, match=r"'prelu'.*PReLU.*needs weights"):
        load_net(proto, model)
    # Without a caffemodel it is a structure-only load.
    assert load_net(proto).layers[2].blobs == []


def test_legacy_input_dim_and_v1_weights_for_v2_prototxt(tmp_path: Path) -> None:
    text = """
    name: "legacy"
    input: "a"
    input_dim: 1 input_dim: 2 input_dim: 5 input_dim: 5
    input: "b"
    input_dim: 1 input_dim: 3 input_dim: 1 input_dim: 1
    layer { name: "conv" type: "Convolution" bottom: "a" top: "c" convolution_param { num_output: 3 kernel_size: 3 } }
    layer { name: "prelu" type: "PReLU" bottom: "c" top: "c" }
    """
    proto = _write(tmp_path, "legacy.prototxt", text)
    model = _write_model(tmp_path / "legacy.caffemodel", SMALL_WEIGHTS, v1=True, legacy=True)
    net = load_net(proto, model)
    assert net.inputs == [("a", [1, 2, 5, 5]), ("b", [1, 3, 1, 1])]
    assert [b.shape for b in net.layers[0].blobs] == [(3, 2, 3, 3), (1, 1, 1, 3)]  # legacy 4-D kept
    assert net.layers[1].blobs[0].shape == (1, 1, 1, 3)
    assert net.outputs == ["c"]


def test_input_shape_legacy_and_v1_prototxt_with_v2_weights(tmp_path: Path) -> None:
    text = """
    input: "data"
    input_shape { dim: 1 dim: 2 dim: 5 dim: 5 }
    layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
             convolution_param { num_output: 3 kernel_size: 3 } }
    layers { name: "relu" type: RELU bottom: "conv" top: "conv" relu_param { negative_slope: 0.5 } }
    layers { name: "train_data" type: DATA top: "data" top: "label" include { phase: TRAIN } }
    layers { name: "prob" type: SOFTMAX bottom: "conv" top: "prob" }
    layers { name: "loss" type: SOFTMAX_LOSS bottom: "conv" bottom: "label" }
    """
    proto = _write(tmp_path, "v1.prototxt", text)
    net = load_net(proto, _write_model(tmp_path / "v1.caffemodel", {"conv": SMALL_WEIGHTS["conv"]}))
    assert net.inputs == [("data", [1, 2, 5, 5])]
    assert [(layer.name, layer.type) for layer in net.layers] == [
        ("conv", "Convolution"),
        ("relu", "ReLU"),
        ("prob", "Softmax"),
    ]
    assert net.layers[1].param.relu_param.negative_slope == 0.5
    assert net.layers[0].blobs[0].shape == (3, 2, 3, 3)
    assert net.outputs == ["prob"]


def test_input_layer_shape_shared_by_tops_and_double_data(tmp_path: Path) -> None:
    text = """
    layer { name: "in" type: "Input" top: "x" top: "y" input_param { shape { dim: 2 dim: 4 } } }
    layer { name: "sc" type: "Scale" bottom: "x" top: "s" }
    layer { name: "mul" type: "Scale" bottom: "s" bottom: "y" top: "out" }
    """
    weights = caffe_pb2.NetParameter()
    blob = weights.layer.add(name="sc").blobs.add()
    blob.shape.dim.append(4)
    blob.double_data.extend([1.0, 2.0, 3.0, 4.0])
    (tmp_path / "d.caffemodel").write_bytes(weights.SerializeToString())
    net = load_net(_write(tmp_path, "d.prototxt", text), tmp_path / "d.caffemodel")
    assert net.inputs == [("x", [2, 4]), ("y", [2, 4])]
    assert net.layers[0].blobs[0].dtype == np.float32 and net.layers[0].blobs[0].tolist() == [1, 2, 3, 4]
    assert net.layers[1].blobs == []  # two-bottom Scale needs no weights
    assert net.outputs == ["out"]


def test_parse_errors_name_file_and_position(tmp_path: Path) -> None:
    bad = _write(tmp_path, "bad.prototxt", 'name: "x"\nlayer {\n  name: "a"\n  no_such_param { }\n}\n')
    with pytest.raises(InvalidArgument) as info:
        read_prototxt(bad)
    assert "bad.prototxt" in str(info.value) and "4:" in str(info.value) and "no_such_param" in str(info.value)
    garbage = tmp_path / "bad.caffemodel"
    garbage.write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(InvalidArgument, match=r"bad\.caffemodel"):
        read_caffemodel(garbage)
    with pytest.raises(InvalidArgument, match=r"missing\.prototxt"):
        load_net(tmp_path / "missing.prototxt")


def test_input_dim_count_mismatch_is_an_error(tmp_path: Path) -> None:
    proto = _write(tmp_path, "x.prototxt", 'input: "a"\ninput_dim: 1\ninput_dim: 3\n')
    with pytest.raises(InvalidArgument, match="input_dim"):
        load_net(proto)


def test_blob_size_mismatch_is_an_error(tmp_path: Path) -> None:
    text = 'layer { name: "p" type: "PReLU" bottom: "d" top: "d" }\ninput: "d"\ninput_shape { dim: 1 dim: 3 }\n'
    weights = caffe_pb2.NetParameter()
    blob = weights.layer.add(name="p").blobs.add()
    blob.shape.dim.append(3)
    blob.data.extend([1.0, 2.0])
    (tmp_path / "p.caffemodel").write_bytes(weights.SerializeToString())
    with pytest.raises(InvalidArgument, match="'p' blob 0 has 2 values"):
        load_net(_write(tmp_path, "p.prototxt", text), tmp_path / "p.caffemodel")
