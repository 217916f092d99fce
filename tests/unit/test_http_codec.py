"""Unit tests for dl_inference.protocol.http_codec, using tritonclient.http's own encoders/decoders."""

from __future__ import annotations

import json
import math
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as httpclient

from dl_inference.errors import InternalError, InvalidArgument, ServerError
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.http_codec import (
    OutputPolicy,
    json_to_parameters,
    parameters_to_json,
    parse_infer_request,
    render_error,
    render_infer_response,
)
from dl_inference.protocol.tensors import build_response, decode_inputs, serialize_bytes_tensor

BF16 = np.dtype(ml_dtypes.bfloat16)

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
NP_TYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": BF16,
    "BYTES": np.object_,
}


def sample(datatype: str, shape: tuple[int, ...] = (2, 3), utf8: bool = False) -> np.ndarray:
    """Deterministic test data; integer types include their extreme values."""
    n = math.prod(shape)
    if datatype == "BOOL":
        return (np.arange(n) % 2 == 0).reshape(shape)
    if datatype == "BYTES":
        values = [b"", b"abc", "héllo ✓".encode(), b"x" * 70]
        if not utf8:
            values.append(b"\xff\x00\xfe")
        return np.array([values[i % len(values)] for i in range(n)], dtype=np.object_).reshape(shape)
    dtype = np.dtype(NP_TYPES[datatype])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        base = [info.min, info.max, 0, 1, info.max - 1, info.min + 1]
        return np.array([base[i % len(base)] for i in range(n)], dtype=dtype).reshape(shape)
    return (np.arange(n, dtype=np.float32) * 0.5 - 1.25).astype(dtype).reshape(shape)


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    if a.dtype == np.object_ or b.dtype == np.object_:
        assert [x.encode() if isinstance(x, str) else x for x in a.ravel().tolist()] == [
            x.encode() if isinstance(x, str) else x for x in b.ravel().tolist()
        ]
    else:
        assert a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()


def tc_body(
    inputs: list[httpclient.InferInput],
    outputs: list[httpclient.InferRequestedOutput] | None = None,
    **kwargs: Any,
) -> tuple[bytes, int | None]:
    """A request body built by the stock HTTP client."""
    body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs, outputs, **kwargs)
    return bytes(body), header_length


def tc_input(name: str, arr: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    inp = httpclient.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr, binary_data=binary)
    return inp


def parse(body: bytes | str | dict, header_length: int | None = None, **kwargs: Any) -> Any:
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    return parse_infer_request(body, header_length, "model", "1", **kwargs)


def tensor(name: str, datatype: str, shape: list[int], data: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data, **extra}


def expect_error(body: Any, fragment: str, header_length: int | None = None, **kwargs: Any) -> str:
    with pytest.raises(InvalidArgument) as info:
        parse(body, header_length, **kwargs)
    assert fragment in info.value.message, info.value.message
    return info.value.message


# ------------------------------------------------------------------------------------------------
# requests built by tritonclient
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_tritonclient_binary_input_every_datatype(datatype: str) -> None:
    arr = sample(datatype)
    body, header_length = tc_body([tc_input("x", arr, datatype, True)])
    assert header_length is not None
    request, policy = parse(body, header_length)
    assert request.model_name == "model" and request.model_version == "1"
    assert request.inputs[0].datatype == datatype and list(request.inputs[0].shape) == [2, 3]
    assert "binary_data_size" not in request.inputs[0].parameters
    assert len(request.raw_input_contents) == 1
    assert_same(decode_inputs(request)["x"], arr)
    # No outputs requested: tritonclient asks for binary outputs request-wide.
    assert policy.binary_data_output is True
    assert "binary_data_output" not in request.parameters


@pytest.mark.parametrize("datatype", [t for t in ALL_TYPES if t != "BF16"])
def test_tritonclient_json_input_every_datatype(datatype: str) -> None:
    arr = sample(datatype, utf8=True)
    body, header_length = tc_body([tc_input("x", arr, datatype, False)])
    assert header_length is None
    request, _ = parse(body, header_length)
    assert_same(decode_inputs(request)["x"], arr)


def test_json_input_bf16_from_numbers() -> None:
    arr = sample("BF16")
    request, _ = parse({"inputs": [tensor("x", "BF16", [2, 3], arr.astype(np.float32).tolist())]})
    assert_same(decode_inputs(request)["x"], arr)


