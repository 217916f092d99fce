"""TensorFlow Serving messages <-> KServe V2 messages (the gateway's TF-Serving translation).

Depends only on numpy, ml_dtypes and protobuf: the gateway never imports TensorFlow. The messages
are our own copies (``protos/tf_serving.proto``), wire-compatible with TensorFlow's.

Request tensors (:func:`tensor_to_v2`) follow TensorFlow's ``Tensor::FromProto``:

* ``tensor_content`` holds the values row-major, little-endian, ``itemsize`` bytes each (BOOL: one
  byte); it is forwarded to the worker as the V2 raw contents without being copied into numpy.
* Otherwise the typed field of the dtype holds them: ``float_val`` (DT_FLOAT), ``double_val``,
  ``int_val`` (DT_INT32/INT16/INT8/UINT16/UINT8), ``int64_val``, ``uint32_val``, ``uint64_val``,
  ``bool_val``, ``half_val`` (the 16 bits of each DT_HALF or DT_BFLOAT16 value), ``string_val``.
* A single value with a larger shape fills the whole tensor (what ``tf.make_tensor_proto(0.0,
  shape=[2, 3])`` sends). TensorFlow also pads a short list with its last value, truncates a long one
  and zero-fills an empty one; those are almost always client bugs, so here they are errors that
  name the tensor, as are a ``tensor_content`` of the wrong size, values out of the dtype's range,
  data in a field that does not belong to the dtype, unknown rank and negative dimensions.

Response tensors (:func:`infer_to_predict`) carry numeric data in ``tensor_content`` and BYTES in
``string_val``, as TensorFlow Serving answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from dl_inference.errors import InternalError, InvalidArgument, NotFound, ResourceExhausted
from dl_inference.protocol.datatypes import BF16, numpy_dtype
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import tf_serving_pb2 as tfs
from dl_inference.protocol.tensors import (
    _contents_to_numpy,
    _element_count,
    deserialize_bytes_tensor,
    serialize_bytes_tensor,
)

__all__ = [
    "DEFAULT_SIGNATURE",
    "DT_TO_V2",
    "PREDICT_METHOD",
    "SIGNATURE_DEF_MAP_TYPE_URL",
    "V2_TO_DT",
    "VersionState",
    "check_signature",
    "infer_to_predict",
    "label_to_version",
    "metadata_response",
    "parse_request",
    "predict_to_infer",
    "requested_version",
    "signature_def_map",
    "status_response",
    "tensor_to_v2",
]

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
SIGNATURE_DEF_MAP_TYPE_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"

DT_TO_V2: dict[int, str] = {
    tfs.DT_FLOAT: "FP32",
    tfs.DT_DOUBLE: "FP64",
    tfs.DT_HALF: "FP16",
    tfs.DT_BFLOAT16: "BF16",
    tfs.DT_INT8: "INT8",
    tfs.DT_INT16: "INT16",
    tfs.DT_INT32: "INT32",
    tfs.DT_INT64: "INT64",
    tfs.DT_UINT8: "UINT8",
    tfs.DT_UINT16: "UINT16",
    tfs.DT_UINT32: "UINT32",
    tfs.DT_UINT64: "UINT64",
    tfs.DT_BOOL: "BOOL",
    tfs.DT_STRING: "BYTES",
}
V2_TO_DT: dict[str, int] = {v: k for k, v in DT_TO_V2.items()}

# dtype -> the repeated field that carries its values when tensor_content is empty.
_VALUE_FIELD: dict[int, str] = {
    tfs.DT_FLOAT: "float_val",
    tfs.DT_DOUBLE: "double_val",
    tfs.DT_HALF: "half_val",
    tfs.DT_BFLOAT16: "half_val",
    tfs.DT_INT8: "int_val",
    tfs.DT_INT16: "int_val",
    tfs.DT_INT32: "int_val",
    tfs.DT_UINT8: "int_val",
    tfs.DT_UINT16: "int_val",
    tfs.DT_INT64: "int64_val",
    tfs.DT_UINT32: "uint32_val",
    tfs.DT_UINT64: "uint64_val",
    tfs.DT_BOOL: "bool_val",
    tfs.DT_STRING: "string_val",
}
# numpy dtype wide enough to read each field before narrowing to the tensor's dtype.
_FIELD_DTYPE: dict[str, np.dtype] = {
    "float_val": np.dtype(np.float32),
    "double_val": np.dtype(np.float64),
    "half_val": np.dtype(np.int64),
    "int_val": np.dtype(np.int64),
    "int64_val": np.dtype(np.int64),
    "uint32_val": np.dtype(np.uint64),
    "uint64_val": np.dtype(np.uint64),
    "bool_val": np.dtype(np.bool_),
}
_ALL_VALUE_FIELDS = (*sorted(set(_VALUE_FIELD.values())), "scomplex_val", "dcomplex_val", "float8_val")


M = TypeVar("M", bound=Message)


def parse_request(message_class: type[M], data: bytes) -> M:
    """A request message from its wire bytes; InvalidArgument when they do not decode.

    The gRPC handlers parse requests themselves: grpc's own deserializer answers bytes that do not
    decode with UNKNOWN and logs a traceback for each such request."""
    try:
        return message_class.FromString(data)
    except DecodeError:
        name = f"tensorflow.serving.{message_class.DESCRIPTOR.name}"
        raise InvalidArgument(f"the request is not a valid {name} message ({len(data)} bytes)") from None


def _dtype_name(dtype: int) -> str:
    try:
        return tfs.DataType.Name(dtype)
    except ValueError:
        return f"dtype {dtype}"


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


# --------------------------------------------------------------------------------------------------
# model spec: version, label, signature
# --------------------------------------------------------------------------------------------------


def label_to_version(label: str) -> str:
    """The version a TF-Serving version label stands for.

    This server has no label configuration (TF-Serving's ``version_labels`` in its model config), so
    only an all-digits label is understood, as that version number; any other label is an
    InvalidArgument that says so.
    """
    if label.isascii() and label.isdigit():
        return str(int(label))
    raise InvalidArgument(
        f"unknown version label '{label}': this server has no version label configuration; "
        f"use a version number (versions/N, or a numeric label) or leave the version out for the latest"
    )


def requested_version(spec: tfs.ModelSpec) -> str:
    """V2 ``model_version`` for a ModelSpec: the version, a numeric label, or "" for the latest."""
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return str(spec.version.value)
    if which == "version_label":
        return label_to_version(spec.version_label)
    return ""


def check_signature(requested: str, model_name: str, model_signature: str = DEFAULT_SIGNATURE) -> str:
    """The signature a request names, resolved ("" is ``serving_default``). ``serving_default`` and the
    model's own signature name both name its one signature; anything else is an InvalidArgument."""
    if requested in ("", DEFAULT_SIGNATURE, model_signature):
        return requested or DEFAULT_SIGNATURE
    names = sorted({DEFAULT_SIGNATURE, model_signature or DEFAULT_SIGNATURE})
    raise InvalidArgument(
        f"model '{model_name}' has no signature '{requested}': it has one signature, "
        f"{' or '.join(repr(n) for n in names)} (an empty signature_name means that one too)"
    )


def _model_spec(name: str, version: str, signature: str | None) -> tfs.ModelSpec:
    spec = tfs.ModelSpec(name=name)
    if version.isascii() and version.isdigit():
        spec.version.value = int(version)
    if signature is not None:
        spec.signature_name = signature
    return spec


# --------------------------------------------------------------------------------------------------
# request: TensorProto -> V2 input
# --------------------------------------------------------------------------------------------------


def _shape_of(proto: tfs.TensorProto, label: str) -> list[int]:
    if proto.tensor_shape.unknown_rank:
        raise InvalidArgument(f"{label}: tensor_shape has an unknown rank; send the tensor's actual shape")
    return [d.size for d in proto.tensor_shape.dim]


def _check_budget(what: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ResourceExhausted(
            f"{what}, more than the {max_bytes} bytes a request may hold (setting max_request_bytes)"
        )


def _typed_values(
    proto: tfs.TensorProto, field: str, datatype: str, count: int, label: str, max_bytes: int | None
) -> bytes:
    """Raw V2 bytes of the values in ``field``: exactly ``count`` values, or one to fill them all."""
    values = getattr(proto, field)
    n = len(values)
    if n != count and not (n == 1 and count > 1):
        raise InvalidArgument(
            f"{label}: {n} values in {field} for a tensor of {count} elements: give {count} values, "
            f"or one value to fill the tensor"
        )
    if max_bytes is not None:
        # A few bytes on the wire can ask for a huge tensor (one value filling a shape; a 1-byte
        # varint per 8-byte int64): refuse it before allocating it.
        fill = n == 1 and count > 1
        if datatype == "BYTES":
            size = 4 * count + (count * len(values[0]) if fill else sum(len(v) for v in values))
        else:
            size = count * numpy_dtype(datatype).itemsize
        what = f"filling {count} elements with one value" if fill else f"{count} {datatype} values from {field}"
        _check_budget(f"{label}: {what} makes {size} bytes", size, max_bytes)
    if datatype == "BYTES":
        items = list(values) if n == count else [values[0]] * count
        return serialize_bytes_tensor(np.array(items, dtype=np.object_))
    arr = np.fromiter(values, dtype=_FIELD_DTYPE[field], count=n)
    target = numpy_dtype(datatype)
    if datatype in ("FP16", "BF16"):
        lo, hi = (int(arr.min()), int(arr.max())) if n else (0, 0)
        if lo < 0 or hi > 0xFFFF:
            bad = lo if lo < 0 else hi
            raise InvalidArgument(f"{label}: half_val value {bad} is not the 16 bits of a {datatype} value")
        arr = arr.astype(np.uint16).view(BF16 if datatype == "BF16" else np.float16)
    elif target.kind in "iu" and arr.dtype != target and n:
        info = np.iinfo(target)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise InvalidArgument(f"{label}: value {bad} in {field} is out of range for {datatype}")
        arr = arr.astype(target)
    else:
        arr = arr.astype(target, copy=False)
    if n != count:
        arr = np.full(count, arr[0], dtype=arr.dtype)
    return arr.tobytes()


def tensor_to_v2(proto: tfs.TensorProto, name: str, max_bytes: int | None = None) -> tuple[str, list[int], bytes]:
    """(V2 datatype, shape, raw contents) of a request's TensorProto; InvalidArgument naming ``name``.

    ``max_bytes`` caps the V2 contents' size (ResourceExhausted), checked before they are made: one
    value filling a larger shape, or small typed values, take far more room there than on the wire."""
    label = f"input '{name}'"
    dtype = proto.dtype
    datatype = DT_TO_V2.get(dtype)
    if datatype is None:
        if dtype == tfs.DT_INVALID:
            raise InvalidArgument(f"{label}: dtype is not set")
        supported = ", ".join(tfs.DataType.Name(d) for d in DT_TO_V2)
        raise InvalidArgument(f"{label}: {_dtype_name(dtype)} is not supported; supported dtypes: {supported}")
    shape = _shape_of(proto, label)
    itemsize = 8 if datatype == "BYTES" else numpy_dtype(datatype).itemsize
    count = _element_count(shape, label, itemsize)
    field = _VALUE_FIELD[dtype]
    others = [f for f in _ALL_VALUE_FIELDS if f != field and len(getattr(proto, f))]
    if others:
        raise InvalidArgument(
            f"{label}: {_dtype_name(dtype)} values go in tensor_content or {field}, but {', '.join(others)} is set"
        )
    content = proto.tensor_content
    if content:
        if datatype == "BYTES":
            raise InvalidArgument(f"{label}: DT_STRING values go in string_val, not tensor_content")
        if len(getattr(proto, field)):
            raise InvalidArgument(f"{label}: both tensor_content and {field} are set; send one of them")
        if len(content) != count * itemsize:
            raise InvalidArgument(
                f"{label}: tensor_content has {len(content)} bytes, but shape {_fmt_shape(shape)} "
                f"{_dtype_name(dtype)} needs {count * itemsize} ({count} elements of {itemsize} bytes)"
            )
        _check_budget(f"{label}: tensor_content has {len(content)} bytes", len(content), max_bytes)
        return datatype, shape, content
    return datatype, shape, _typed_values(proto, field, datatype, count, label, max_bytes)


def predict_to_infer(request: tfs.PredictRequest, version: str, max_bytes: int | None = None) -> pb.ModelInferRequest:
    """The V2 ModelInferRequest for a PredictRequest (every input raw; output_filter -> outputs).

    With ``max_bytes``, the inputs together may not expand to more than that (ResourceExhausted)."""
    infer = pb.ModelInferRequest(model_name=request.model_spec.name, model_version=version)
    used = 0
    for name in sorted(request.inputs):  # map order is not meaningful; a stable one helps batching
        if not name:
            raise InvalidArgument("an input has an empty name")
        budget = None if max_bytes is None else max(0, max_bytes - used)
        datatype, shape, raw = tensor_to_v2(request.inputs[name], name, budget)
        used += len(raw)
        infer.inputs.add(name=name, datatype=datatype, shape=shape)
        infer.raw_input_contents.append(raw)
    seen: set[str] = set()
    for name in request.output_filter:
        if name in seen:
            raise InvalidArgument(f"output '{name}' appears more than once in output_filter")
        seen.add(name)
        infer.outputs.add(name=name)
    return infer


# --------------------------------------------------------------------------------------------------
# response: V2 output -> TensorProto
# --------------------------------------------------------------------------------------------------


def _output_proto(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes | None, out: tfs.TensorProto) -> None:
    name, datatype = tensor.name, tensor.datatype
    label = f"output '{name}'"
    dtype = V2_TO_DT.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"{label}: unknown datatype '{datatype}'")
    shape = list(tensor.shape)
    itemsize = 8 if datatype == "BYTES" else numpy_dtype(datatype).itemsize
    count = _element_count(shape, label, itemsize)
    out.dtype = dtype  # type: ignore[assignment]
    for d in shape:
        out.tensor_shape.dim.add(size=d)
    if raw is None:
        arr = _contents_to_numpy(tensor, label)
        if datatype == "BYTES":
            out.string_val.extend(arr.ravel().tolist())
        else:
            out.tensor_content = np.ascontiguousarray(arr).tobytes()
        return
    if datatype == "BYTES":
        out.string_val.extend(deserialize_bytes_tensor(raw, count, name).tolist())
        return
    if len(raw) != count * itemsize:
        raise InvalidArgument(
            f"{label}: expected {count * itemsize} bytes for shape {_fmt_shape(shape)} {datatype}, got {len(raw)}"
        )
    out.tensor_content = raw


def infer_to_predict(
    response: pb.ModelInferResponse, output_filter: Iterable[str], model_name: str, signature: str
) -> tfs.PredictResponse:
    """The PredictResponse for a V2 response; with an ``output_filter`` only those outputs.

    A response that cannot be decoded is the model's fault, so InternalError.
    """
    wanted = set(output_filter)
    raws = response.raw_output_contents
    if raws and len(raws) != len(response.outputs):
        raise InternalError(f"response has {len(raws)} raw_output_contents entries for {len(response.outputs)} outputs")
    out = tfs.PredictResponse()
    out.model_spec.CopyFrom(_model_spec(response.model_name or model_name, response.model_version, signature))
    for i, tensor in enumerate(response.outputs):
        if wanted and tensor.name not in wanted:
            continue
        try:
            _output_proto(tensor, raws[i] if raws else None, out.outputs[tensor.name])
        except InvalidArgument as exc:
            raise InternalError(f"malformed inference response: {exc.message}") from None
    return out


# --------------------------------------------------------------------------------------------------
# metadata and status
# --------------------------------------------------------------------------------------------------


def signature_def_map(
    metadata: pb.ModelMetadataResponse, signatures: Sequence[str] = (DEFAULT_SIGNATURE,)
) -> tfs.SignatureDefMap:
    """The SignatureDef (method ``tensorflow/serving/predict``) describing a V2 model's tensors, under
    each of ``signatures``; -1 dimensions stay -1, a datatype TensorFlow lacks becomes DT_INVALID."""
    sig = tfs.SignatureDef(method_name=PREDICT_METHOD)
    for tensors, target in ((metadata.inputs, sig.inputs), (metadata.outputs, sig.outputs)):
        for tensor in tensors:
            info = target[tensor.name]
            info.name = tensor.name
            info.dtype = V2_TO_DT.get(tensor.datatype, tfs.DT_INVALID)  # type: ignore[assignment]
            for d in tensor.shape:
                info.tensor_shape.dim.add(size=d)
    out = tfs.SignatureDefMap()
    for name in signatures:
        out.signature_def[name].CopyFrom(sig)
    return out


def metadata_response(
    name: str, version: str, metadata: pb.ModelMetadataResponse, signatures: Sequence[str] = (DEFAULT_SIGNATURE,)
) -> tfs.GetModelMetadataResponse:
    """GetModelMetadataResponse with ``signature_def`` packed as the stock client expects it."""
    out = tfs.GetModelMetadataResponse()
    out.model_spec.CopyFrom(_model_spec(name, version, None))
    packed = any_pb2.Any(
        type_url=SIGNATURE_DEF_MAP_TYPE_URL, value=signature_def_map(metadata, signatures).SerializeToString()
    )
    out.metadata["signature_def"].CopyFrom(packed)
    return out


@dataclass(frozen=True)
class VersionState:
    """One row of the server's model/version states (as ``RepositoryIndex`` lists them)."""

    version: str  # "" when the model has no loaded version
    state: str  # READY, LOADING, UNLOADING, UNAVAILABLE, or "" (known, not loaded)
    reason: str = ""


_S = tfs.ModelVersionStatus


def _version_status(row: VersionState) -> tfs.ModelVersionStatus:
    """TF-Serving's view of one state row:

    ========================================  ============  ======================================
    this server                               state         status
    ========================================  ============  ======================================
    READY                                     AVAILABLE     OK
    LOADING / UNLOADING                       same          OK
    UNAVAILABLE of a loaded version           LOADING       UNAVAILABLE + reason (workers restart)
    UNAVAILABLE "unloaded"                    END           OK
    UNAVAILABLE, failed to load               END           UNKNOWN + reason
    known, not loaded ("")                    START         OK
    ========================================  ============  ======================================

    Rows without a version (the model has none loaded) get version 0.
    """
    status = tfs.ModelVersionStatus(version=int(row.version) if row.version.isdigit() else 0)
    if row.state == "READY":
        status.state = _S.AVAILABLE
    elif row.state == "LOADING":
        status.state = _S.LOADING
    elif row.state == "UNLOADING":
        status.state = _S.UNLOADING
    elif row.state == "UNAVAILABLE" and row.version:
        status.state = _S.LOADING
        status.status.error_code = tfs.UNAVAILABLE
        status.status.error_message = row.reason or "no ready instance"
    elif row.state == "UNAVAILABLE" and row.reason == "unloaded":
        status.state = _S.END
    elif row.state == "UNAVAILABLE":
        status.state = _S.END
        status.status.error_code = tfs.UNKNOWN
        status.status.error_message = row.reason
    elif not row.state:
        status.state = _S.START
    else:
        status.state = _S.UNKNOWN
        status.status.error_message = f"state {row.state}" + (f": {row.reason}" if row.reason else "")
    status.status.SetInParent()
    return status


def status_response(name: str, version: str, rows: Iterable[VersionState]) -> tfs.GetModelStatusResponse:
    """GetModelStatusResponse for model ``name`` (one ``version``, or all when ""), newest first.

    NotFound when the model, or that version of it, is unknown."""
    rows = list(rows)
    if not rows:
        raise NotFound(f"unknown model '{name}'" if name else "no model name given")
    if version:
        chosen = [r for r in rows if r.version == version]
        if not chosen:
            known = sorted(r.version for r in rows if r.version)
            loaded = ", ".join(sorted(known, key=lambda v: (len(v), v))) or "none"
            raise NotFound(f"model '{name}' has no version {version} (versions: {loaded})")
        rows = chosen
    out = tfs.GetModelStatusResponse()
    for row in sorted(rows, key=lambda r: int(r.version) if r.version.isdigit() else -1, reverse=True):
        out.model_version_status.append(_version_status(row))
    return out
