"""Property-based fuzzing of the TensorFlow Serving translation (gRPC and REST) and of the real server.

Properties:

* codec, gRPC messages: any bytes parsed as a PredictRequest, and structured random PredictRequests
  (any dtype number, shapes with negative / huge dimensions or an unknown rank, ``tensor_content`` of
  any length, values in any typed field, versions, labels, signatures, ``output_filter``), become a
  well-formed V2 request whose raw tensors decode to exactly the values the TensorProto holds, or a
  client error (INVALID_ARGUMENT / RESOURCE_EXHAUSTED / NOT_FOUND) -- never another exception. With a
  ``max_bytes`` limit the V2 tensors together never exceed it, so a few bytes cannot ask for a huge
  allocation;
* round trips: numpy -> TensorProto -> V2 -> numpy is exact, and so is V2 response -> PredictResponse
  -> numpy (our reading and, where TensorFlow is installed, ``tf.make_ndarray``);
* codec, REST ``:predict`` JSON: any bytes and random documents (row and columnar form, b64 objects,
  huge integers, NaN / Infinity tokens, deep nesting, lone surrogates) against a few model
  signatures give a well-formed V2 request typed by the signature, or a client error;
* the real server: random ``:predict`` bodies and random gRPC Predict payloads (raw bytes through a
  generic call) are answered 2xx / 4xx or a client gRPC status, the workers stay the same processes,
  nothing is logged as a traceback, and a valid request still works afterwards.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import math
import urllib.parse
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from dl_inference.errors import Code, ServerError
from dl_inference.examples import make_example_repository
from dl_inference.protocol.datatypes import V2_DATATYPES, numpy_dtype
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import tf_serving_pb2 as tfs
from dl_inference.protocol.tensors import decode_inputs, serialize_bytes_tensor
from dl_inference.protocol.tfserving import (
    DT_TO_V2,
    V2_TO_DT,
    check_signature,
    infer_to_predict,
    parse_request,
    predict_to_infer,
    requested_version,
)
from dl_inference.protocol.tfserving_json import parse_predict_body, predict_json_to_infer
from tests.fuzz.strategies import (
    BF16,
    INT64_MAX,
    any_text,
    arrays,
    check_client_error,
    huge_ints,
    json_values,
    mutated_bytes,
    nest,
    same_values,
)
from tests.fuzz.test_fuzz_server import BAD_GRPC_CODES, Http
from tests.integration.server import RunningServer, run_server

CLIENT_CODES = {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.NOT_FOUND}
MAX_JSON_DEPTH = 64  # the server's default (setting max_json_depth)


def check_refusal(exc: BaseException) -> None:
    """A client error with one of the codes the TF-Serving translation may answer."""
    check_client_error(exc)
    assert isinstance(exc, ServerError) and exc.code in CLIENT_CODES, f"{exc!r}"


# --------------------------------------------------------------------------------------------------
# an independent reading of a TensorProto (TensorFlow's Tensor::FromProto, minus its padding rules)
# --------------------------------------------------------------------------------------------------

_FIELD_OF: dict[str, str] = {
    "FP32": "float_val",
    "FP64": "double_val",
    "FP16": "half_val",
    "BF16": "half_val",
    "INT8": "int_val",
    "INT16": "int_val",
    "INT32": "int_val",
    "UINT8": "int_val",
    "UINT16": "int_val",
    "INT64": "int64_val",
    "UINT32": "uint32_val",
    "UINT64": "uint64_val",
    "BOOL": "bool_val",
    "BYTES": "string_val",
}


def reference_array(proto: tfs.TensorProto) -> np.ndarray:
    """What a valid TensorProto holds, read with plain numpy."""
    datatype = DT_TO_V2[proto.dtype]
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    count = math.prod(shape)
    if datatype == "BYTES":
        values: list[Any] = list(proto.string_val)
        out = np.empty(count, dtype=np.object_)
        out[:] = values * count if len(values) == 1 else values
        return out.reshape(shape)
    dtype = numpy_dtype(datatype)
    if proto.tensor_content:
        if datatype == "BOOL":  # any non-zero byte is true
            return (np.frombuffer(proto.tensor_content, dtype=np.uint8) != 0).reshape(shape)
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)
    values = list(getattr(proto, _FIELD_OF[datatype]))
    if datatype in ("FP16", "BF16"):
        arr = np.array(values, dtype=np.uint16).view(dtype)
    else:
        arr = np.array(values, dtype=dtype)
    return np.broadcast_to(arr, (count,)).reshape(shape) if len(values) == 1 else arr.reshape(shape)


def check_v2_request(infer: pb.ModelInferRequest, max_bytes: int | None) -> dict[str, np.ndarray]:
    """A well-formed V2 request: one raw entry per input, every raw tensor the size its shape and
    datatype say, serializable; within ``max_bytes``. Returns the decoded inputs."""
    assert len(infer.raw_input_contents) == len(infer.inputs)
    assert pb.ModelInferRequest.FromString(infer.SerializeToString()) == infer
    if max_bytes is not None:
        total = sum(len(raw) for raw in infer.raw_input_contents)
        assert total <= max_bytes, f"{total} bytes of tensors for a limit of {max_bytes}"
    decoded = decode_inputs(infer)  # raises for a size that does not match (a test failure here)
    for tensor in infer.inputs:
        assert tensor.datatype in V2_DATATYPES
        arr = decoded[tensor.name]
        assert arr.shape == tuple(tensor.shape)
        assert arr.dtype == numpy_dtype(tensor.datatype)
    return decoded


# --------------------------------------------------------------------------------------------------
# strategies: TensorProto and PredictRequest
# --------------------------------------------------------------------------------------------------


def rarely(draw: st.DrawFn, one_in: int) -> bool:
    """True about once in ``one_in`` draws; False is the simple case Hypothesis leans to and
    shrinks to (``integers(...) == 0`` would make the rare branch the common one)."""
    return bool(draw(st.sampled_from([False] * (one_in - 1) + [True])))


INT32 = st.integers(-(2**31), 2**31 - 1)
_SUPPORTED_DTYPES = sorted(DT_TO_V2)
dtypes = st.one_of(
    st.sampled_from(_SUPPORTED_DTYPES),
    st.sampled_from(_SUPPORTED_DTYPES),
    st.sampled_from(_SUPPORTED_DTYPES),
    st.sampled_from(_SUPPORTED_DTYPES),
    st.sampled_from(sorted(tfs.DataType.values())),  # complex, quantized, float8, _REF, ...
    INT32,  # proto3 enums are open: numbers with no name reach the server too
)
dims = st.one_of(
    st.integers(0, 4),
    st.integers(0, 4),
    st.sampled_from([-1, -2, 2**31, 2**32, 2**40, 2**61, 2**62, INT64_MAX, -(2**63)]),
)
_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "float_val": st.floats(width=32),
    "double_val": st.floats(),
    "half_val": st.integers(0, 0xFFFF) | INT32,
    "int_val": st.integers(-129, 256) | INT32,
    "int64_val": st.integers(-(2**63), INT64_MAX),
    "uint32_val": st.integers(0, 2**32 - 1),
    "uint64_val": st.integers(0, 2**64 - 1),
    "bool_val": st.booleans(),
    "string_val": st.binary(max_size=8),
    "scomplex_val": st.floats(width=32),
    "dcomplex_val": st.floats(),
}
_ALL_FIELDS = sorted(_FIELD_VALUES)


def _count(proto: tfs.TensorProto) -> int:
    """The element count a test can afford to fill in (small for any shape it cannot)."""
    sizes = [d.size for d in proto.tensor_shape.dim]
    n = math.prod(sizes) if all(d >= 0 for d in sizes) else 1
    return n if n <= 64 else 1


def _values_for(draw: st.DrawFn, field: str, datatype: str | None, n: int) -> list[Any]:
    """``n`` values for ``field``: mostly in range for ``datatype``, sometimes anything the field holds."""
    if datatype is not None and field == "int_val" and not rarely(draw, 4):
        info = np.iinfo(numpy_dtype(datatype))
        element = st.integers(int(info.min), int(info.max))
    elif field == "half_val" and not rarely(draw, 4):
        element = st.integers(0, 0xFFFF)
    else:
        element = _FIELD_VALUES[field]
    return draw(st.lists(element, min_size=n, max_size=n))


@st.composite
def tensor_protos(draw: st.DrawFn) -> tfs.TensorProto:
    proto = tfs.TensorProto()
    proto.dtype = draw(dtypes)  # type: ignore[assignment]
    for size in draw(st.lists(dims, max_size=4)):
        proto.tensor_shape.dim.add(size=size, name=draw(st.sampled_from(["", "", "batch"])))
    if rarely(draw, 10):
        proto.tensor_shape.unknown_rank = True
    if rarely(draw, 10):
        proto.version_number = draw(INT32)
    datatype = DT_TO_V2.get(proto.dtype)
    count = _count(proto)
    how = draw(st.sampled_from(["own", "own", "own", "fill", "content", "content", "other", "mixed", "none"]))
    if how in ("own", "fill", "mixed") and datatype is not None:
        field = _FIELD_OF[datatype]
        n = 1 if how == "fill" else draw(st.sampled_from([count, count, count + 1, max(count - 1, 0), 0]))
        getattr(proto, field).extend(_values_for(draw, field, datatype, n))
    if how in ("content", "mixed"):
        itemsize = 4 if datatype in (None, "BYTES") else numpy_dtype(datatype).itemsize
        right = count * itemsize
        size = draw(
            st.sampled_from([right, right, right + 1, max(right - 1, 0), right + itemsize]) | st.integers(0, 40)
        )
        proto.tensor_content = draw(st.binary(min_size=size, max_size=size))
    if how in ("other", "mixed") or (how == "own" and datatype is None):
        for field in draw(st.lists(st.sampled_from(_ALL_FIELDS), min_size=1, max_size=2, unique=True)):
            getattr(proto, field).extend(_values_for(draw, field, None, draw(st.sampled_from([1, count, 2]))))
    if rarely(draw, 20):
        proto.float8_val = draw(st.binary(min_size=1, max_size=4))
    return proto


input_names = st.sampled_from(["x", "y", "in_FP32", "INPUT0"]) | st.text(max_size=6)
signature_names = st.sampled_from(["", "", "serving_default", "classify", "predict"]) | st.text(max_size=6)
# "\u0661" is ARABIC-INDIC DIGIT ONE: str.isdigit() is true for it, but it is no version number.
version_labels = st.sampled_from(["1", "007", "stable", "", "canary", "99999999999999999999", "\u0661"])
version_labels |= st.text(max_size=4)


@st.composite
def predict_requests(draw: st.DrawFn, models: st.SearchStrategy[str] | None = None) -> tfs.PredictRequest:
    request = tfs.PredictRequest()
    spec = request.model_spec
    spec.name = draw(models if models is not None else st.sampled_from(["m", ""]) | st.text(max_size=6))
    # The model spec is checked first: mostly valid, so that the tensors get checked too.
    if rarely(draw, 8):
        spec.version_label = draw(version_labels)
    elif draw(st.booleans()):
        spec.version.value = draw(st.integers(0, 4) | st.integers(-(2**63), INT64_MAX))
    if rarely(draw, 8):
        spec.signature_name = draw(signature_names)
    for name in draw(
        st.lists(input_names.filter(bool) if not rarely(draw, 10) else input_names, max_size=3, unique=True)
    ):
        request.inputs[name].CopyFrom(draw(tensor_protos()))
    if rarely(draw, 3):
        request.output_filter.extend(
            draw(st.lists(st.sampled_from(["y", "out", ""]) | st.text(max_size=4), max_size=3))
        )
    return request


max_bytes_limits = st.none() | st.integers(0, 4096) | st.sampled_from([96 * 1024 * 1024])


def _affordable(request: tfs.PredictRequest) -> bool:
    """Whether translating ``request`` without a byte limit allocates at most a few MB."""
    for proto in request.inputs.values():
        sizes = [d.size for d in proto.tensor_shape.dim]
        if all(d >= 0 for d in sizes) and math.prod(sizes) > 1 << 18:
            return False
    return True


def translate(request: tfs.PredictRequest, max_bytes: int | None) -> pb.ModelInferRequest | None:
    """What TfServingApi.predict does before the data plane; checks the result or the refusal."""
    try:
        version = requested_version(request.model_spec)
        check_signature(request.model_spec.signature_name, request.model_spec.name)
        infer = predict_to_infer(request, version, max_bytes)
    except Exception as exc:
        check_refusal(exc)
        event(f"refused: {type(exc).__name__}")
        return None
    event("translated")
    assert infer.model_name == request.model_spec.name and infer.model_version == version
    assert [t.name for t in infer.inputs] == sorted(request.inputs)
    assert [o.name for o in infer.outputs] == list(request.output_filter)
    decoded = check_v2_request(infer, max_bytes)
    for tensor in infer.inputs:
        proto = request.inputs[tensor.name]
        assert tensor.datatype == DT_TO_V2[proto.dtype]
        assert list(tensor.shape) == [d.size for d in proto.tensor_shape.dim]
        assert same_values(decoded[tensor.name], reference_array(proto)), tensor.name
    return infer


# --------------------------------------------------------------------------------------------------
# codec: gRPC messages
# --------------------------------------------------------------------------------------------------


def _valid_wire() -> bytes:
    request = tfs.PredictRequest()
    request.model_spec.name = "m"
    request.model_spec.signature_name = "serving_default"
    request.model_spec.version.value = 2
    x = request.inputs["x"]
    x.dtype = tfs.DT_FLOAT
    x.tensor_shape.dim.add(size=2)
    x.tensor_shape.dim.add(size=3)
    x.tensor_content = np.arange(6, dtype=np.float32).tobytes()
    s = request.inputs["s"]
    s.dtype = tfs.DT_STRING
    s.tensor_shape.dim.add(size=2)
    s.string_val.extend([b"a", b"bc"])
    i = request.inputs["i"]
    i.dtype = tfs.DT_INT8
    i.tensor_shape.dim.add(size=3)
    i.int_val.extend([1, -2, 3])
    request.output_filter.append("y")
    return request.SerializeToString()


VALID_WIRE = _valid_wire()


def parse_and_translate(data: bytes, max_bytes: int | None) -> None:
    try:
        request = parse_request(tfs.PredictRequest, data)
    except Exception as exc:
        check_refusal(exc)
        event("undecodable")
        return
    translate(request, max_bytes if max_bytes is not None or _affordable(request) else 1 << 20)


@given(data=st.binary(max_size=300) | mutated_bytes(VALID_WIRE), max_bytes=max_bytes_limits)
# Regression: the gRPC server answered an undecodable Predict with UNKNOWN and logged a traceback.
@example(data=b"\xff\xff", max_bytes=None)
@example(data=VALID_WIRE, max_bytes=None)
def test_predict_request_from_arbitrary_bytes(data: bytes, max_bytes: int | None) -> None:
    parse_and_translate(data, max_bytes)


def _one_input_request(dtype: int, shape: list[int], **fields: Any) -> tfs.PredictRequest:
    request = tfs.PredictRequest()
    request.model_spec.name = "m"
    proto = request.inputs["x"]
    proto.dtype = dtype  # type: ignore[assignment]
    for d in shape:
        proto.tensor_shape.dim.add(size=d)
    for key, value in fields.items():
        if isinstance(value, bytes):
            setattr(proto, key, value)
        else:
            getattr(proto, key).extend(value)
    return request


# Regressions: a few wire bytes of typed values (one byte per int64_val 0) expanded 8x past the
# limit, and tensor_content alone could exceed it, although the docstring promised the inputs
# together never would.
@example(request=_one_input_request(tfs.DT_INT64, [100], int64_val=[0] * 100), max_bytes=64)
@example(request=_one_input_request(tfs.DT_FLOAT, [32], tensor_content=b"\x00" * 128), max_bytes=100)
@example(request=_one_input_request(tfs.DT_STRING, [40], string_val=[b""] * 40), max_bytes=100)
# A shape of 2**40 filled by one value, without and with a limit.
@example(request=_one_input_request(tfs.DT_FLOAT, [2**40], float_val=[1.0]), max_bytes=1 << 20)
@example(request=_one_input_request(tfs.DT_STRING, [2**20, 2**20], string_val=[b"abc"]), max_bytes=96 * 1024 * 1024)
@example(request=_one_input_request(tfs.DT_HALF, [2**62, 2, 0], half_val=[]), max_bytes=None)
@example(request=_one_input_request(tfs.DT_BOOL, [], tensor_content=b"\x02"), max_bytes=None)  # forwarded, read as true
@given(request=predict_requests(), max_bytes=max_bytes_limits)
def test_structured_predict_requests(request: tfs.PredictRequest, max_bytes: int | None) -> None:
    if max_bytes is None and not _affordable(request):
        max_bytes = 1 << 20  # without a limit a huge fill is allowed to allocate: not on this machine
    translate(request, max_bytes)
    assert parse_request(tfs.PredictRequest, request.SerializeToString()) == request


# --------------------------------------------------------------------------------------------------
# round trips with numpy (and TensorFlow's own reader)
# --------------------------------------------------------------------------------------------------


def tensor_proto_of(arr: np.ndarray, datatype: str, typed: bool) -> tfs.TensorProto:
    """``arr`` as a client sends it: ``tensor_content``, or (``typed``) the dtype's value field."""
    proto = tfs.TensorProto()
    proto.dtype = V2_TO_DT[datatype]  # type: ignore[assignment]
    for d in arr.shape:
        proto.tensor_shape.dim.add(size=d)
    flat = arr.ravel()
    if datatype == "BYTES":
        proto.string_val.extend(flat.tolist())
    elif not typed:
        proto.tensor_content = arr.tobytes()
    elif datatype in ("FP16", "BF16"):
        proto.half_val.extend(flat.view(np.uint16).tolist())
    else:
        getattr(proto, _FIELD_OF[datatype]).extend(flat.tolist())
    return proto