def test_tritonclient_mixed_inputs_outputs_and_parameters() -> None:
    a = sample("FP32", (1, 4))
    b = sample("BYTES", (3,))
    c = sample("INT64", (2, 2))
    d = sample("BYTES", (2,), utf8=True)
    inputs = [
        tc_input("a", a, "FP32", True),
        tc_input("c", c, "INT64", False),
        tc_input("b", b, "BYTES", True),
        tc_input("d", d, "BYTES", False),
    ]
    outputs = [
        httpclient.InferRequestedOutput("o_bin", binary_data=True),
        httpclient.InferRequestedOutput("o_json", binary_data=False),
        httpclient.InferRequestedOutput("o_cls", binary_data=False, class_count=3),
    ]
    body, header_length = tc_body(
        inputs,
        outputs,
        request_id="req-7",
        sequence_id=42,
        sequence_start=True,
        sequence_end=False,
        priority=2,
        timeout=1000,
        parameters={"s": "v", "f": 0.5, "i": -3, "t": True},
    )
    request, policy = parse(body, header_length)
    assert request.id == "req-7"
    params = request.parameters
    assert params["sequence_id"].int64_param == 42
    assert params["sequence_start"].bool_param is True
    assert params["sequence_end"].WhichOneof("parameter_choice") == "bool_param"
    assert params["priority"].int64_param == 2
    assert params["timeout"].int64_param == 1000
    assert params["s"].string_param == "v"
    assert params["f"].double_param == 0.5
    assert params["i"].int64_param == -3
    assert params["t"].bool_param is True
    assert "binary_data_output" not in params

    decoded = decode_inputs(request)
    assert list(decoded) == ["a", "c", "b", "d"]
    for name, arr in {"a": a, "b": b, "c": c, "d": d}.items():
        assert_same(decoded[name], arr)

    assert [o.name for o in request.outputs] == ["o_bin", "o_json", "o_cls"]
    assert all("binary_data" not in o.parameters for o in request.outputs)
    assert request.outputs[2].parameters["classification"].int64_param == 3
    assert policy.binary_data_output is False
    assert policy.is_binary("o_bin") and not policy.is_binary("o_json") and not policy.is_binary("o_cls")


def test_tritonclient_string_sequence_id() -> None:
    body, header_length = tc_body([tc_input("a", sample("INT8"), "INT8", True)], sequence_id="seq-a")
    request, _ = parse(body, header_length)
    assert request.parameters["sequence_id"].string_param == "seq-a"


# ------------------------------------------------------------------------------------------------
# JSON data
# ------------------------------------------------------------------------------------------------


def test_nested_and_flat_json_data_agree() -> None:
    nested = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    flat = list(range(1, 9))
    r1, _ = parse({"inputs": [tensor("x", "INT32", [2, 2, 2], nested)]})
    r2, _ = parse({"inputs": [tensor("x", "INT32", [2, 2, 2], flat)]})
    assert r1.raw_input_contents[0] == r2.raw_input_contents[0] == np.arange(1, 9, dtype=np.int32).tobytes()
    r3, _ = parse({"inputs": [tensor("s", "BYTES", [2, 2], [["a", ""], ["é", "d"]])]})
    assert decode_inputs(r3)["s"].tolist() == [[b"a", b""], ["é".encode(), b"d"]]
    r4, _ = parse({"inputs": [tensor("b", "BOOL", [2, 1], [[True], [False]])]})
    assert r4.raw_input_contents[0] == b"\x01\x00"


