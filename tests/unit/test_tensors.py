"""Unit tests for dl_inference.protocol.tensors (proto <-> numpy), checked against tritonclient."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils as tcutils
from tritonclient.grpc import service_pb2 as tc_pb
from tritonclient.grpc._utils import _get_inference_request as tc_grpc_request

from dl_inference.errors import InternalError, InvalidArgument
from dl_inference.protocol.datatypes import numpy_dtype
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.tensors import (
    build_response,
    decode_inputs,
    deserialize_bytes_tensor,
    raw_to_numpy,
    response_to_numpy,
    serialize_bytes_tensor,
    set_parameter,
    tensor_to_raw,
)

BF16 = np.dtype(ml_dtypes.bfloat16)


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """A deterministic array of ``datatype`` with extreme values where meaningful."""
    n = int(np.prod(shape))
    if datatype == "BOOL":
        return (np.arange(n) % 3 == 0).reshape(shape)
    if datatype == "BYTES":
        values = [b"", b"abc", b"\xff\x00\xfe", "héllo".encode(), b"x" * 300, b"\x00"]
        return np.array([values[i % len(values)] for i in range(n)], dtype=np.object_).reshape(shape)
    if datatype == "BF16":
        return (np.arange(n, dtype=np.float32) * 0.5 - 1).astype(BF16).reshape(shape)
    dtype: Any = numpy_dtype(datatype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        base = [info.min, info.max, 0, 1, info.max - 1, info.min + 1]
        return np.array([base[i % len(base)] for i in range(n)], dtype=dtype).reshape(shape)
    return (np.arange(n) * 1.25 - 2).astype(dtype).reshape(shape)


ALL_TYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BF16",
    "BYTES",
]
TYPED_CONTENTS_TYPES = [t for t in ALL_TYPES if t not in ("FP16", "BF16")]


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    if a.dtype == np.object_ or b.dtype == np.object_:
        assert a.tolist() == b.tolist()
    else:
        assert a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------------------------
# BYTES serialization
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arr",
    [
        np.array([b"a", b"", b"\xff\xfe\x00", b"long" * 100], dtype=np.object_),
        np.array([["x", "é"], ["", "z"]], dtype=np.object_),
        np.array([b"abc", b"de"], dtype=np.bytes_),
        np.array([], dtype=np.object_),
        np.array([[b"a"], [b"b"]], dtype=np.object_).T,  # non-contiguous view
    ],
)
def test_serialize_bytes_matches_tritonclient(arr: np.ndarray) -> None:
    ours = serialize_bytes_tensor(arr)
    theirs = tcutils.serialize_byte_tensor(arr)
    assert ours == (theirs.item() if theirs.size else b"")
    back = deserialize_bytes_tensor(ours, arr.size, "t")
    assert back.dtype == np.object_
    expected = [x.encode() if isinstance(x, str) else bytes(x) for x in arr.ravel().tolist()]
    assert back.tolist() == expected
    if arr.size:
        assert tcutils.deserialize_bytes_tensor(ours).tolist() == expected


def test_serialize_bytes_layout_and_other_objects() -> None:
    assert serialize_bytes_tensor(np.array([b"ab", b""], dtype=object)) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert serialize_bytes_tensor(np.array(["ab", "é"], dtype=np.str_)) == (
        b"\x02\x00\x00\x00ab\x02\x00\x00\x00\xc3\xa9"
    )
    assert serialize_bytes_tensor(np.array([7, bytearray(b"q")], dtype=object)) == (
        b"\x01\x00\x00\x007\x01\x00\x00\x00q"
    )


def test_deserialize_bytes_accepts_memoryview() -> None:
    buf = serialize_bytes_tensor(np.array([b"one", b"", b"three"], dtype=object))
    out = deserialize_bytes_tensor(memoryview(b"junk" + buf)[4:], 3, "t")
    assert out.tolist() == [b"one", b"", b"three"]
    assert all(type(v) is bytes for v in out)


@pytest.mark.parametrize(
    ("buf", "count", "fragment"),
    [
        (b"\x02\x00\x00", 1, "truncated"),
        (b"\x05\x00\x00\x00abc", 1, "truncated"),
        (b"\x01\x00\x00\x00a", 2, "truncated"),
        (b"\x01\x00\x00\x00ab", 1, "trailing"),
        (b"\x01\x00\x00\x00a\x00\x00\x00\x00", 1, "trailing"),
        (b"\x00", 0, "trailing"),
    ],
)
def test_deserialize_bytes_errors_name_tensor(buf: bytes, count: int, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment) as info:
        deserialize_bytes_tensor(buf, count, "my_text")
    assert "my_text" in info.value.message


# ------------------------------------------------------------------------------------------------
# raw <-> numpy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_raw_roundtrip_every_datatype(datatype: str) -> None:
    arr = sample(datatype)
    raw = tensor_to_raw(arr, datatype)
    if datatype == "BYTES":
        assert raw == tcutils.serialize_byte_tensor(arr).item()
    else:
        assert raw == np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
        assert len(raw) == arr.size * arr.dtype.itemsize
    back = raw_to_numpy(raw, datatype, list(arr.shape), "x")
    assert_same(back, arr)
    assert back.shape == (2, 3)


def test_raw_is_little_endian_and_bool_one_byte() -> None:
    assert tensor_to_raw(np.array([1, 256], dtype=np.int32), "INT32") == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert tensor_to_raw(np.array([1, 256], dtype=">i4"), "INT32") == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert tensor_to_raw(np.array([True, False, True]), "BOOL") == b"\x01\x00\x01"
    assert tensor_to_raw(np.array([1.0], dtype=np.float32), "FP32") == b"\x00\x00\x80\x3f"
    # Fortran-ordered input is written row-major.
    f = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    assert tensor_to_raw(f, "INT16") == np.arange(6, dtype=np.int16).tobytes()


def test_tensor_to_raw_casts_same_kind_and_rejects_unsafe() -> None:
    assert tensor_to_raw(np.array([1, 2], dtype=np.int64), "INT32") == np.array([1, 2], np.int32).tobytes()
    with pytest.raises(InvalidArgument, match="cannot convert"):
        tensor_to_raw(np.array([1.5]), "INT32")
    with pytest.raises(InvalidArgument, match="unknown datatype"):
        tensor_to_raw(np.array([1.5]), "FP8")


def test_raw_to_numpy_byte_count_message() -> None:
    with pytest.raises(InvalidArgument) as info:
        raw_to_numpy(b"\x00" * 60, "FP32", [1, 16], "x")
    assert info.value.message == "input 'x': expected 64 bytes for shape [1,16] FP32, got 60"
    with pytest.raises(InvalidArgument, match="output 'y': expected 2 bytes"):
        raw_to_numpy(b"\x00", "FP16", [1], "y", kind="output")


def test_raw_to_numpy_zero_copy_readonly_and_memoryview() -> None:
    raw = np.arange(4, dtype=np.float32).tobytes()
    arr = raw_to_numpy(raw, "FP32", [2, 2], "x")
    assert not arr.flags.writeable
    assert np.shares_memory(arr, np.frombuffer(raw, dtype=np.uint8))
    mv = memoryview(b"\xaa" + raw)[1:]
    assert raw_to_numpy(mv, "FP32", [4], "x").tolist() == [0.0, 1.0, 2.0, 3.0]


def test_raw_to_numpy_errors() -> None:
    with pytest.raises(InvalidArgument, match=r"input 'x'.*negative"):
        raw_to_numpy(b"", "FP32", [-1, 2], "x")
    with pytest.raises(InvalidArgument, match=r"input 'x'.*unknown datatype 'FLOAT'"):
        raw_to_numpy(b"", "FLOAT", [0], "x")
    with pytest.raises(InvalidArgument, match=r"input 's'.*truncated"):
        raw_to_numpy(b"\x01\x00\x00\x00a", "BYTES", [2], "s")


def test_raw_to_numpy_empty_and_scalar() -> None:
    assert raw_to_numpy(b"", "FP32", [0, 5], "x").shape == (0, 5)
    assert raw_to_numpy(b"", "BYTES", [3, 0], "x").shape == (3, 0)
    assert raw_to_numpy(b"\x07", "UINT8", [], "x").shape == ()


def test_bool_noncanonical_bytes_are_normalized() -> None:
    arr = raw_to_numpy(b"\x00\x02\x01\xff", "BOOL", [4], "b")
    assert arr.dtype == np.bool_
    assert arr.tolist() == [False, True, True, True]
    assert (arr == np.array([False, True, True, True])).all()


# ------------------------------------------------------------------------------------------------
# decode_inputs
# ------------------------------------------------------------------------------------------------


def _tc_request(arrays: dict[str, tuple[np.ndarray, str]]) -> pb.ModelInferRequest:
    """Build a request with the stock gRPC client's own encoder and re-parse it as our message."""
    inputs = []
    for name, (arr, datatype) in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    tc = tc_grpc_request(
        model_name="m",
        inputs=inputs,
        model_version="",
        request_id="r1",
        outputs=None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )
    return pb.ModelInferRequest.FromString(tc.SerializeToString())