def _is_float(datatype: str) -> bool:
    return datatype in ("FP16", "BF16", "FP32", "FP64")


@given(datatype=st.sampled_from(V2_DATATYPES), typed=st.booleans(), data=st.data())
def test_numpy_round_trip_through_predict_request(datatype: str, typed: bool, data: st.DataObject) -> None:
    arr = data.draw(arrays(datatype), label="arr")
    request = tfs.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].CopyFrom(tensor_proto_of(arr, datatype, typed))
    wire = request.SerializeToString()
    infer = predict_to_infer(parse_request(tfs.PredictRequest, wire), "", max_bytes=len(wire) * 8 + 64)
    got = check_v2_request(infer, None)["x"]
    # float_val holds floats as Python floats: a signalling NaN comes back quiet
    assert same_values(got, arr, exact=not (typed and _is_float(datatype))), (got, arr)


_CONTENTS_OF = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@pytest.fixture(scope="module")
def tf() -> Any:
    """TensorFlow when it is installed (its reader is the reference), else None."""
    try:
        import tensorflow
    except ImportError:
        return None
    return tensorflow


@given(
    outputs=st.lists(
        st.tuples(st.sampled_from(["y", "z", "out_1", "y_bytes"]), st.sampled_from(V2_DATATYPES)),
        min_size=1,
        max_size=3,
        unique_by=lambda o: o[0],
    ),
    raw=st.booleans(),
    data=st.data(),
)
def test_v2_response_round_trip_through_predict_response(
    tf: Any, outputs: list[tuple[str, str]], raw: bool, data: st.DataObject
) -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    raw = raw or any(datatype in ("FP16", "BF16") for _, datatype in outputs)  # no typed contents for those
    expected: dict[str, np.ndarray] = {}
    for name, datatype in outputs:
        arr = data.draw(arrays(datatype), label=name)
        tensor = response.outputs.add(name=name, datatype=datatype, shape=arr.shape)
        if raw:
            response.raw_output_contents.append(serialize_bytes_tensor(arr) if datatype == "BYTES" else arr.tobytes())
        else:
            getattr(tensor.contents, _CONTENTS_OF[datatype]).extend(arr.ravel().tolist())
        expected[name] = arr
    wanted = data.draw(st.lists(st.sampled_from([n for n, _ in outputs]), unique=True), label="output_filter")
    predict = infer_to_predict(response, wanted, "m", "serving_default")
    wire = predict.SerializeToString()
    assert sorted(predict.outputs) == sorted(wanted or expected)
    for name, proto in tfs.PredictResponse.FromString(wire).outputs.items():
        arr = expected[name]
        assert DT_TO_V2[proto.dtype] == dict(outputs)[name]
        assert [d.size for d in proto.tensor_shape.dim] == list(arr.shape)
        assert same_values(reference_array(proto), arr)
        if tf is not None:
            from tensorflow.core.framework import tensor_pb2

            nd = tf.make_ndarray(tensor_pb2.TensorProto.FromString(proto.SerializeToString()))
            assert nd.shape == arr.shape
            if arr.dtype == np.object_:
                assert nd.ravel().tolist() == arr.ravel().tolist()
            else:
                assert nd.tobytes() == arr.tobytes(), (nd, arr)