def test_nested_data_only_total_count_matters() -> None:
    request, _ = parse({"inputs": [tensor("x", "FP32", [4], [[1, 2], [3, 4]])]})
    assert decode_inputs(request)["x"].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "fragment"),
    [
        ("FP32", [2, 2], [1, 2, 3], "input 'x': expected 4 elements for shape [2,2] FP32, got 3"),
        ("BYTES", [3], ["a", "b"], "input 'x': expected 3 elements for shape [3] BYTES, got 2"),
        ("INT32", [1, 3], [[1, 2], [3]], "input 'x': 'data' is not a rectangular array"),
        ("BYTES", [3], [["a", "b"], ["c"]], "input 'x': 'data' is not a rectangular array"),
        ("FP32", [3], [1, [2], 3], "input 'x': 'data' is not a rectangular array"),
        ("FP32", [1], 1.5, "input 'x': 'data' must be an array, got number"),
        ("UINT8", [2], [1, 300], "input 'x': value 300 is out of range for UINT8 [0, 255]"),
        ("UINT8", [2], [-1, 3], "input 'x': value -1 is out of range for UINT8"),
        ("INT8", [1], [128], "input 'x': value 128 is out of range for INT8 [-128, 127]"),
        ("INT16", [1], [-40000], "out of range for INT16"),
        ("UINT32", [1], [2**32], "out of range for UINT32"),
        ("INT64", [1], [2**63], "input 'x': value 9223372036854775808 is out of range for INT64"),
        ("UINT64", [2], [1, 2**64], "input 'x': value 18446744073709551616 is out of range for UINT64"),
        ("INT32", [2], [1, 2.5], "input 'x': INT32 data must be integers, got number 2.5"),
        ("INT32", [2], [True, False], "input 'x': INT32 data must be integers, got boolean True"),
        ("INT32", [2], [1, "2"], "input 'x': INT32 data must be integers, got string '2'"),
        ("FP32", [2], [1.0, None], "input 'x': FP32 data must be numbers, got null"),
        ("FP32", [2], ["1.0", 2], "input 'x': FP32 data must be numbers, got string"),
        ("FP64", [1], [{"a": 1}], "input 'x': FP64 data must be numbers, got object"),
        ("FP32", [1], [True], "FP32 data must be numbers, got boolean"),
        ("BOOL", [2], [True, 1], "input 'x': BOOL data must be JSON booleans, got number 1"),
        ("BOOL", [1], ["true"], "BOOL data must be JSON booleans, got string"),
        ("BYTES", [2], ["a", 1], "input 'x': BYTES data must be JSON strings, got number 1"),
        ("BYTES", [1], [None], "BYTES data must be JSON strings, got null"),
        ("FP16", [2], [1.0, 70000.0], "input 'x': value 70000.0 is out of range for FP16"),
        ("FP32", [1], [1e39], "input 'x': value 1e+39 is out of range for FP32"),
        ("BF16", [1], [-1e39], "out of range for BF16"),
        ("FP64", [1], [10**400], "out of range for FP64"),
    ],
)
def test_json_data_errors_name_the_tensor(datatype: str, shape: list[int], data: Any, fragment: str) -> None:
    expect_error({"inputs": [tensor("x", datatype, shape, data)]}, fragment)


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("UINT64", [1, 2**63, 2**64 - 1], np.array([1, 2**63, 2**64 - 1], dtype=np.uint64)),
        ("INT64", [-(2**63), 2**63 - 1], np.array([-(2**63), 2**63 - 1], dtype=np.int64)),
        ("UINT8", [0, 255], np.array([0, 255], dtype=np.uint8)),
        ("FP32", [1, 2.5], np.array([1, 2.5], dtype=np.float32)),
        ("FP64", [10**20, 0.1], np.array([1e20, 0.1])),
        ("FP16", [65504, -0.5], np.array([65504, -0.5], dtype=np.float16)),
    ],
)
def test_json_numeric_edge_values(datatype: str, data: list[Any], expected: np.ndarray) -> None:
    request, _ = parse({"inputs": [tensor("x", datatype, [len(data)], data)]})
    assert_same(decode_inputs(request)["x"], expected)


def test_json_non_finite_floats_allowed() -> None:
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[3],"data":[NaN, Infinity, -Infinity]}]}'
    request, _ = parse(body)
    value = decode_inputs(request)["x"]
    assert np.isnan(value[0]) and value[1] == np.inf and value[2] == -np.inf
    expect_error(body.replace(b"FP32", b"INT32"), "INT32 data must be integers")


def test_json_empty_tensors() -> None:
    request, _ = parse(
        {
            "inputs": [
                tensor("a", "INT8", [0], []),
                tensor("b", "BYTES", [2, 0], [[], []]),
                tensor("c", "BOOL", [0, 3], []),
            ]
        }
    )
    decoded = decode_inputs(request)
    assert decoded["a"].shape == (0,) and decoded["b"].shape == (2, 0) and decoded["c"].shape == (0, 3)


# ------------------------------------------------------------------------------------------------
# binary extension
# ------------------------------------------------------------------------------------------------


def binary_request(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, int]:
    text = json.dumps(header).encode()
    return text + b"".join(chunks), len(text)


