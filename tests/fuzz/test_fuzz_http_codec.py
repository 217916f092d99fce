"""Property-based fuzzing of the HTTP JSON/binary codec (``dl_inference.protocol.http_codec``).

Properties:

* any body, any ``Inference-Header-Content-Length``: ``parse_infer_request`` returns a request that
  serializes and whose inputs decode (or fail to decode with a client error), or raises a client
  error (4xx ServerError) -- never another exception, never InternalError;
* a valid request broken in one way fails with an error naming the broken tensor or field;
* valid requests (tritonclient's encoding, or JSON/binary mixed) round-trip exactly, and so do
  responses rendered with ``render_infer_response`` and read back by tritonclient.

The TF-Serving translation (gRPC and REST) is fuzzed in test_fuzz_tfserving.py.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from dl_inference.errors import InternalError, InvalidArgument
from dl_inference.protocol.datatypes import V2_DATATYPES, numpy_dtype
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.http_codec import OutputPolicy, parse_infer_request, render_infer_response
from dl_inference.protocol.tensors import build_response, decode_inputs
from tests.fuzz.strategies import (
    BF16,
    BREAKS,
    HttpCase,
    arrays,
    broken_http_cases,
    check_client_error,
    json_values,
    names,
    same_values,
    shapes,
    valid_http_cases,
)


def parse_and_check(body: bytes, header_length: Any, fragments: tuple[str, ...] = ()) -> pb.ModelInferRequest | None:
    """Parse; a success must be a well-formed request whose inputs decode or fail as a client error."""
    try:
        request, policy = parse_infer_request(body, header_length, "model", "1")
    except Exception as exc:
        check_client_error(exc, fragments)
        return None
    assert isinstance(policy, OutputPolicy)
    assert len(request.raw_input_contents) == len(request.inputs)
    # The gateway serializes the request for the worker: that must work and round-trip.
    assert pb.ModelInferRequest.FromString(request.SerializeToString()) == request
    try:
        decoded = decode_inputs(request)
    except Exception as exc:
        check_client_error(exc, fragments)
        return request
    for tensor in request.inputs:
        arr = decoded[tensor.name]
        assert arr.shape == tuple(tensor.shape)
        assert arr.dtype == numpy_dtype(tensor.datatype)
    return request


# --------------------------------------------------------------------------------------------------
# arbitrary input
# --------------------------------------------------------------------------------------------------


header_lengths = st.none() | st.integers(-3, 64) | st.sampled_from([2**31, 2**63, -(2**63), 10**30])


@given(body=st.binary(max_size=300), header_length=header_lengths)
@example(body=b'{"id": "\\ud800", "inputs": []}', header_length=None)  # bug: lone surrogate -> 500
@example(body=b"", header_length=0)
@example(body=b"{}", header_length=3)
def test_parse_arbitrary_bytes(body: bytes, header_length: int | None) -> None:
    parse_and_check(body, header_length)


@given(doc=json_values, header_length=st.none() | st.integers(0, 3))
def test_parse_arbitrary_json_documents(doc: Any, header_length: int | None) -> None:
    body = json.dumps(doc).encode()
    parse_and_check(body + b"\x00" * (header_length or 0), None if header_length is None else len(body))


@given(
    inputs=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "name": json_values | names,
                "datatype": json_values | st.sampled_from(V2_DATATYPES),
                "shape": json_values | shapes.map(list),
                "data": json_values,
                "parameters": json_values
                | st.fixed_dictionaries({}, optional={"binary_data_size": json_values, "binary_data": json_values}),
            },
        ),
        max_size=3,
    ),
    outputs=json_values,
    params=json_values,
    tail=st.binary(max_size=12),
)
def test_parse_wrong_types_for_every_field(inputs: list[Any], outputs: Any, params: Any, tail: bytes) -> None:
    doc = {"inputs": inputs, "outputs": outputs, "parameters": params}
    header = json.dumps(doc).encode()
    parse_and_check(header, None)
    parse_and_check(header + tail, len(header))


# --------------------------------------------------------------------------------------------------
# valid requests broken one way: the error names what was broken
# --------------------------------------------------------------------------------------------------

# Regressions found by this test (each was a 500 or a worker-side crash before the fix).
_SURROGATE_NAME = HttpCase(
    {"inputs": [{"name": "\ud800", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, fragments=("position 0",)
)
_SURROGATE_BYTES = HttpCase(
    {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": ["\udc00"]}]}, fragments=("'s'",)
)
_SURROGATE_PARAM = HttpCase(
    {"parameters": {"\ud800": "\udfff"}, "inputs": [{"name": "x", "datatype": "INT8", "shape": [0], "data": []}]},
    fragments=("request parameter",),
)
_SURROGATE_OUTPUT = HttpCase(
    {"inputs": [{"name": "x", "datatype": "INT8", "shape": [0], "data": []}], "outputs": [{"name": "\udbff"}]},
    fragments=("output at position 0",),
)
_SHAPE_BEYOND_INT64 = HttpCase(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**63], "data": []}]}, fragments=("'x'",)
)
_SHAPE_PRODUCT_OVERFLOW = HttpCase(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**62, 4, 0], "data": []}]}, fragments=("'x'",)
)
_BYTES_HUGE_COUNT = HttpCase(
    {"inputs": [{"name": "b", "datatype": "BYTES", "shape": [2**40], "parameters": {"binary_data_size": 0}}]},
    chunks=[b""],
    fragments=("'b'",),
)
_BYTES_COUNT_TOO_BIG_FOR_NUMPY = HttpCase(
    {"inputs": [{"name": "b", "datatype": "BYTES", "shape": [2**33, 2**33], "parameters": {"binary_data_size": 4}}]},
    chunks=[b"\x00" * 4],
    fragments=("'b'",),
)


@pytest.mark.parametrize("kind", BREAKS)
@settings(max_examples=max(10, settings.default.max_examples // 4))  # 13 kinds: a quarter each
@given(data=st.data())
def test_parse_broken_requests_each_way(kind: str, data: st.DataObject) -> None:
    case = data.draw(broken_http_cases(kind=kind), label="case")
    body, header_length = case.body()
    request = parse_and_check(body, header_length, case.fragments)
    event("parsed" if request is not None else "refused")


@given(case=broken_http_cases())
@example(case=_SURROGATE_NAME)
@example(case=_SURROGATE_BYTES)
@example(case=_SURROGATE_PARAM)
@example(case=_SURROGATE_OUTPUT)
@example(case=_SHAPE_BEYOND_INT64)
@example(case=_SHAPE_PRODUCT_OVERFLOW)
@example(case=_BYTES_HUGE_COUNT)
@example(case=_BYTES_COUNT_TOO_BIG_FOR_NUMPY)
def test_parse_broken_requests(case: HttpCase) -> None:
    body, header_length = case.body()
    event(case.what)
    parse_and_check(body, header_length, case.fragments)


# --------------------------------------------------------------------------------------------------
# valid requests round-trip
# --------------------------------------------------------------------------------------------------


@given(case=valid_http_cases())
def test_valid_requests_round_trip(case: HttpCase) -> None:
    body, header_length = case.body()
    request, policy = parse_infer_request(body, header_length, "model", "1")
    decoded = decode_inputs(request)
    assert case.expected is not None
    assert list(decoded) == list(case.expected)
    for name, (want, binary) in case.expected.items():
        assert same_values(decoded[name], want, exact=binary), (name, decoded[name], want)
    params = case.doc.get("parameters", {})
    assert policy.binary_data_output is params.get("binary_data_output", False)
    for key, value in params.items():
        if key != "binary_data_output":
            got = request.parameters[key]
            assert getattr(got, got.WhichOneof("parameter_choice")) == value or value != value
    if "id" in case.doc:
        assert request.id == case.doc["id"]
    assert [o.name for o in request.outputs] == [o["name"] for o in case.doc.get("outputs", [])]


@st.composite
def tritonclient_inputs(draw: st.DrawFn) -> tuple[list[httpclient.InferInput], dict[str, np.ndarray]]:
    tensors = draw(st.lists(st.tuples(names, st.sampled_from(V2_DATATYPES)), min_size=1, max_size=4))
    inputs, arrays_by_name = [], {}
    for name, datatype in {n: d for n, d in tensors}.items():
        binary = datatype == "BF16" or draw(st.booleans())
        arr = draw(arrays(datatype, utf8=not binary))
        inp = httpclient.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
        arrays_by_name[name] = (arr, binary)
    return inputs, arrays_by_name


@given(data=tritonclient_inputs(), request_id=st.text(max_size=5), binary_out=st.booleans())
def test_tritonclient_requests_round_trip(data: Any, request_id: str, binary_out: bool) -> None:
    inputs, expected = data
    outputs = [httpclient.InferRequestedOutput("out", binary_data=binary_out)]
    body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs, outputs, request_id=request_id)
    request, policy = parse_infer_request(bytes(body), header_length, "model", "1")
    assert request.id == request_id
    assert policy.is_binary("out") is binary_out
    decoded = decode_inputs(request)
    for name, (want, binary) in expected.items():
        assert same_values(decoded[name], want, exact=binary), (name, decoded[name], want)


@st.composite
def outputs_and_policy(draw: st.DrawFn) -> tuple[list[tuple[str, np.ndarray]], OutputPolicy]:
    tensors = draw(st.lists(st.tuples(names, st.sampled_from(V2_DATATYPES)), min_size=1, max_size=4))
    outs = [(name, draw(arrays(datatype))) for name, datatype in {n: d for n, d in tensors}.items()]
    policy = OutputPolicy(
        binary_data_output=draw(st.booleans()),
        binary_outputs={n: draw(st.booleans()) for n, _ in outs if draw(st.booleans())},
    )
    return outs, policy


@given(data=outputs_and_policy(), request_id=st.text(max_size=5))
@example(data=([("u", np.array([2**63 + 1, 0], np.uint64))], OutputPolicy()), request_id="")  # JSON ints > 2**63
def test_responses_round_trip_through_tritonclient(data: Any, request_id: str) -> None:
    outs, policy = data
    response = build_response("model", "1", request_id, outs)
    body, header_length = render_infer_response(response, policy)
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)
    header = json.loads(body if header_length is None else body[:header_length])
    entries = {o["name"]: o for o in header["outputs"]}
    for name, want in outs:
        entry = entries[name]
        assert entry["shape"] == list(want.shape)
        sent_binary = "data" not in entry
        if want.dtype == np.object_:
            utf8 = all(_is_utf8(v) for v in want.ravel().tolist())
            assert sent_binary is (policy.is_binary(name) or not utf8)
            got = result.as_numpy(name)
            got_bytes = [v.encode() if isinstance(v, str) else v for v in got.ravel().tolist()]
            assert got_bytes == want.ravel().tolist()
            continue
        assert sent_binary is policy.is_binary(name)
        if sent_binary:
            got = result.as_numpy(name)
            assert got.tobytes() == want.tobytes()
        else:
            is_float = want.dtype.kind == "f" or want.dtype == BF16
            got = np.array(entry["data"], dtype=np.float64 if is_float else want.dtype)  # ints exactly
            got = got.astype(want.dtype).reshape(want.shape)
            assert same_values(got, want, exact=False), (name, got, want)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@given(shape=shapes, datatype=st.sampled_from(V2_DATATYPES))
def test_empty_and_scalar_shapes_json(shape: tuple[int, ...], datatype: str) -> None:
    """Zero-size and 0-d tensors: JSON data of prod(shape) elements parses to that exact shape."""
    n = math.prod(shape)
    value: Any = {"BOOL": True, "BYTES": "a"}.get(datatype, 1)
    doc = {"inputs": [{"name": "t", "datatype": datatype, "shape": list(shape), "data": [value] * n}]}
    request, _ = parse_infer_request(json.dumps(doc).encode(), None, "m", "1")
    arr = decode_inputs(request)["t"]
    assert arr.shape == shape


def test_check_client_error_rejects_other_exceptions() -> None:
    """Sanity check of the property helper itself."""
    for bad in (ValueError("x"), InternalError("x"), InvalidArgument("names nothing")):
        try:
            check_client_error(bad, ("'x'",))
        except AssertionError:
            continue
        raise AssertionError(f"check_client_error accepted {bad!r}")
    check_client_error(InvalidArgument("input 'x': bad"), ("'x'",))
