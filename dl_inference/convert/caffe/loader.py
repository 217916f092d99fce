"""Read a Caffe net: deploy ``.prototxt`` (text) + ``.caffemodel`` (binary weights).

The result, :class:`CaffeNet`, is a normalised view for the converter:

* V1 nets (``layers`` with enum types) are upgraded: types become V2 strings ("Convolution"), and
  their ``*_param`` sub-messages are copied by name into a V2 :class:`LayerParameter`.
* Layers are filtered as Caffe does for phase TEST (``include``/``exclude`` rules, level 0, no
  stages); data, loss, accuracy and silence layers are dropped as well.
* Inputs come from ``Input`` layers (which are removed from ``layers``) or from the legacy
  ``input`` + ``input_shape`` / ``input`` + ``input_dim`` net fields.
* Weights are matched by layer name, in either direction between V1 and V2 files; layers of the
  caffemodel that the prototxt lacks (data, loss, ``*_split``) are ignored. A layer whose type
  needs weights but which has none is an error naming the layer.

Errors are :class:`~dl_inference.errors.InvalidArgument` naming the file and, for text, the
parser's ``line:column``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import text_format

from dl_inference.errors import InvalidArgument
from dl_inference.protocol.generated import caffe_pb2

__all__ = [
    "V1_TYPE_NAMES",
    "CaffeLayer",
    "CaffeNet",
    "load_net",
    "read_caffemodel",
    "read_prototxt",
]

# V1LayerParameter.LayerType enum name -> V2 type string (as Caffe's UpgradeV1LayerType).
V1_TYPE_NAMES: dict[str, str] = {
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DATA": "Data",
    "DECONVOLUTION": "Deconvolution",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# Layer types that only feed or score training: never part of the inference graph.
_DROPPED_TYPES = frozenset(
    {
        "Accuracy",
        "AnnotatedData",
        "Data",
        "DetectionEvaluate",
        "DummyData",
        "HDF5Data",
        "HDF5Output",
        "ImageData",
        "MemoryData",
        "Silence",
        "VideoData",
        "WindowData",
    }
)

# Layer types whose computation needs learned blobs.
_WEIGHTED_TYPES = frozenset(
    {"Convolution", "Deconvolution", "InnerProduct", "PReLU", "BatchNorm", "Embed", "Normalize", "Parameter"}
)
# Scale / Bias hold a blob only with one bottom (with two, the second bottom is the factor).
_WEIGHTED_IF_ONE_BOTTOM = frozenset({"Scale", "Bias"})

_TEST_STATE = caffe_pb2.NetState(phase=caffe_pb2.TEST, level=0)


@dataclass
class CaffeLayer:
    name: str
    type: str  # V2 type string ("Convolution", "ReLU", ...); V1 enums mapped
    bottoms: list[str]
    tops: list[str]
    param: caffe_pb2.LayerParameter  # V2 message; for V1 layers the *_param sub-messages copied by name
    blobs: list[np.ndarray] = field(default_factory=list)  # float32, shaped by BlobShape or legacy 4-D


@dataclass
class CaffeNet:
    name: str
    inputs: list[tuple[str, list[int]]]
    layers: list[CaffeLayer]
    outputs: list[str]


# --------------------------------------------------------------------------- reading files


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read Caffe {what} {path}: {exc.strerror or exc}") from exc


def read_prototxt(path: str | Path) -> caffe_pb2.NetParameter:
    """Parse a text-format NetParameter; errors carry the file and the parser's line:column."""
    data = _read_bytes(Path(path), "prototxt")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"Caffe prototxt {path} is not UTF-8 text: {exc}") from exc
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as exc:
        raise InvalidArgument(f"cannot parse Caffe prototxt {path}: {exc}") from exc
    return net


def read_caffemodel(path: str | Path) -> caffe_pb2.NetParameter:
    """Parse a binary NetParameter (fields this schema does not declare are kept as unknown)."""
    data = _read_bytes(Path(path), "caffemodel")
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except (pb_message.DecodeError, RuntimeError, ValueError) as exc:
        raise InvalidArgument(f"cannot parse Caffe caffemodel {path}: {exc}") from exc
    return net