def test_binary_extension_mixed_with_json_data() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    s = np.array([b"\xff", b""], dtype=object)
    s_raw = serialize_bytes_tensor(s)
    header = {
        "id": "abc",
        "inputs": [
            tensor("json1", "INT16", [2], [5, -5]),
            {
                "name": "a",
                "datatype": "FP32",
                "shape": [2, 3],
                "parameters": {"binary_data_size": a.nbytes, "custom": "keep"},
            },
            {"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(s_raw)}},
            tensor("json2", "BOOL", [1], [True]),
        ],
        "outputs": [{"name": "o", "parameters": {"binary_data": True}}],
    }
    body, header_length = binary_request(header, a.tobytes(), s_raw)
    request, policy = parse(body, header_length)
    assert request.id == "abc"
    decoded = decode_inputs(request)
    assert decoded["json1"].tolist() == [5, -5]
    assert_same(decoded["a"], a)
    assert decoded["s"].tolist() == [b"\xff", b""]
    assert decoded["json2"].tolist() == [True]
    assert parameters_to_json(request.inputs[1].parameters) == {"custom": "keep"}
    assert policy.is_binary("o") and not policy.is_binary("other")


def test_binary_zero_size_input() -> None:
    header = {"inputs": [{"name": "e", "datatype": "FP32", "shape": [0], "parameters": {"binary_data_size": 0}}]}
    body, header_length = binary_request(header)
    request, _ = parse(body, header_length)
    assert request.raw_input_contents[0] == b""


def _bin_input(name: str, size: Any, datatype: str = "UINT8", shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": datatype,
        "shape": shape if shape is not None else [size if isinstance(size, int) else 1],
        "parameters": {"binary_data_size": size},
    }


def test_binary_size_errors() -> None:
    body, hl = binary_request({"inputs": [_bin_input("a", 4), _bin_input("b", 4)]}, b"\x00" * 6)
    expect_error(body, "input 'b': binary_data_size 4 runs past the end of the binary data", hl)

    body, hl = binary_request({"inputs": [_bin_input("a", 4)]}, b"\x00" * 5)
    expect_error(body, "binary data sizes of the inputs add up to 4 bytes but 5 bytes follow", hl)

    body, hl = binary_request({"inputs": [tensor("j", "INT8", [1], [1])]}, b"\x00")
    expect_error(body, "add up to 0 bytes but 1 bytes follow", hl)

    body, hl = binary_request({"inputs": [_bin_input("a", 8, "FP32", [3])]}, b"\x00" * 8)
    expect_error(body, "input 'a': expected 12 bytes for shape [3] FP32, got 8", hl)

    for bad in (-1, 1.5, "4", True, [1]):
        body, hl = binary_request({"inputs": [_bin_input("a", bad, shape=[1])]}, b"\x00")
        expect_error(body, "input 'a': binary_data_size must be a non-negative integer", hl)

    expect_error({"inputs": [_bin_input("a", 1)]}, "no Inference-Header-Content-Length")

    both = {"inputs": [{**_bin_input("a", 1), "data": [1]}]}
    body, hl = binary_request(both, b"\x01")
    expect_error(body, "input 'a': has both 'data' and parameters.binary_data_size", hl)

    expect_error({"inputs": [{"name": "a", "datatype": "INT8", "shape": [1]}]}, "input 'a': has neither")

    expect_error(b'{"inputs":[]}', "exceeds the request body size", 100)
    expect_error(b'{"inputs":[]}', "non-negative integer", -1)


def test_header_length_zero_raw_binary_request() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    request, policy = parse(arr.tobytes(), 0, raw_input=("raw_in", "FP32", [3, 4]))
    assert [i.name for i in request.inputs] == ["raw_in"]
    assert_same(decode_inputs(request)["raw_in"], arr)
    assert policy.binary_data_output is True and policy.is_binary("anything")

    raw = serialize_bytes_tensor(np.array([b"a", b"\xff"], dtype=object))
    request, _ = parse(raw, 0, raw_input=("s", "BYTES", [2]))
    assert decode_inputs(request)["s"].tolist() == [b"a", b"\xff"]

    expect_error(arr.tobytes(), "raw binary request", 0)
    expect_error(arr.tobytes()[:-4], "input 'raw_in': expected 48 bytes for shape [3,4] FP32, got 44", 0,
                 raw_input=("raw_in", "FP32", [3, 4]))  # fmt: skip


# ------------------------------------------------------------------------------------------------
# malformed requests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "malformed request JSON"),
        (b"{", "malformed request JSON"),
        (b'{"inputs": [}', "malformed request JSON"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[]", "request JSON must be an object, got array"),
        (b'"x"', "request JSON must be an object, got string"),
        (b"{}", "missing required field 'inputs'"),
        (b'{"inputs": {}}', "'inputs' must be an array, got object"),
        (b'{"inputs": [1]}', "input at position 0 must be a JSON object, got number"),
        (b'{"inputs": [{"datatype":"FP32","shape":[1],"data":[1]}]}', "missing required field 'name'"),
        (b'{"inputs": [{"name":5,"datatype":"FP32","shape":[1],"data":[1]}]}', "'name' must be a string"),
        (
            b'{"inputs": [{"name":"x","shape":[1],"data":[1]}]}',
            "input 'x': missing required field 'datatype'",
        ),
        (
            b'{"inputs": [{"name":"x","datatype":"FP32","data":[1]}]}',
            "input 'x': missing required field 'shape'",
        ),
        (
            b'{"inputs": [{"name":"x","datatype":"FLOAT","shape":[1],"data":[1]}]}',
            "input 'x': unknown datatype",
        ),
        (b'{"inputs": [{"name":"x","datatype":"FP32","shape":1,"data":[1]}]}', "'shape' must be an array"),
        (b'{"inputs": [{"name":"x","datatype":"FP32","shape":[1.0],"data":[1]}]}', "only integers"),
        (b'{"inputs": [{"name":"x","datatype":"FP32","shape":[true],"data":[1]}]}', "only integers"),
        (b'{"inputs": [{"name":"x","datatype":"FP32","shape":[-1],"data":[1]}]}', "input 'x': shape [-1]"),
        (b'{"id": 5, "inputs": []}', "'id' must be a string"),
        (b'{"parameters": [], "inputs": []}', "'parameters' must be a JSON object"),
        (b'{"parameters": {"p": null}, "inputs": []}', "request parameter 'p'"),
        (b'{"parameters": {"p": [1]}, "inputs": []}', "request parameter 'p'"),
        (b'{"parameters": {"p": {"a": 1}}, "inputs": []}', "request parameter 'p'"),
        (b'{"parameters": {"p": 18446744073709551616}, "inputs": []}', "does not fit in 64 bits"),
        (
            b'{"parameters": {"binary_data_output": 1}, "inputs": []}',
            "'binary_data_output' must be a boolean",
        ),
        (b'{"inputs": [], "outputs": {}}', "'outputs' must be an array"),
        (b'{"inputs": [], "outputs": [{}]}', "output at position 0: missing required field 'name'"),
        (b'{"inputs": [], "outputs": ["o"]}', "output at position 0 must be a JSON object"),
        (b'{"inputs": [], "outputs": [{"name":"o"},{"name":"o"}]}', "output 'o' is requested more than once"),
        (b'{"inputs": [], "outputs": [{"name":"o","parameters":{"binary_data":"yes"}}]}', "output 'o'"),
        (b'{"inputs": [], "outputs": [{"name":"o","parameters":{"x":null}}]}', "output 'o' parameter 'x'"),
        (b'{"inputs": [], "outputs": [{"name":"o","parameters":3}]}', "output 'o': 'parameters'"),
        (
            b'{"inputs": [{"name":"x","datatype":"INT8","shape":[1],"data":[1],"parameters":{"q":[]}}]}',
            "input 'x' parameter 'q'",
        ),
    ],
)
def test_malformed_requests(body: bytes, fragment: str) -> None:
    expect_error(body, fragment)