# --------------------------------------------------------------------------------------------------
# codec: REST :predict JSON
# --------------------------------------------------------------------------------------------------

SIGNATURES: dict[str, dict[str, str]] = {
    "one_fp32": {"x": "FP32"},
    "two": {"a": "INT64", "b": "BYTES"},
    "mixed": {"flag": "BOOL", "h": "FP16", "bf": "BF16", "u": "UINT64", "i8": "INT8"},
    "text": {"s": "BYTES"},
}


def metadata_of(inputs: dict[str, str]) -> pb.ModelMetadataResponse:
    meta = pb.ModelMetadataResponse(name="m", versions=["1"], platform="onnxruntime_onnx")
    for name, datatype in inputs.items():
        meta.inputs.add(name=name, datatype=datatype, shape=[-1, -1])
    return meta


# Raw JSON tokens written into a document in place of a placeholder string (json.dumps cannot).
TOKENS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1E400", "123456789012345678901234567890",
          "-0", "4.9e-324", "1e-400", "nan", "inf", "0x10", "01", "1.", ".5", "+1", "undefined"]  # fmt: skip


def _token(i: int) -> str:
    return f"\x00T{i}\x00"


b64_objects = st.one_of(
    st.binary(max_size=8).map(lambda b: {"b64": base64.b64encode(b).decode()}),
    st.fixed_dictionaries({"b64": json_values | any_text}),
    st.sampled_from([{"b64": "not base64!"}, {"b64": "YQ"}, {"b64": "é"}, {"b64": "YQ==", "x": 1}, {"B64": "YQ=="}]),
)
any_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-300, 300),
    huge_ints,
    huge_ints.map(lambda v: -v),
    st.floats(),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, 65520.0, 3.5e38, 5e-324, -0.0]),
    any_text,
    b64_objects,
    st.sampled_from(range(len(TOKENS))).map(_token),
    st.dictionaries(any_text, st.integers(), max_size=2),
)