# --------------------------------------------------------------------------- helpers


def _rule_met(rule: caffe_pb2.NetStateRule, state: caffe_pb2.NetState) -> bool:
    # Mirrors caffe::Net::StateMeetsRule.
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def _included(
    include: Sequence[caffe_pb2.NetStateRule],
    exclude: Sequence[caffe_pb2.NetStateRule],
    state: caffe_pb2.NetState = _TEST_STATE,
) -> bool:
    if include:
        return any(_rule_met(r, state) for r in include)
    return not any(_rule_met(r, state) for r in exclude)


def _is_dropped_type(layer_type: str) -> bool:
    return layer_type in _DROPPED_TYPES or layer_type.endswith("Loss")


def _v1_to_v2(v1: caffe_pb2.V1LayerParameter, source: Path) -> caffe_pb2.LayerParameter:
    """Upgrade one V1 layer (like caffe::UpgradeV1LayerParameter, for inference-relevant fields)."""
    type_name = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type) if v1.HasField("type") else "NONE"
    if type_name not in V1_TYPE_NAMES:
        raise InvalidArgument(f"Caffe prototxt {source}: V1 layer {v1.name!r} has no type (got {type_name})")
    out = caffe_pb2.LayerParameter(name=v1.name, type=V1_TYPE_NAMES[type_name])
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    out.include.extend(v1.include)
    out.exclude.extend(v1.exclude)
    out.loss_weight.extend(v1.loss_weight)
    out.blobs.extend(v1.blobs)
    n_specs = max(len(v1.param), len(v1.blobs_lr), len(v1.weight_decay))
    for i in range(n_specs):
        spec = out.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    v2_fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    for fd, value in v1.ListFields():
        if fd.name.endswith("_param") and fd.name in v2_fields:
            getattr(out, fd.name).CopyFrom(value)
    return out


def _all_layers(net: caffe_pb2.NetParameter, source: Path) -> list[caffe_pb2.LayerParameter]:
    """The net's layers as V2 messages: ``layer`` as is, then ``layers`` (V1) upgraded."""
    layers = list(net.layer)
    layers.extend(_v1_to_v2(v1, source) for v1 in net.layers)
    return layers


def _blob_to_array(blob: caffe_pb2.BlobProto, layer: str, index: int, source: Path) -> np.ndarray:
    if blob.HasField("shape"):
        shape = [int(d) for d in blob.shape.dim]
    elif any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = [int(blob.num), int(blob.channels), int(blob.height), int(blob.width)]
    else:
        # Neither form: a flat vector of whatever data there is.
        shape = [len(blob.data) or len(blob.double_data)]
    if len(blob.data):
        arr = np.asarray(blob.data, dtype=np.float32)
    else:
        arr = np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if arr.size != count:
        raise InvalidArgument(
            f"Caffe weights {source}: layer {layer!r} blob {index} has {arr.size} values "
            f"but its shape {shape} needs {count}"
        )
    return arr.reshape(shape)


def _weights_by_name(net: caffe_pb2.NetParameter) -> dict[str, Sequence[caffe_pb2.BlobProto]]:
    """Layer name -> blobs, over both V2 ``layer`` and V1 ``layers`` (later ones win, as in Caffe)."""
    weights: dict[str, Sequence[caffe_pb2.BlobProto]] = {}
    for layer in list(net.layers) + list(net.layer):
        if len(layer.blobs):
            weights[layer.name] = layer.blobs
    return weights


def _needs_weights(layer: caffe_pb2.LayerParameter) -> bool:
    if layer.type in _WEIGHTED_TYPES:
        return True
    return layer.type in _WEIGHTED_IF_ONE_BOTTOM and len(layer.bottom) == 1