def test_duplicate_inputs() -> None:
    expect_error(
        {"inputs": [tensor("x", "INT8", [1], [1]), tensor("x", "INT8", [1], [2])]},
        "input 'x' is given more than once",
    )


def test_shared_memory_inputs_carry_their_parameters_and_no_data() -> None:
    shm_params = {"shared_memory_region": "r", "shared_memory_byte_size": 2, "shared_memory_offset": 4}
    body = {
        "inputs": [
            {"name": "x", "datatype": "INT8", "shape": [2], "parameters": shm_params},
            tensor("y", "INT8", [1], [7]),
        ]
    }
    request, _ = parse(body)
    assert [t.name for t in request.inputs] == ["x", "y"]
    assert request.inputs[0].parameters["shared_memory_region"].string_param == "r"
    assert request.inputs[0].parameters["shared_memory_offset"].int64_param == 4
    assert list(request.raw_input_contents) == [b"\x07"]  # only the inline input has data
    both = {"name": "x", "datatype": "INT8", "shape": [1], "parameters": shm_params, "data": [1]}
    expect_error({"inputs": [both]}, "input 'x': has both a shared-memory region and 'data'")


def test_shared_memory_outputs_render_without_data() -> None:
    response = build_response(
        "m", "1", "", [("a", np.zeros((1, 2), np.float32)), ("b", np.ones(2, np.int8))],
        shared={"a": {"shared_memory_region": "out", "shared_memory_byte_size": 8}},
    )  # fmt: skip
    assert response.raw_output_contents[0] == b""
    body, header_length = render_infer_response(response, OutputPolicy())
    assert header_length is None
    outputs = json.loads(body)["outputs"]
    assert outputs[0] == {
        "name": "a", "datatype": "FP32", "shape": [1, 2],
        "parameters": {"shared_memory_region": "out", "shared_memory_byte_size": 8},
    }  # fmt: skip
    assert outputs[1]["data"] == [1, 1]


def test_errors_are_server_errors_only() -> None:
    for body in (b"\x00", b"[" * 10, b'{"inputs": [{"name": "x"}]}', b"1e999999"):
        with pytest.raises(ServerError):
            parse(body)


# ------------------------------------------------------------------------------------------------
# JSON depth
# ------------------------------------------------------------------------------------------------