def test_decode_inputs_from_tritonclient_every_datatype() -> None:
    arrays = {f"in_{t.lower()}": (sample(t), t) for t in ALL_TYPES}
    request = _tc_request(arrays)
    assert len(request.raw_input_contents) == len(ALL_TYPES)
    decoded = decode_inputs(request)
    assert list(decoded) == list(arrays)
    for name, (arr, _) in arrays.items():
        assert_same(decoded[name], arr)


def _typed_request(name: str, datatype: str, arr: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(arr.shape))
    field = {
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
    }[datatype]
    getattr(tensor.contents, field).extend(arr.ravel().tolist())
    return request


@pytest.mark.parametrize("datatype", TYPED_CONTENTS_TYPES)
def test_decode_inputs_typed_contents_every_datatype(datatype: str) -> None:
    arr = sample(datatype)
    decoded = decode_inputs(_typed_request("x", datatype, arr))
    assert_same(decoded["x"], arr)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_decode_inputs_half_types_only_raw(datatype: str) -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="h", datatype=datatype, shape=[2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidArgument, match=rf"input 'h': {datatype}.*raw"):
        decode_inputs(request)


def test_decode_inputs_typed_count_mismatch() -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="v", datatype="FP32", shape=[2, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(InvalidArgument) as info:
        decode_inputs(request)
    assert "input 'v'" in info.value.message
    assert "expected 4 elements" in info.value.message and "got 3" in info.value.message


@pytest.mark.parametrize(
    ("datatype", "field", "value"),
    [
        ("INT8", "int_contents", 128),
        ("INT8", "int_contents", -129),
        ("INT16", "int_contents", 40000),
        ("UINT8", "uint_contents", 300),
        ("UINT16", "uint_contents", 70000),
    ],
)
def test_decode_inputs_typed_out_of_range(datatype: str, field: str, value: int) -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="n", datatype=datatype, shape=[2])
    getattr(tensor.contents, field).extend([0, value])
    with pytest.raises(InvalidArgument, match=f"input 'n': value {value} is out of range for {datatype}"):
        decode_inputs(request)