def good_leaves(datatype: str) -> st.SearchStrategy[Any]:
    """JSON values that fit ``datatype`` (mostly)."""
    if datatype == "BYTES":
        return st.text(max_size=6) | st.binary(max_size=6).map(lambda b: {"b64": base64.b64encode(b).decode()})
    if datatype == "BOOL":
        return st.booleans()
    dtype = numpy_dtype(datatype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return st.integers(int(info.min), int(info.max))
    return st.floats(width=16 if datatype == "FP16" else 32) | st.integers(-1000, 1000)


def _reshape(flat: list[Any], shape: list[int]) -> Any:
    if not shape:
        return flat[0]
    step = math.prod(shape[1:])
    return [_reshape(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


@st.composite
def tensor_values(draw: st.DrawFn, leaves: st.SearchStrategy[Any], shape: list[int] | None = None) -> Any:
    """A nested JSON array of ``shape`` (drawn when None), sometimes made ragged or deep."""
    if shape is None:
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
    flat = draw(st.lists(leaves, min_size=math.prod(shape), max_size=math.prod(shape)))
    value = _reshape(flat, shape)
    how = draw(st.sampled_from(["plain"] * 18 + ["ragged", "deep"]))
    if how == "ragged" and isinstance(value, list):
        value.append(draw(leaves) if draw(st.booleans()) else [])  # ragged, or a list among values
    elif how == "deep":
        value = nest(value, draw(st.integers(MAX_JSON_DEPTH - 8, MAX_JSON_DEPTH + 4)))
    return value


@st.composite
def predict_docs(draw: st.DrawFn, inputs: dict[str, str]) -> Any:
    """A ``:predict`` document for a model with ``inputs``, valid or not."""
    names = list(inputs)
    if rarely(draw, 5):
        names = draw(st.lists(st.sampled_from(names) | st.text(max_size=4), max_size=3, unique=True))

    def leaves_of(name: str) -> st.SearchStrategy[Any]:
        datatype = inputs.get(name)
        return good_leaves(datatype) if datatype and not rarely(draw, 5) else any_leaves

    form = draw(st.sampled_from(["instances"] * 4 + ["inputs"] * 4 + ["both", "neither", "other"]))
    doc: dict[str, Any] = {}
    if form in ("inputs", "both"):
        if len(names) == 1 and draw(st.booleans()):
            doc["inputs"] = draw(tensor_values(leaves_of(names[0])))
        else:
            doc["inputs"] = {name: draw(tensor_values(leaves_of(name))) for name in names}
    if form in ("instances", "both"):
        rows = draw(st.integers(1, 3)) if not rarely(draw, 10) else 0
        shapes = {name: draw(st.lists(st.integers(0, 3), max_size=2)) for name in names}
        if len(names) == 1 and draw(st.booleans()):
            doc["instances"] = [draw(tensor_values(leaves_of(names[0]), shapes[names[0]])) for _ in range(rows)]
        else:
            doc["instances"] = [
                {name: draw(tensor_values(leaves_of(name), shapes[name])) for name in names} for _ in range(rows)
            ]
    if form == "other":
        doc[draw(st.sampled_from(["instances", "inputs"]))] = draw(json_values)
    if rarely(draw, 4):
        doc["signature_name"] = draw(signature_names if not rarely(draw, 5) else json_values)
    if rarely(draw, 20):
        doc[draw(any_text)] = draw(json_values)
    if rarely(draw, 30):
        return draw(json_values)  # not an object, mostly
    return doc


def dump(doc: Any, ensure_ascii: bool = True) -> bytes:
    """``doc`` as JSON text (NaN / Infinity allowed), placeholders replaced by their raw tokens."""
    text = json.dumps(doc, ensure_ascii=ensure_ascii)
    if "\\u0000T" in text:
        for i, token in enumerate(TOKENS):
            text = text.replace(json.dumps(_token(i)), token)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def predict_bodies(draw: st.DrawFn, inputs: dict[str, str]) -> bytes:
    how = draw(st.sampled_from(["doc"] * 6 + ["bytes", "json", "mutate"]))
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "json":
        return dump(draw(json_values))
    body = dump(draw(predict_docs(inputs)), ensure_ascii=not rarely(draw, 5))
    return draw(mutated_bytes(body)) if how == "mutate" else body


def translate_json(body: bytes, model: str, inputs: dict[str, str]) -> pb.ModelInferRequest | None:
    """What TfServingApi.predict_json does before the data plane; checks the result or the refusal."""
    try:
        parsed = parse_predict_body(body, MAX_JSON_DEPTH)
        check_signature(parsed.signature_name, model)
        infer = predict_json_to_infer(parsed, metadata_of(inputs), model, "1")
    except Exception as exc:
        check_refusal(exc)
        event(f"refused: {type(exc).__name__}")
        return None
    event("translated")
    assert infer.model_name == model and infer.model_version == "1"
    check_v2_request(infer, None)
    for tensor in infer.inputs:
        assert tensor.datatype == inputs[tensor.name]
        if parsed.row:
            assert tensor.shape[0] == len(parsed.data)
    return infer


@given(model=st.sampled_from(sorted(SIGNATURES)), data=st.data())
# Regression: a lone surrogate in signature_name was quoted in an error message that is not UTF-8.
@example(model="one_fp32", data=b'{"signature_name": "\\ud800", "inputs": [1]}')
@example(model="two", data=b'{"inputs": {"a": [1], "\\udfff": [2]}}')
@example(model="text", data=b'{"inputs": {"s": [{"b64": "\\u00e9"}]}}')
@example(
    model="mixed", data=b'{"instances": [{"flag": true, "h": 1e999, "bf": NaN, "u": 18446744073709551615, "i8": -128}]}'
)
def test_predict_json_bodies(model: str, data: st.DataObject | bytes) -> None:
    inputs = SIGNATURES[model]
    body = data if isinstance(data, bytes) else data.draw(predict_bodies(inputs), label="body")
    translate_json(body, model, inputs)


@st.composite
def valid_tensors(draw: st.DrawFn, inputs: dict[str, str], rows: int | None) -> dict[str, np.ndarray]:
    """One array per input; every first dimension ``rows`` when given (the row form). A 0 dimension
    comes last only: JSON writes a [0, 2] array as [], which reads back as [0]."""
    out = {}
    for name, datatype in inputs.items():
        rest = draw(st.lists(st.integers(1, 3), max_size=2))
        if rarely(draw, 5):
            rest.append(0)
        shape = tuple(rest if rows is None else [rows, *rest])
        out[name] = draw(arrays(datatype, shape))
    return out


def json_of(arr: np.ndarray) -> Any:
    if arr.dtype == np.object_:
        flat = [{"b64": base64.b64encode(v).decode()} for v in arr.ravel().tolist()]
        return _reshape(flat, list(arr.shape)) if arr.shape else flat[0]
    return (arr.astype(np.float32) if arr.dtype == BF16 else arr).tolist()


@given(model=st.sampled_from(sorted(SIGNATURES)), row=st.booleans(), data=st.data())
def test_predict_json_round_trip(model: str, row: bool, data: st.DataObject) -> None:
    inputs = SIGNATURES[model]
    rows = data.draw(st.integers(1, 3)) if row else None
    tensors = data.draw(valid_tensors(inputs, rows), label="tensors")
    values = {name: json_of(arr) for name, arr in tensors.items()}
    if row:
        assert rows is not None
        if len(values) == 1 and data.draw(st.booleans()):
            doc: dict[str, Any] = {"instances": next(iter(values.values()))}
        else:
            doc = {"instances": [{name: value[i] for name, value in values.items()} for i in range(rows)]}
    else:
        doc = {"inputs": next(iter(values.values())) if len(values) == 1 else values}
    infer = translate_json(dump(doc), model, inputs)
    assert infer is not None
    decoded = decode_inputs(infer)
    for name, arr in tensors.items():
        assert same_values(decoded[name], arr, exact=False), (name, decoded[name], arr)


# --------------------------------------------------------------------------------------------------
# the real server
# --------------------------------------------------------------------------------------------------

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
MODELS = ["simple", "identity_all", "add_sub", "image_classifier", "versioned"]
_E2E = settings(  # ci: 300 requests per transport; long: a quarter of FUZZ_EXAMPLES, at most 5,000
    max_examples=max(300, min(5000, settings().max_examples // 4)),
    suppress_health_check=list(HealthCheck),
    deadline=None,
)
Signature = dict[str, tuple[str, list[int]]]  # input name -> (V2 datatype, shape with -1 dims)


@pytest.fixture(scope="module")
def tfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("tfs_fuzz_repo")
    make_example_repository(repo)
    with run_server(repo, tmp_path_factory.mktemp("tfs_fuzz_logs") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def signatures(tfs_server: RunningServer) -> dict[str, Signature]:
    conn = http.client.HTTPConnection("127.0.0.1", tfs_server.http_port, timeout=30)
    out = {}
    for model in MODELS:
        conn.request("GET", f"/v2/models/{model}")
        meta = json.loads(conn.getresponse().read())
        out[model] = {t["name"]: (t["datatype"], list(t["shape"])) for t in meta["inputs"]}
    conn.close()
    return out


@st.composite
def served_tensors(draw: st.DrawFn, signature: Signature) -> dict[str, np.ndarray]:
    """Arrays that fit ``signature`` (its -1 dimensions drawn, the first one shared: the batch)."""
    batch = draw(st.integers(1, 2))
    out = {}
    for name, (datatype, shape) in signature.items():
        concrete = [
            batch if i == 0 and d < 0 else (draw(st.integers(0, 3)) if d < 0 else d) for i, d in enumerate(shape)
        ]
        out[name] = draw(arrays(datatype, tuple(concrete), utf8=True))
    return out


def _segment(draw: st.DrawFn, text: str) -> str:
    """A URL path segment for ``text``; rarely percent-encoded bytes that are not UTF-8 text."""
    if rarely(draw, 10):
        return urllib.parse.quote_from_bytes(draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\x00", b"%"])))
    return urllib.parse.quote(text, safe="")


RestRequest = tuple[str, str, bytes, dict[str, str]]  # method, path, body, headers


@st.composite
def rest_requests(draw: st.DrawFn, signatures: dict[str, Signature]) -> RestRequest:
    """A TF-Serving REST request: mostly ``:predict`` on a served model, its body valid or not."""
    model = draw(st.text(min_size=1, max_size=6)) if rarely(draw, 10) else draw(st.sampled_from(MODELS))
    path = "/v1/models/" + _segment(draw, model)
    if rarely(draw, 5):
        path += "/versions/" + draw(st.sampled_from(["1", "2", "3", "0", "01", "-1", "x", "99999999999999999999"]))
    elif rarely(draw, 8):
        path += "/labels/" + _segment(draw, draw(version_labels) or "l")
    wrong_method = rarely(draw, 30)  # 405
    if rarely(draw, 10):
        return ("POST" if wrong_method else "GET"), path + draw(st.sampled_from(["", "/metadata"])), b"", {}
    method = draw(st.sampled_from(["classify", "regress", "explain", "Predict", ""])) if rarely(draw, 10) else "predict"
    signature = signatures.get(model, signatures["simple"])
    if not rarely(draw, 2):
        tensors = draw(served_tensors(signature))
        values = {name: json_of(arr) for name, arr in tensors.items()}
        if draw(st.booleans()):
            rows = len(next(iter(tensors.values())))
            body = dump({"instances": [{k: v[i] for k, v in values.items()} for i in range(rows)]})
        else:
            body = dump({"inputs": next(iter(values.values())) if len(values) == 1 else values})
    else:
        body = draw(predict_bodies({name: datatype for name, (datatype, _) in signature.items()}))
    headers = {"Content-Type": "application/json"}
    if rarely(draw, 10):  # a compressed body, sometimes not really compressed
        body = gzip.compress(body) if draw(st.booleans()) else body
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "identity", "x-what"]))
    return ("GET" if wrong_method else "POST"), f"{path}:{method}", body, headers


def check_rest_answer(method: str, path: str, status: int, headers: dict[str, str], data: bytes) -> None:
    what = f"{method} {path}"
    if status == 501:  # :classify and :regress need a TensorFlow classification/regression signature
        assert path.endswith((":classify", ":regress")), f"501 for {what}: {data[:300]!r}"
    else:
        assert status < 500, f"{status} for {what}: {data[:300]!r}"
    assert headers.get("content-type", "").startswith("application/json"), (what, headers)
    doc = json.loads(data)  # NaN / Infinity allowed: TF-Serving writes them
    assert isinstance(doc, dict), doc
    if status >= 400:
        assert isinstance(doc.get("error"), str) and doc["error"], doc
    elif method == "POST":
        assert status == 200 and ("predictions" in doc or "outputs" in doc), (status, doc)


def _http_request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def assert_tfs_healthy(srv: RunningServer, pids: list[int]) -> None:
    """A valid request works on both transports, same workers, no traceback logged."""
    body = json.dumps({"instances": [[0.5] * 16]}).encode()
    status, _, data = Http(srv.http_port).post("/v1/models/simple:predict", body, {})
    assert status == 200, data
    assert np.array(json.loads(data)["predictions"]).shape == (1, 4)
    reply = grpc_call(srv, PREDICT, simple_predict().SerializeToString())
    assert isinstance(reply, bytes), reply
    assert [d.size for d in tfs.PredictResponse.FromString(reply).outputs["y"].tensor_shape.dim] == [1, 4]
    assert sorted(srv.worker_pids()) == sorted(pids), "a worker died during the fuzz"
    log = srv.log()
    assert "Traceback" not in log, log[-3000:]


def test_rest_fuzz(tfs_server: RunningServer, signatures: dict[str, Signature]) -> None:
    pids = tfs_server.worker_pids()
    client = Http(tfs_server.http_port)

    @_E2E
    @given(req=rest_requests(signatures))
    @example(req=("POST", "/v1/models/simple:predict", b'{"signature_name": "\\udc00", "instances": [[1]]}', {}))
    @example(req=("POST", "/v1/models/identity_all/labels/stable:predict", b"{}", {}))
    @example(req=("POST", "/v1/models/simple:classify", b'{"instances": [[1]]}', {}))
    @example(req=("POST", "/v1/models/%ED%A0%80/labels/%FF:predict", b"{}", {}))
    def run(req: RestRequest) -> None:
        method, path, body, headers = req
        if method == "GET" or not body:
            status, answer_headers, data = _http_request(tfs_server.http_port, method, path)
        else:
            status, answer_headers, data = client.post(path, body, headers)
        check_rest_answer(method, path, status, answer_headers, data)
        event(f"{method} {status}")

    run()
    assert_tfs_healthy(tfs_server, pids)


_channels: dict[int, grpc.Channel] = {}


def grpc_call(srv: RunningServer, method: str, payload: bytes) -> bytes | grpc.RpcError:
    channel = _channels.get(srv.grpc_port)
    if channel is None:
        channel = _channels[srv.grpc_port] = grpc.insecure_channel(srv.grpc_url)
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        reply: bytes = call(payload, timeout=20)
    except grpc.RpcError as exc:
        return exc
    return reply


def simple_predict() -> tfs.PredictRequest:
    request = tfs.PredictRequest()
    request.model_spec.name = "simple"
    request.inputs["x"].CopyFrom(tensor_proto_of(np.ones((1, 16), np.float32), "FP32", typed=False))
    return request


@st.composite
def grpc_payloads(draw: st.DrawFn, signatures: dict[str, Signature]) -> tuple[str, bytes]:
    """(method path, payload): Predict mostly, valid, broken, mutated or random bytes."""
    model = draw(st.sampled_from(MODELS))
    signature = signatures[model]
    if rarely(draw, 10):  # the other two methods, with random or mutated bytes
        method = draw(st.sampled_from([GET_MODEL_METADATA, GET_MODEL_STATUS]))
        base = tfs.GetModelStatusRequest(model_spec=tfs.ModelSpec(name=model))
        if method == GET_MODEL_METADATA:
            base = tfs.GetModelMetadataRequest(model_spec=base.model_spec, metadata_field=["signature_def"])
        return method, draw(st.binary(max_size=60) | mutated_bytes(base.SerializeToString()))
    valid = tfs.PredictRequest()
    valid.model_spec.name = model
    if model == "versioned" and draw(st.booleans()):
        valid.model_spec.version.value = draw(st.integers(0, 4))
    for name, arr in draw(served_tensors(signature)).items():
        datatype = signature[name][0]
        valid.inputs[name].CopyFrom(tensor_proto_of(arr, datatype, typed=draw(st.booleans())))
    how = draw(st.sampled_from(["valid", "tensor", "tensor", "message", "mutate", "bytes"]))
    if how == "bytes":
        return PREDICT, draw(st.binary(max_size=200))
    if how == "mutate":
        return PREDICT, draw(mutated_bytes(valid.SerializeToString()))
    if how == "message":
        request = draw(predict_requests(st.sampled_from(MODELS) | st.text(max_size=4)))
        if draw(st.booleans()):  # named like the model's inputs, so the worker gets to check them
            for proto, name in zip(list(request.inputs.values()), signature):
                valid.inputs[name].CopyFrom(proto)
            request = valid
        return PREDICT, request.SerializeToString()
    if how == "tensor":  # one input replaced by a random TensorProto
        name = draw(st.sampled_from(sorted(signature)))
        valid.inputs[name].CopyFrom(draw(tensor_protos()))
    if rarely(draw, 5):
        valid.output_filter.extend(draw(st.lists(st.sampled_from(["y", "out_FP32", "zz", ""]), max_size=2)))
    if rarely(draw, 5):
        valid.model_spec.signature_name = draw(signature_names)
    return PREDICT, valid.SerializeToString()


def test_grpc_fuzz(tfs_server: RunningServer, signatures: dict[str, Signature]) -> None:
    pids = tfs_server.worker_pids()

    @_E2E
    @given(call=grpc_payloads(signatures))
    # Regression: undecodable bytes were answered UNKNOWN, with a traceback in the server's log.
    @example(call=(PREDICT, b"\xff\xff"))
    @example(call=(GET_MODEL_METADATA, b"\x0a\x05\x0a\x01"))
    @example(call=(GET_MODEL_STATUS, b"\x80"))
    def run(call: tuple[str, bytes]) -> None:
        method, payload = call
        result = grpc_call(tfs_server, method, payload)
        if isinstance(result, grpc.RpcError):
            code = result.code()
            assert code not in BAD_GRPC_CODES, f"{code}: {result.details()} for {method} {payload[:200]!r}"
            assert result.details()
            event(f"{method.rsplit('/', 1)[1]} {code.name}")
        elif method == PREDICT:
            tfs.PredictResponse.FromString(result)
            event("Predict OK")

    run()
    assert_tfs_healthy(tfs_server, pids)