def _nested(depth: int) -> list[Any]:
    data: list[Any] = [1]
    for _ in range(depth - 1):
        data = [data]
    return data


def test_json_depth_limit() -> None:
    # root object (1) + inputs array (2) + input object (3) + data nesting
    ok = {"inputs": [tensor("x", "INT8", [1], _nested(61))]}
    request, _ = parse(ok)
    assert request.raw_input_contents[0] == b"\x01"
    too_deep = {"inputs": [tensor("x", "INT8", [1], _nested(62))]}
    expect_error(too_deep, "nested 65 levels deep, the limit is 64")
    request, _ = parse(too_deep, max_json_depth=100)
    assert request.raw_input_contents[0] == b"\x01"


def test_json_depth_huge_nesting_no_recursion_error() -> None:
    expect_error(b"[" * 1_000_000 + b"]" * 1_000_000, "limit is 64")
    expect_error(b'{"a":' * 200_000 + b"1" + b"}" * 200_000, "limit is 64")
    expect_error(b"[" * 1_000_000, "limit is 64")  # unterminated


def test_json_depth_ignores_brackets_in_strings() -> None:
    body = {
        "id": "[[[[" * 100 + '\\"{{{{',
        "parameters": {"s": "]]]]" * 50 + "[" * 100},
        "inputs": [tensor("x", "BYTES", [2], ["[" * 500, '\\"' + "{" * 500])],
    }
    request, _ = parse(body)
    assert decode_inputs(request)["x"].tolist() == [b"[" * 500, b'\\"' + b"{" * 500]
    assert request.id == "[[[[" * 100 + '\\"{{{{'


def test_json_depth_many_shallow_brackets_fast_path() -> None:
    data = [[i, i + 1] for i in range(0, 2000, 2)]
    request, _ = parse({"inputs": [tensor("x", "INT32", [1000, 2], data)]})
    assert decode_inputs(request)["x"].ravel().tolist() == list(range(2000))


# ------------------------------------------------------------------------------------------------
# parameters helpers
# ------------------------------------------------------------------------------------------------


def test_parameters_roundtrip_every_type() -> None:
    values = {"b": True, "f": False, "i": -7, "big": 2**63, "d": 1.5, "s": "str", "e": ""}
    request = pb.ModelInferRequest()
    json_to_parameters(values, request.parameters)
    p = request.parameters
    assert p["b"].WhichOneof("parameter_choice") == "bool_param"
    assert p["i"].WhichOneof("parameter_choice") == "int64_param"
    assert p["big"].WhichOneof("parameter_choice") == "uint64_param"
    assert p["d"].WhichOneof("parameter_choice") == "double_param"
    assert p["s"].WhichOneof("parameter_choice") == "string_param"
    assert parameters_to_json(p) == values
    assert parameters_to_json(pb.ModelInferRequest().parameters) == {}
    with pytest.raises(InvalidArgument, match="must be a JSON object"):
        json_to_parameters([1], request.parameters)


# ------------------------------------------------------------------------------------------------
# responses, decoded with tritonclient
# ------------------------------------------------------------------------------------------------


def tc_result(body: bytes, header_length: int | None) -> httpclient.InferResult:
    return httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)


def _all_outputs(utf8: bool) -> list[tuple[str, np.ndarray]]:
    return [(f"o_{t.lower()}", sample(t, (3, 2), utf8=utf8)) for t in ALL_TYPES]


def test_render_all_binary_tritonclient_as_numpy() -> None:
    outputs = _all_outputs(utf8=False)
    response = build_response("model", "1", "rid", outputs)
    body, header_length = render_infer_response(response, OutputPolicy(binary_data_output=True))
    assert header_length is not None
    header = json.loads(body[:header_length])
    assert header["model_name"] == "model" and header["model_version"] == "1" and header["id"] == "rid"
    assert all("data" not in o for o in header["outputs"])
    assert sum(o["parameters"]["binary_data_size"] for o in header["outputs"]) == len(body) - header_length
    result = tc_result(body, header_length)
    for name, arr in outputs:
        assert_same(result.as_numpy(name), arr)