def _legacy_inputs(net: caffe_pb2.NetParameter, source: Path) -> list[tuple[str, list[int]]]:
    names = list(net.input)
    if not names:
        if len(net.input_shape) or len(net.input_dim):
            raise InvalidArgument(f"Caffe prototxt {source}: input_shape/input_dim given without input names")
        return []
    if len(net.input_shape):
        if len(net.input_shape) != len(names):
            raise InvalidArgument(
                f"Caffe prototxt {source}: {len(names)} inputs but {len(net.input_shape)} input_shape entries"
            )
        return [(n, [int(d) for d in s.dim]) for n, s in zip(names, net.input_shape)]
    dims = [int(d) for d in net.input_dim]
    if len(dims) != 4 * len(names):
        raise InvalidArgument(
            f"Caffe prototxt {source}: {len(names)} inputs need {4 * len(names)} input_dim values, got {len(dims)}"
        )
    return [(n, dims[4 * i : 4 * i + 4]) for i, n in enumerate(names)]


def _input_layer_inputs(layer: caffe_pb2.LayerParameter, source: Path) -> list[tuple[str, list[int]]]:
    shapes = [[int(d) for d in s.dim] for s in layer.input_param.shape]
    tops = list(layer.top)
    if len(shapes) == 1 and len(tops) > 1:
        shapes = shapes * len(tops)  # Caffe: one shape is shared by every top
    if len(shapes) != len(tops):
        raise InvalidArgument(
            f"Caffe prototxt {source}: Input layer {layer.name!r} has {len(tops)} tops "
            f"but {len(shapes)} input_param shapes"
        )
    return list(zip(tops, shapes))


def _outputs(layers: Iterable[CaffeLayer]) -> list[str]:
    """Tops that no later layer consumes, in the order their (last) producers appear."""
    consumed_later: set[str] = set()
    found: list[str] = []
    seen: set[str] = set()
    for layer in reversed(list(layers)):
        for top in reversed(layer.tops):
            if top not in consumed_later and top not in seen:
                found.append(top)
                seen.add(top)
        consumed_later.update(layer.bottoms)
    found.reverse()
    return found


# --------------------------------------------------------------------------- API


def load_net(prototxt: Path, caffemodel: Path | None = None) -> CaffeNet:
    """Load a deploy prototxt and (optionally) its weights into a :class:`CaffeNet`.

    Without ``caffemodel`` only blobs embedded in the prototxt are used and missing weights are
    not an error (structure-only load).
    """
    prototxt = Path(prototxt)
    net = read_prototxt(prototxt)
    weights: dict[str, Sequence[caffe_pb2.BlobProto]] = {}
    weights_source = prototxt
    if caffemodel is not None:
        weights_source = Path(caffemodel)
        weights = _weights_by_name(read_caffemodel(weights_source))

    inputs = _legacy_inputs(net, prototxt)
    layers: list[CaffeLayer] = []
    for layer in _all_layers(net, prototxt):
        if not _included(layer.include, layer.exclude) or _is_dropped_type(layer.type):
            continue
        if layer.type == "Input":
            inputs.extend(_input_layer_inputs(layer, prototxt))
            continue
        blob_protos: Sequence[caffe_pb2.BlobProto] = weights.get(layer.name) or layer.blobs
        source = weights_source if layer.name in weights else prototxt
        if not len(blob_protos) and caffemodel is not None and _needs_weights(layer):
            raise InvalidArgument(
                f"Caffe layer {layer.name!r} (type {layer.type}) needs weights, "
                f"but {caffemodel} has no blobs for a layer of that name"
            )
        blobs = [_blob_to_array(b, layer.name, i, source) for i, b in enumerate(blob_protos)]
        if len(layer.blobs):
            layer.ClearField("blobs")  # keep `param` light; the arrays are in `blobs`
        layers.append(
            CaffeLayer(
                name=layer.name,
                type=layer.type,
                bottoms=list(layer.bottom),
                tops=list(layer.top),
                param=layer,
                blobs=blobs,
            )
        )
    seen_inputs: set[str] = set()
    for name, _ in inputs:
        if name in seen_inputs:
            raise InvalidArgument(f"Caffe prototxt {prototxt}: input {name!r} declared twice")
        seen_inputs.add(name)
    return CaffeNet(name=net.name, inputs=inputs, layers=layers, outputs=_outputs(layers))