def test_decode_inputs_wrong_contents_field() -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="w", datatype="FP32", shape=[1])
    tensor.contents.int_contents.append(1)
    with pytest.raises(InvalidArgument, match="input 'w': datatype FP32 expects fp32_contents, got int_contents"):
        decode_inputs(request)


def test_decode_inputs_mixing_raw_and_contents() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    b = request.inputs.add(name="b", datatype="FP32", shape=[1])
    b.contents.fp32_contents.append(1.0)
    request.raw_input_contents.extend([np.float32(1).tobytes(), np.float32(2).tobytes()])
    with pytest.raises(InvalidArgument, match=r"input 'b'.*mixed"):
        decode_inputs(request)


def test_decode_inputs_raw_count_mismatch() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.inputs.add(name="b", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.float32(1).tobytes())
    with pytest.raises(InvalidArgument, match=r"expected 2 raw_input_contents entries.*got 1"):
        decode_inputs(request)


def test_decode_inputs_raw_size_mismatch_names_input() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="img", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(b"\x00" * 60)
    with pytest.raises(InvalidArgument) as info:
        decode_inputs(request)
    assert info.value.message == "input 'img': expected 64 bytes for shape [1,16] FP32, got 60"


def test_decode_inputs_duplicate_negative_unnamed_missing() -> None:
    request = pb.ModelInferRequest()
    request.inputs.add(name="a", datatype="INT8", shape=[1])
    request.inputs.add(name="a", datatype="INT8", shape=[1])
    request.raw_input_contents.extend([b"\x01", b"\x02"])
    with pytest.raises(InvalidArgument, match="input 'a' is given more than once"):
        decode_inputs(request)

    request = pb.ModelInferRequest()
    request.inputs.add(name="neg", datatype="INT8", shape=[-1])
    with pytest.raises(InvalidArgument, match=r"input 'neg'.*negative"):
        decode_inputs(request)
    request.raw_input_contents.append(b"")
    with pytest.raises(InvalidArgument, match=r"input 'neg'.*negative"):
        decode_inputs(request)

    request = pb.ModelInferRequest()
    request.inputs.add(name="", datatype="INT8", shape=[1])
    with pytest.raises(InvalidArgument, match="position 0 has no name"):
        decode_inputs(request)

    request = pb.ModelInferRequest()
    request.inputs.add(name="nodata", datatype="INT32", shape=[3])
    with pytest.raises(InvalidArgument, match=r"input 'nodata': expected 3 elements.*got 0"):
        decode_inputs(request)

    request = pb.ModelInferRequest()
    request.inputs.add(name="bad", datatype="STRING", shape=[1])
    with pytest.raises(InvalidArgument, match="input 'bad': unknown datatype 'STRING'"):
        decode_inputs(request)


