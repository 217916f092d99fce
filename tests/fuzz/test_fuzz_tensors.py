"""Property-based fuzzing of V2 protobuf tensor decoding (``dl_inference.protocol.tensors``) and of
the gateway's routing peek into serialized requests (``dl_inference.protocol.wire.route_fields``).

Property: valid input gives arrays of exactly the declared shape and dtype; invalid input raises
InvalidArgument (4xx); nothing else ever escapes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st

from dl_inference.protocol.datatypes import V2_DATATYPES, numpy_dtype
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.tensors import (
    decode_inputs,
    deserialize_bytes_tensor,
    raw_to_numpy,
    serialize_bytes_tensor,
    tensor_to_raw,
)
from dl_inference.protocol.wire import route_fields
from tests.fuzz.strategies import (
    arrays,
    check_client_error,
    infer_requests,
    mutated_bytes,
    pb_datatypes,
    pb_shapes,
    raw_for,
    same_values,
)


def _check_decoded(request: pb.ModelInferRequest, decoded: dict[str, np.ndarray]) -> None:
    assert list(decoded) == [t.name for t in request.inputs]
    for tensor in request.inputs:
        arr = decoded[tensor.name]
        assert arr.shape == tuple(tensor.shape), (arr.shape, list(tensor.shape))
        assert arr.dtype == numpy_dtype(tensor.datatype)
        if tensor.datatype == "BYTES":
            assert all(isinstance(v, bytes) for v in arr.ravel().tolist())


def _regression(datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    request.inputs.add(name="t", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _contents_regression(datatype: str, shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    request.inputs.add(name="t", datatype=datatype, shape=shape)
    return request


@given(request=infer_requests())
# Regressions: each raised numpy's ValueError/MemoryError (a worker-side crash) before the fix.
@example(request=_regression("FP32", [2**62, 4, 0], b""))  # product beyond 2**63 with a 0 dimension
@example(request=_regression("BYTES", [2**40], b""))  # 8 TiB object array allocated for 0 bytes
@example(request=_regression("BYTES", [2**33, 2**33], b"\x00" * 4))  # count beyond numpy's limit
@example(request=_contents_regression("FP16", [2**40, 2**40, 0]))  # empty FP16 of an impossible shape
def test_decode_inputs(request: pb.ModelInferRequest) -> None:
    try:
        decoded = decode_inputs(request)
    except Exception as exc:
        check_client_error(exc)
        return
    _check_decoded(request, decoded)


@st.composite
def _raw_cases(draw: st.DrawFn) -> tuple[bytes, str, list[int]]:
    datatype = draw(pb_datatypes)
    shape = draw(pb_shapes)
    return draw(raw_for(datatype, shape)), datatype, shape


@given(case=_raw_cases(), as_view=st.booleans())
@example(case=(b"", "INT64", [2**33, 2**33, 0]), as_view=False)
@example(case=(b"\x01\x00\x00\x00", "BYTES", [2**63 - 1]), as_view=True)
def test_raw_to_numpy(case: tuple[bytes, str, list[int]], as_view: bool) -> None:
    raw, datatype, shape = case
    try:
        arr = raw_to_numpy(memoryview(raw) if as_view else raw, datatype, shape, "t")
    except Exception as exc:
        check_client_error(exc, ("'t'",))
        return
    assert arr.shape == tuple(shape)
    assert arr.dtype == numpy_dtype(datatype)
    if datatype == "BOOL":  # any non-zero byte is true, normalised to 1
        assert (arr.ravel() == (np.frombuffer(raw, np.uint8) != 0)).all()
    elif datatype != "BYTES":
        assert arr.tobytes() == raw


@given(datatype=st.sampled_from(V2_DATATYPES), data=st.data())
def test_valid_raw_tensors_round_trip(datatype: str, data: st.DataObject) -> None:
    arr = data.draw(arrays(datatype), label="array")
    raw = tensor_to_raw(arr, datatype)
    request = pb.ModelInferRequest()
    request.inputs.add(name="t", datatype=datatype, shape=arr.shape)
    request.raw_input_contents.append(raw)
    decoded = decode_inputs(pb.ModelInferRequest.FromString(request.SerializeToString()))["t"]
    assert same_values(decoded, arr)


@given(values=st.lists(st.binary(max_size=20), max_size=8), cut=st.integers(0, 200), extra=st.binary(max_size=6))
def test_bytes_framing(values: list[bytes], cut: int, extra: bytes) -> None:
    arr = np.empty(len(values), dtype=np.object_)
    arr[:] = values
    raw = serialize_bytes_tensor(arr)
    assert deserialize_bytes_tensor(raw, len(values), "t").tolist() == values
    for broken, count in ((raw[:cut], len(values)), (raw + extra, len(values)), (raw, len(values) + 1)):
        if broken == raw and count == len(values):
            continue
        try:
            got = deserialize_bytes_tensor(broken, count, "t")
        except Exception as exc:
            check_client_error(exc, ("'t'",))
        else:  # a shorter buffer can still be a valid framing of the same count only if equal
            assert len(got) == count


def _valid_request() -> bytes:
    request = pb.ModelInferRequest(model_name="simple", model_version="1", id="r")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    request.parameters["p"].int64_param = 3
    return request.SerializeToString()


@given(payload=st.binary(max_size=200) | mutated_bytes(_valid_request()))
@example(payload=b"\x0b")  # a group start (wire type 3): refused, as protobuf's own parser may not
@example(payload=b"\x0a\x02\xc3\x28")  # model_name that is not UTF-8
def test_route_fields_agrees_with_protobuf(payload: bytes) -> None:
    try:
        name, version = route_fields(payload)
    except Exception as exc:
        check_client_error(exc, ("ModelInferRequest",))
        return
    try:
        message = pb.ModelInferRequest.FromString(payload)
    except DecodeError:
        return  # the worker refuses it with InvalidArgument (test_fuzz_runner)
    assert (name, version) == (message.model_name, message.model_version)


@given(request=infer_requests())
def test_serialized_requests_decode_the_same_after_a_round_trip(request: pb.ModelInferRequest) -> None:
    """What the gateway forwards is the client's bytes: decoding after FromString is the same."""
    again = pb.ModelInferRequest.FromString(request.SerializeToString())
    results: list[Any] = []
    for message in (request, again):
        try:
            results.append(decode_inputs(message))
        except Exception as exc:
            check_client_error(exc)
            results.append(type(exc))
    first, second = results
    if isinstance(first, dict):
        assert isinstance(second, dict) and list(first) == list(second)
        for name in first:
            assert same_values(second[name], first[name]) or math.prod(first[name].shape) == 0
    else:
        assert first is second