def test_render_all_json_tritonclient_as_numpy() -> None:
    outputs = _all_outputs(utf8=True)
    response = build_response("model", "", "", outputs, {"p": 3, "q": "x"})
    body, header_length = render_infer_response(response, OutputPolicy())
    assert header_length is None
    doc = json.loads(body)
    assert "id" not in doc and doc["model_version"] == ""
    assert doc["parameters"] == {"p": 3, "q": "x"}
    assert all(o["shape"] == [3, 2] and len(o["data"]) == 6 and "parameters" not in o for o in doc["outputs"])
    assert [o["datatype"] for o in doc["outputs"]] == ALL_TYPES
    result = tc_result(body, header_length)
    for name, arr in outputs:
        got = result.as_numpy(name)
        if arr.dtype == np.object_:
            assert [s.encode() for s in got.ravel().tolist()] == arr.ravel().tolist()
        else:
            assert_same(got.astype(arr.dtype), arr)
    # BYTES are JSON strings, BOOL JSON booleans
    by_name = {o["name"]: o for o in doc["outputs"]}
    assert by_name["o_bytes"]["data"][:3] == ["", "abc", "héllo ✓"]
    assert by_name["o_bool"]["data"][:2] == [True, False]


def test_render_mixed_policy_and_non_utf8_switch() -> None:
    f = np.array([1.5, -2.0], dtype=np.float32)
    s = np.array([b"ok", b"\xff\xfe"], dtype=object)
    i = np.array([[1, 2]], dtype=np.int64)
    response = build_response("m", "2", "", [("f", f), ("s", s), ("i", i)])
    policy = OutputPolicy(binary_data_output=False, binary_outputs={"i": True})
    body, header_length = render_infer_response(response, policy)
    assert header_length is not None
    header = json.loads(body[:header_length])
    outs = {o["name"]: o for o in header["outputs"]}
    assert outs["f"]["data"] == [1.5, -2.0] and "parameters" not in outs["f"]
    assert outs["s"]["parameters"] == {"binary_data_size": len(serialize_bytes_tensor(s))}  # switched
    assert outs["i"]["parameters"] == {"binary_data_size": 16}
    assert body[header_length:] == serialize_bytes_tensor(s) + i.tobytes()
    result = tc_result(body, header_length)
    assert_same(result.as_numpy("f"), f)
    assert result.as_numpy("s").tolist() == [b"ok", b"\xff\xfe"]
    assert_same(result.as_numpy("i"), i)


def test_render_per_output_json_overrides_request_binary() -> None:
    response = build_response("m", "1", "", [("a", np.array([1], np.int8)), ("b", np.array([2], np.int8))])
    body, header_length = render_infer_response(
        response, OutputPolicy(binary_data_output=True, binary_outputs={"b": False})
    )
    assert header_length is not None
    outs = json.loads(body[:header_length])["outputs"]
    assert outs[0]["parameters"] == {"binary_data_size": 1} and outs[1]["data"] == [2]
    assert body[header_length:] == b"\x01"


def test_render_non_finite_and_half_precision() -> None:
    response = build_response(
        "m",
        "1",
        "",
        [
            ("f", np.array([np.nan, np.inf, -np.inf, 0.5], dtype=np.float32)),
            ("h", np.array([0.1, 65504], dtype=np.float16)),
            ("bf", np.array([1.5, -3], dtype=BF16)),
        ],
    )
    body, header_length = render_infer_response(response, OutputPolicy())
    assert header_length is None
    assert b"NaN" in body and b"Infinity" in body and b"-Infinity" in body
    doc = json.loads(body)
    data = doc["outputs"][0]["data"]
    assert math.isnan(data[0]) and data[1:] == [math.inf, -math.inf, 0.5]
    assert doc["outputs"][1]["data"] == [float(np.float16(0.1)), 65504.0]
    assert doc["outputs"][2]["data"] == [1.5, -3.0]


def test_render_typed_contents_response_and_output_parameters() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="x")
    a = response.outputs.add(name="a", datatype="INT32", shape=[2])
    a.contents.int_contents.extend([7, -7])
    a.parameters["note"].string_param = "hi"
    b = response.outputs.add(name="b", datatype="BYTES", shape=[1])
    b.contents.bytes_contents.append(b"\x80")
    body, header_length = render_infer_response(response, OutputPolicy(binary_outputs={"a": True}))
    assert header_length is not None
    outs = json.loads(body[:header_length])["outputs"]
    assert outs[0]["parameters"] == {"note": "hi", "binary_data_size": 8}
    assert outs[1]["parameters"] == {"binary_data_size": 5}
    assert body[header_length:] == np.array([7, -7], np.int32).tobytes() + b"\x01\x00\x00\x00\x80"
    result = tc_result(body, header_length)
    assert result.as_numpy("a").tolist() == [7, -7]
    assert result.as_numpy("b").tolist() == [b"\x80"]

    body, header_length = render_infer_response(response, OutputPolicy())
    outs = json.loads(body[:header_length])["outputs"]
    assert outs[0]["data"] == [7, -7] and outs[0]["parameters"] == {"note": "hi"}