def test_decode_inputs_empty_tensors_and_no_inputs() -> None:
    assert decode_inputs(pb.ModelInferRequest()) == {}
    request = pb.ModelInferRequest()
    request.inputs.add(name="e", datatype="FP16", shape=[0, 4])
    assert decode_inputs(request)["e"].shape == (0, 4)


# ------------------------------------------------------------------------------------------------
# responses and parameters
# ------------------------------------------------------------------------------------------------


def test_build_response_roundtrip_and_tritonclient_as_numpy() -> None:
    outputs = [(f"out_{t.lower()}", sample(t, (3, 2))) for t in ALL_TYPES]
    response = build_response("model", "3", "req-9", outputs, {"flag": True})
    assert response.model_name == "model" and response.model_version == "3" and response.id == "req-9"
    assert [o.name for o in response.outputs] == [n for n, _ in outputs]
    assert [o.datatype for o in response.outputs] == ALL_TYPES
    assert all(list(o.shape) == [3, 2] for o in response.outputs)
    assert len(response.raw_output_contents) == len(outputs)

    decoded = response_to_numpy(response)
    for name, arr in outputs:
        assert_same(decoded[name], arr)

    # The stock gRPC client decodes the very same bytes.
    tc_response = tc_pb.ModelInferResponse.FromString(response.SerializeToString())
    result = grpcclient.InferResult(tc_response)
    for name, arr in outputs:
        got = result.as_numpy(name)
        assert got.shape == arr.shape
        if arr.dtype == np.object_:
            assert got.tolist() == arr.tolist()
        else:
            assert got.tobytes() == arr.tobytes()


def test_build_response_parameters_every_type() -> None:
    inner = pb.InferParameter(string_param="copied")
    response = build_response(
        "m",
        "",
        "",
        [],
        {"b": False, "i": -5, "u": 2**64 - 1, "d": 0.25, "s": "text", "p": inner},
    )
    p = response.parameters
    assert p["b"].WhichOneof("parameter_choice") == "bool_param" and p["b"].bool_param is False
    assert p["i"].int64_param == -5
    assert p["u"].WhichOneof("parameter_choice") == "uint64_param" and p["u"].uint64_param == 2**64 - 1
    assert p["d"].double_param == 0.25
    assert p["s"].string_param == "text"
    assert p["p"].string_param == "copied"


def test_set_parameter_rejects_bad_values() -> None:
    request = pb.ModelInferRequest()
    with pytest.raises(InvalidArgument, match=r"'big'.*64 bits"):
        set_parameter(request.parameters, "big", 2**64)
    with pytest.raises(InvalidArgument, match=r"'lst'.*list"):
        set_parameter(request.parameters, "lst", [1])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="'none'"):
        set_parameter(request.parameters, "none", None)  # type: ignore[arg-type]
    assert len(request.parameters) == 0
    set_parameter(request.parameters, "neg", -(2**63))
    assert request.parameters["neg"].int64_param == -(2**63)


def test_build_response_accepts_str_arrays_as_bytes() -> None:
    response = build_response("m", "1", "", [("s", np.array(["a", "bé"]))])
    assert response.outputs[0].datatype == "BYTES"
    assert response_to_numpy(response)["s"].tolist() == [b"a", "bé".encode()]


def test_response_to_numpy_typed_contents_and_errors() -> None:
    response = pb.ModelInferResponse(model_name="m")
    out = response.outputs.add(name="o", datatype="INT64", shape=[2])
    out.contents.int64_contents.extend([1, -2])
    s = response.outputs.add(name="s", datatype="BYTES", shape=[1])
    s.contents.bytes_contents.append(b"\xff")
    decoded = response_to_numpy(response)
    assert decoded["o"].dtype == np.int64 and decoded["o"].tolist() == [1, -2]
    assert decoded["s"].tolist() == [b"\xff"]

    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="o", datatype="INT64", shape=[1])
    response.outputs.add(name="p", datatype="INT64", shape=[1])
    response.raw_output_contents.append(b"\x00" * 8)
    with pytest.raises(InternalError):
        response_to_numpy(response)