def test_render_empty_output() -> None:
    response = build_response("m", "1", "", [("e", np.zeros((0, 3), np.float32))])
    body, header_length = render_infer_response(response, OutputPolicy(binary_data_output=True))
    result = tc_result(body, header_length)
    assert result.as_numpy("e").shape == (0, 3)
    body, header_length = render_infer_response(response, OutputPolicy())
    assert json.loads(body)["outputs"][0]["data"] == []


def test_render_error() -> None:
    assert json.loads(render_error('bad "thing" é')) == {"error": 'bad "thing" é'}
    assert render_error("x") == b'{"error": "x"}'


def test_end_to_end_with_tritonclient() -> None:
    """tritonclient body -> parse -> decode -> model -> build -> render -> tritonclient result."""
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    text = np.array([b"a", b"bb"], dtype=object)
    inputs = [tc_input("x", x, "FP32", True), tc_input("t", text, "BYTES", False)]
    outputs = [
        httpclient.InferRequestedOutput("y", binary_data=True),
        httpclient.InferRequestedOutput("u", binary_data=False),
    ]
    body, header_length = tc_body(inputs, outputs, request_id="e2e")
    request, policy = parse(body, header_length)
    decoded = decode_inputs(request)
    y = decoded["x"] * 2
    u = np.array([s.upper() for s in decoded["t"]], dtype=object)
    response = build_response(request.model_name, request.model_version, request.id, [("y", y), ("u", u)])
    out_body, out_header_length = render_infer_response(response, policy)
    result = tc_result(out_body, out_header_length)
    assert result.get_response()["id"] == "e2e"
    assert_same(result.as_numpy("y"), x * 2)
    assert result.as_numpy("u").tolist() == ["A", "BB"]


def test_json_depth_escapes_do_not_hide_nesting() -> None:
    # A string ending in an escaped backslash must not swallow the closing quote.
    deep = {"id": "a\\", "parameters": {"k": '\\"[[[\\'}, "inputs": [tensor("x", "INT8", [1], _nested(62))]}
    expect_error(deep, "nested 65 levels deep")
    shallow = {"id": "a\\", "parameters": {"k": '\\"[[[' * 40}, "inputs": [tensor("x", "INT8", [1], [1])]}
    request, _ = parse(shallow)
    assert request.parameters["k"].string_param == '\\"[[[' * 40
    # \u escapes of quote/backslash are plain text to the scanner.
    body = b'{"id": "\\u0022' + b"[" * 80 + b'\\u005c", "inputs": []}'
    request, _ = parse(body)
    assert request.id.startswith('"[[[')


def test_empty_names_rejected_and_long_values_truncated() -> None:
    expect_error({"inputs": [tensor("", "INT8", [1], [1])]}, "input at position 0: 'name' must not be empty")
    expect_error({"inputs": [], "outputs": [{"name": ""}]}, "output at position 0: 'name' must not be empty")
    message = expect_error({"inputs": [tensor("x", "INT8", [1], ["y" * 10_000])]}, "INT8 data must be integers")
    assert len(message) < 200


def test_render_malformed_response_is_internal_error() -> None:
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="o", datatype="FP32", shape=[2])
    response.raw_output_contents.append(b"\x00" * 4)
    with pytest.raises(InternalError, match="output 'o': expected 8 bytes"):
        render_infer_response(response, OutputPolicy())
    response.outputs.add(name="p", datatype="FP32", shape=[1])
    with pytest.raises(InternalError, match="2 outputs"):
        render_infer_response(response, OutputPolicy(binary_data_output=True))


def test_fast_json_path_gives_the_same_values_as_json() -> None:
    """orjson parses and writes the common case; json's rules still hold where the two differ."""
    rng = np.random.default_rng(7)
    values = (rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000)).astype(np.float32)
    body = json.dumps({"inputs": [tensor("x", "FP32", [5000], values.tolist())]}).encode()
    request, _ = parse(body)
    np.testing.assert_array_equal(decode_inputs(request)["x"], values)  # bit for bit
    response = build_response(
        "m", "1", "", [("y", values), ("i", np.array([0, 2**64 - 1], np.uint64)), ("j", np.array([-(2**63)], np.int64))]
    )
    out, _ = render_infer_response(response, OutputPolicy())
    doc = json.loads(out)
    assert doc["outputs"][0]["data"] == values.tolist()
    assert doc["outputs"][1]["data"] == [0, 2**64 - 1] and doc["outputs"][2]["data"] == [-(2**63)]
    # A 65-bit integer would become a float in orjson: json's exact error is kept.
    expect_error('{"parameters": {"p": 184467440737095516160}, "inputs": []}', "does not fit in 64 bits")
    expect_error(
        {"inputs": [tensor("x", "INT64", [1], [-92233720368547758080])]},
        "out of range for INT64",
    )
