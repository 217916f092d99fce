"""TF-Serving <-> V2 codecs: TensorProto tensors, Predict, metadata, status, and the REST JSON.

The tests marked ``tf`` build messages with the stock ``tf.make_tensor_proto`` / read them with
``tf.make_ndarray`` and are skipped when TensorFlow is not installed.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from dl_inference.dataplane import DataPlane
from dl_inference.errors import Code, InternalError, InvalidArgument, NotFound, ResourceExhausted, ServerError
from dl_inference.protocol.datatypes import V2_DATATYPES, numpy_dtype
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.protocol.generated import tf_serving_pb2 as tfs
from dl_inference.protocol.tensors import build_response, decode_inputs, raw_to_numpy
from dl_inference.protocol.tfserving import (
    DT_TO_V2,
    SIGNATURE_DEF_MAP_TYPE_URL,
    V2_TO_DT,
    VersionState,
    check_signature,
    infer_to_predict,
    label_to_version,
    metadata_response,
    predict_to_infer,
    requested_version,
    status_response,
    tensor_to_v2,
)
from dl_inference.protocol.tfserving_json import (
    parse_predict_body,
    predict_json_to_infer,
    render_predict_response,
)
from dl_inference.tfserving_api import TfServingApi

NUMPY = {name: numpy_dtype(name) for name in V2_DATATYPES}


def _sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(7)
    if datatype == "BYTES":
        return np.array([b"", b"a\x00b", "h\u00e9".encode(), b"\xff\xfe"] * 3, dtype=object)[
            : int(np.prod(shape))
        ].reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    dtype = NUMPY[datatype]
    if dtype.kind == "f" or datatype == "BF16":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _proto(dtype: int, shape: list[int], **fields: Any) -> tfs.TensorProto:
    proto = tfs.TensorProto(dtype=dtype, **fields)  # type: ignore[arg-type]
    for d in shape:
        proto.tensor_shape.dim.add(size=d)
    return proto


def _decode(proto: tfs.TensorProto, name: str = "x") -> np.ndarray:
    datatype, shape, raw = tensor_to_v2(proto, name)
    return raw_to_numpy(raw, datatype, shape, name)


def _error(exc: pytest.ExceptionInfo[ServerError], *parts: str) -> None:
    for part in parts:
        assert part in exc.value.message, exc.value.message


# ------------------------------------------------------------------------------------------------
# TensorProto -> V2


def test_dtype_table_covers_every_v2_datatype() -> None:
    assert set(V2_TO_DT) == set(V2_DATATYPES)
    assert {DT_TO_V2[V2_TO_DT[d]] for d in V2_DATATYPES} == set(V2_DATATYPES)
    assert V2_TO_DT["FP32"] == tfs.DT_FLOAT and V2_TO_DT["FP16"] == tfs.DT_HALF
    assert V2_TO_DT["BF16"] == tfs.DT_BFLOAT16 and V2_TO_DT["BYTES"] == tfs.DT_STRING


@pytest.mark.parametrize("datatype", [d for d in V2_DATATYPES if d != "BYTES"])
def test_tensor_content_is_forwarded_as_raw(datatype: str) -> None:
    arr = _sample(datatype, (2, 3))
    proto = _proto(V2_TO_DT[datatype], [2, 3], tensor_content=arr.tobytes())
    got_type, shape, raw = tensor_to_v2(proto, "x")
    assert (got_type, shape) == (datatype, [2, 3])
    assert raw == arr.tobytes()


TYPED = [
    ("FP32", "float_val", [1.5, -2.0, 3.25]),
    ("FP64", "double_val", [1e300, -2.0, 0.1]),
    ("INT8", "int_val", [-128, 0, 127]),
    ("INT16", "int_val", [-32768, 1, 32767]),
    ("INT32", "int_val", [-(2**31), 5, 2**31 - 1]),
    ("UINT8", "int_val", [0, 7, 255]),
    ("UINT16", "int_val", [0, 9, 65535]),
    ("INT64", "int64_val", [-(2**63), 0, 2**63 - 1]),
    ("UINT32", "uint32_val", [0, 1, 2**32 - 1]),
    ("UINT64", "uint64_val", [0, 1, 2**64 - 1]),
    ("BOOL", "bool_val", [True, False, True]),
]


@pytest.mark.parametrize(("datatype", "field", "values"), TYPED)
def test_typed_values(datatype: str, field: str, values: list[Any]) -> None:
    got = _decode(_proto(V2_TO_DT[datatype], [3], **{field: values}))
    assert got.dtype == NUMPY[datatype]
    assert got.tolist() == values


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_val_carries_the_16_bits(datatype: str) -> None:
    values = np.array([1.5, -0.25, 65504.0 if datatype == "FP16" else 3.0e38], dtype=NUMPY[datatype])
    bits = values.view(np.uint16).astype(int).tolist()
    got = _decode(_proto(V2_TO_DT[datatype], [3], half_val=bits))
    assert got.dtype == NUMPY[datatype] and got.tobytes() == values.tobytes()


def test_string_val() -> None:
    got = _decode(_proto(tfs.DT_STRING, [2, 2], string_val=[b"a", b"", b"\xff", "é".encode()]))
    assert got.tolist() == [[b"a", b""], [b"\xff", "é".encode()]]


@pytest.mark.parametrize(
    ("dtype", "field", "value", "expected"),
    [
        (tfs.DT_FLOAT, "float_val", [2.5], np.full((2, 3), 2.5, np.float32)),
        (tfs.DT_INT8, "int_val", [-3], np.full((2, 3), -3, np.int8)),
        (tfs.DT_HALF, "half_val", [int(np.float16(1.5).view(np.uint16))], np.full((2, 3), 1.5, np.float16)),
        (tfs.DT_STRING, "string_val", [b"z"], np.full((2, 3), b"z", dtype=object)),
    ],
)
def test_one_value_fills_a_larger_shape(dtype: int, field: str, value: list[Any], expected: np.ndarray) -> None:
    got = _decode(_proto(dtype, [2, 3], **{field: value}))
    assert got.shape == (2, 3) and got.tolist() == expected.tolist()


def test_scalar_and_empty_tensors() -> None:
    assert _decode(_proto(tfs.DT_FLOAT, [], float_val=[4.0])).tolist() == 4.0
    assert _decode(_proto(tfs.DT_FLOAT, [0, 3])).shape == (0, 3)
    assert _decode(_proto(tfs.DT_STRING, [0])).shape == (0,)


@pytest.mark.parametrize(
    ("proto", "parts"),
    [
        (_proto(tfs.DT_FLOAT, [2, 3], float_val=[1, 2, 3]), ["input 'x'", "3 values in float_val", "6 elements"]),
        (_proto(tfs.DT_FLOAT, [2], float_val=[1, 2, 3]), ["input 'x'", "3 values", "2 elements"]),
        (_proto(tfs.DT_FLOAT, [2]), ["input 'x'", "0 values in float_val"]),
        (_proto(tfs.DT_FLOAT, [2, 3], tensor_content=b"\0" * 20), ["input 'x'", "20 bytes", "needs 24"]),
        (_proto(tfs.DT_COMPLEX64, [1], scomplex_val=[1, 2]), ["input 'x'", "DT_COMPLEX64 is not supported"]),
        (_proto(tfs.DT_INVALID, [1]), ["input 'x'", "dtype is not set"]),
        (_proto(77, [1]), ["input 'x'", "dtype 77 is not supported"]),
        (_proto(tfs.DT_FLOAT, [-1, 3]), ["input 'x'", "negative dimension"]),
        (_proto(tfs.DT_INT8, [2], int_val=[1, 300]), ["input 'x'", "300", "out of range for INT8"]),
        (_proto(tfs.DT_UINT16, [1], int_val=[-1]), ["input 'x'", "-1", "out of range for UINT16"]),
        (_proto(tfs.DT_HALF, [1], half_val=[70000]), ["input 'x'", "70000", "16 bits"]),
        (_proto(tfs.DT_FLOAT, [1], int_val=[1]), ["input 'x'", "DT_FLOAT values go in", "int_val is set"]),
        (
            _proto(tfs.DT_FLOAT, [1], tensor_content=b"\0" * 4, float_val=[1]),
            ["input 'x'", "both tensor_content and float_val"],
        ),
        (_proto(tfs.DT_STRING, [1], tensor_content=b"abcd"), ["input 'x'", "string_val, not tensor_content"]),
    ],
)
def test_bad_tensors_name_the_input(proto: tfs.TensorProto, parts: list[str]) -> None:
    with pytest.raises(InvalidArgument) as exc:
        tensor_to_v2(proto, "x")
    _error(exc, *parts)
    assert exc.value.code is Code.INVALID_ARGUMENT and exc.value.http_status == 400


def test_filling_a_shape_is_capped_by_the_request_limit() -> None:
    huge = _proto(tfs.DT_FLOAT, [1000, 1000], float_val=[1.0])
    with pytest.raises(ResourceExhausted) as exc:
        tensor_to_v2(huge, "x", max_bytes=1_000_000)
    _error(exc, "input 'x'", "4000000 bytes", "max_request_bytes")
    assert exc.value.code is Code.RESOURCE_EXHAUSTED
    assert len(tensor_to_v2(huge, "x", max_bytes=4_000_000)[2]) == 4_000_000
    words = _proto(tfs.DT_STRING, [1000], string_val=[b"x" * 996])
    with pytest.raises(ResourceExhausted, match="1000000 bytes"):
        tensor_to_v2(words, "s", max_bytes=999_999)
    request = tfs.PredictRequest()
    request.inputs["a"].CopyFrom(_proto(tfs.DT_INT64, [100], int64_val=[1]))
    request.inputs["b"].CopyFrom(_proto(tfs.DT_INT64, [100], int64_val=[2]))
    assert len(predict_to_infer(request, "", max_bytes=1600).raw_input_contents) == 2
    with pytest.raises(ResourceExhausted, match="input 'b'"):  # the inputs share the budget
        predict_to_infer(request, "", max_bytes=1599)


def test_unknown_rank_is_refused() -> None:
    proto = _proto(tfs.DT_FLOAT, [])
    proto.tensor_shape.unknown_rank = True
    with pytest.raises(InvalidArgument, match="input 'x': tensor_shape has an unknown rank"):
        tensor_to_v2(proto, "x")


# ------------------------------------------------------------------------------------------------
# model spec, Predict


def test_versions_and_labels() -> None:
    spec = tfs.ModelSpec(name="m")
    assert requested_version(spec) == ""
    spec.version.value = 7
    assert requested_version(spec) == "7"
    spec.version_label = "0012"
    assert requested_version(spec) == "12"
    assert label_to_version("3") == "3"
    with pytest.raises(InvalidArgument, match=r"unknown version label 'stable'.*no version label configuration"):
        label_to_version("stable")
    with pytest.raises(InvalidArgument):
        label_to_version("\u0663")  # a non-ASCII digit is no version number


def test_signatures() -> None:
    assert check_signature("", "m") == "serving_default"
    assert check_signature("serving_default", "m") == "serving_default"
    assert check_signature("predict", "m", "predict") == "predict"
    assert check_signature("", "m", "predict") == "serving_default"
    assert check_signature("serving_default", "m", "predict") == "serving_default"
    with pytest.raises(InvalidArgument) as exc:
        check_signature("classify", "m")
    _error(exc, "model 'm' has no signature 'classify'", "'serving_default'")


def test_predict_to_infer() -> None:
    request = tfs.PredictRequest(output_filter=["b", "a"])
    request.model_spec.name = "m"
    request.inputs["x"].CopyFrom(_proto(tfs.DT_FLOAT, [1, 2], float_val=[1, 2]))
    request.inputs["s"].CopyFrom(_proto(tfs.DT_STRING, [1], string_val=[b"q"]))
    infer = predict_to_infer(request, "4")
    assert (infer.model_name, infer.model_version) == ("m", "4")
    assert [(t.name, t.datatype, list(t.shape)) for t in infer.inputs] == [("s", "BYTES", [1]), ("x", "FP32", [1, 2])]
    assert [o.name for o in infer.outputs] == ["b", "a"]
    decoded = decode_inputs(infer)
    assert decoded["x"].tolist() == [[1.0, 2.0]] and decoded["s"].tolist() == [b"q"]


def test_predict_to_infer_refuses_a_repeated_output_filter() -> None:
    request = tfs.PredictRequest(output_filter=["y", "y"])
    with pytest.raises(InvalidArgument, match="output 'y' appears more than once in output_filter"):
        predict_to_infer(request, "")


def _response(**outputs: np.ndarray) -> pb.ModelInferResponse:
    return build_response("m", "2", "", list(outputs.items()))


def test_infer_to_predict_uses_tensor_content_and_string_val() -> None:
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    s = np.array([[b"a"], [b"\xff"]], dtype=object)
    h = np.array([1.5, 2.5], dtype=ml_dtypes.bfloat16)
    out = infer_to_predict(_response(y=y, s=s, h=h), [], "m", "serving_default")
    assert out.model_spec.name == "m" and out.model_spec.version.value == 2
    assert out.model_spec.signature_name == "serving_default"
    assert out.outputs["y"].dtype == tfs.DT_FLOAT and out.outputs["y"].tensor_content == y.tobytes()
    assert [d.size for d in out.outputs["y"].tensor_shape.dim] == [2, 3]
    assert out.outputs["s"].dtype == tfs.DT_STRING and list(out.outputs["s"].string_val) == [b"a", b"\xff"]
    assert out.outputs["h"].dtype == tfs.DT_BFLOAT16 and out.outputs["h"].tensor_content == h.tobytes()


def test_infer_to_predict_honours_output_filter() -> None:
    out = infer_to_predict(_response(a=np.zeros(1, np.int8), b=np.ones(1, np.int8)), ["b"], "m", "sig")
    assert list(out.outputs) == ["b"] and out.model_spec.signature_name == "sig"


def test_infer_to_predict_from_typed_contents() -> None:
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    out = response.outputs.add(name="y", datatype="INT32", shape=[2])
    out.contents.int_contents.extend([3, 4])
    words = response.outputs.add(name="w", datatype="BYTES", shape=[1])
    words.contents.bytes_contents.append(b"hi")
    predict = infer_to_predict(response, [], "m", "serving_default")
    assert np.frombuffer(predict.outputs["y"].tensor_content, np.int32).tolist() == [3, 4]
    assert list(predict.outputs["w"].string_val) == [b"hi"]


def test_a_malformed_v2_response_is_an_internal_error() -> None:
    response = _response(y=np.zeros(3, np.float32))
    response.raw_output_contents[0] = b"\0" * 5
    with pytest.raises(InternalError, match="output 'y'"):
        infer_to_predict(response, [], "m", "serving_default")


# ------------------------------------------------------------------------------------------------
# metadata and status


def _metadata() -> pb.ModelMetadataResponse:
    meta = pb.ModelMetadataResponse(name="m", versions=["1", "2"], platform="onnxruntime_onnx")
    meta.inputs.add(name="x", datatype="FP32", shape=[-1, 16])
    meta.outputs.add(name="y", datatype="BYTES", shape=[-1])
    return meta


def test_metadata_response_packs_a_signature_def_map() -> None:
    response = metadata_response("m", "2", _metadata(), ("serving_default", "predict"))
    assert response.model_spec.name == "m" and response.model_spec.version.value == 2
    packed = response.metadata["signature_def"]
    assert packed.type_url == SIGNATURE_DEF_MAP_TYPE_URL
    sigs = tfs.SignatureDefMap.FromString(packed.value).signature_def
    assert set(sigs) == {"serving_default", "predict"}
    sig = sigs["serving_default"]
    assert sig.method_name == "tensorflow/serving/predict"
    assert sig.inputs["x"].dtype == tfs.DT_FLOAT and [d.size for d in sig.inputs["x"].tensor_shape.dim] == [-1, 16]
    assert sig.inputs["x"].name == "x" and sig.outputs["y"].dtype == tfs.DT_STRING


def test_status_mapping() -> None:
    rows = [
        VersionState("1", "READY"),
        VersionState("3", "LOADING"),
        VersionState("2", "UNAVAILABLE", "no ready instance"),
        VersionState("4", "UNLOADING"),
    ]
    status = status_response("m", "", rows).model_version_status
    S = tfs.ModelVersionStatus
    assert [(s.version, s.state) for s in status] == [
        (4, S.UNLOADING),
        (3, S.LOADING),
        (2, S.LOADING),
        (1, S.AVAILABLE),
    ]
    assert status[3].HasField("status") and status[3].status.error_code == tfs.OK
    assert status[2].status.error_code == tfs.UNAVAILABLE and status[2].status.error_message == "no ready instance"
    assert [s.version for s in status_response("m", "3", rows).model_version_status] == [3]


@pytest.mark.parametrize(
    ("row", "state", "code", "message"),
    [
        (VersionState("", "UNAVAILABLE", "unloaded"), "END", tfs.OK, ""),
        (VersionState("", "UNAVAILABLE", "version 1: bad file"), "END", tfs.UNKNOWN, "version 1: bad file"),
        (VersionState("", ""), "START", tfs.OK, ""),
    ],
)
def test_status_of_a_model_without_loaded_versions(row: VersionState, state: str, code: int, message: str) -> None:
    (status,) = status_response("m", "", [row]).model_version_status
    assert status.version == 0 and tfs.ModelVersionStatus.State.Name(status.state) == state
    assert (status.status.error_code, status.status.error_message) == (code, message)


def test_status_not_found() -> None:
    with pytest.raises(NotFound, match="unknown model 'm'"):
        status_response("m", "", [])
    with pytest.raises(NotFound, match=r"model 'm' has no version 9 \(versions: 1\)"):
        status_response("m", "9", [VersionState("1", "READY")])


# ------------------------------------------------------------------------------------------------
# REST JSON


def _meta(**inputs: str) -> pb.ModelMetadataResponse:
    meta = pb.ModelMetadataResponse(name="m")
    for name, datatype in inputs.items():
        meta.inputs.add(name=name, datatype=datatype, shape=[-1, -1])
    return meta


def _json_request(doc: Any, **inputs: str) -> dict[str, np.ndarray]:
    body = parse_predict_body(json.dumps(doc).encode(), 64)
    return decode_inputs(predict_json_to_infer(body, _meta(**inputs), "m", ""))


def test_row_form_single_input() -> None:
    got = _json_request({"instances": [[1, 2], [3, 4], [5, 6]]}, x="FP32")
    assert got["x"].dtype == np.float32 and got["x"].tolist() == [[1, 2], [3, 4], [5, 6]]


def test_row_form_named_inputs_and_b64() -> None:
    doc = {
        "signature_name": "serving_default",
        "instances": [{"a": [1, 2], "s": {"b64": base64.b64encode(b"\xff\x00").decode()}}, {"a": [3, 4], "s": "txt"}],
    }
    got = _json_request(doc, a="INT64", s="BYTES")
    assert got["a"].tolist() == [[1, 2], [3, 4]]
    assert got["s"].tolist() == [b"\xff\x00", b"txt"]


def test_columnar_form() -> None:
    assert _json_request({"inputs": [[1.5]]}, x="FP64")["x"].tolist() == [[1.5]]
    got = _json_request({"inputs": {"a": [[1], [2]], "b": [True, False]}}, a="UINT8", b="BOOL")
    assert got["a"].tolist() == [[1], [2]] and got["b"].tolist() == [True, False]
    assert _json_request({"inputs": 3}, x="INT32")["x"].shape == ()
    assert _json_request({"inputs": {"b64": "YWI="}}, x="BYTES")["x"].tolist() == b"ab"


@pytest.mark.parametrize(
    ("body", "parts"),
    [
        (b"{", ["malformed request JSON"]),
        (b"[1]", ["must be a JSON object"]),
        (b"", ["the request body is empty"]),
        (b'{"instances": [1], "inputs": [1]}', ["both 'instances' and 'inputs'"]),
        (b'{"signature_name": "serving_default"}', ["neither 'instances'", "nor 'inputs'"]),
        (b'{"instances": []}', ["'instances' is empty"]),
        (b'{"instances": 3}', ["'instances' must be a JSON array"]),
        (b'{"instances": [1], "extra": 1}', ["unknown key(s) 'extra'"]),
        (b'{"signature_name": 5, "inputs": 1}', ["'signature_name' must be a string"]),
        (b'{"inputs": ' + b"[" * 70 + b"]" * 70 + b"}", ["nested", "limit is 64"]),
    ],
)
def test_malformed_bodies(body: bytes, parts: list[str]) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_predict_body(body, 64)
    _error(exc, *parts)


@pytest.mark.parametrize(
    ("doc", "inputs", "parts"),
    [
        ({"instances": [[1, 2], [3]]}, {"x": "FP32"}, ["input 'x'", "rectangular"]),
        ({"inputs": [[1, 2], 3]}, {"x": "FP32"}, ["input 'x'", "rectangular"]),
        ({"inputs": [1, "a"]}, {"x": "FP32"}, ["input 'x'", "FP32 data must be numbers", "'a'"]),
        ({"inputs": [300]}, {"x": "INT8"}, ["input 'x'", "300", "out of range for INT8"]),
        ({"inputs": [{"b64": "AA=="}]}, {"x": "FP32"}, ["input 'x'", "needs a BYTES (DT_STRING) input"]),
        ({"inputs": [{"b64": "***"}]}, {"x": "BYTES"}, ["input 'x'", "not valid base64"]),
        ({"inputs": [1]}, {"x": "BYTES"}, ["input 'x'", "BYTES values must be strings"]),
        ({"inputs": {"zz": [1]}}, {"x": "FP32"}, ["unexpected input 'zz'", "expected one of: x"]),
        ({"instances": [1, 2]}, {"a": "FP32", "b": "FP32"}, ["has 2 inputs (a, b)", "keyed by input name"]),
        ({"inputs": [1, 2]}, {"a": "FP32", "b": "FP32"}, ["has 2 inputs (a, b)", "'inputs' must be an object"]),
        (
            {"instances": [{"a": 1, "b": 2}, {"a": 1}]},
            {"a": "FP32", "b": "FP32"},
            ["instance 1 names inputs ['a']", "instance 0 names ['a', 'b']"],
        ),
        ({"instances": [{"a": 1}, 2]}, {"a": "FP32", "b": "FP32"}, ["instance 1 is number"]),
    ],
)
def test_bad_json_inputs(doc: Any, inputs: dict[str, str], parts: list[str]) -> None:
    with pytest.raises(InvalidArgument) as exc:
        _json_request(doc, **inputs)
    _error(exc, *parts)


def _render(row: bool, **outputs: np.ndarray) -> Any:
    return json.loads(render_predict_response(_response(**outputs), row))


def test_render_rows_and_columns() -> None:
    y = np.array([[1.5, 2.0], [3.0, 4.0]], dtype=np.float32)
    assert _render(True, y=y) == {"predictions": [[1.5, 2.0], [3.0, 4.0]]}
    assert _render(False, y=y) == {"outputs": [[1.5, 2.0], [3.0, 4.0]]}
    z = np.array([7, 8], dtype=np.int64)
    assert _render(True, y=y, z=z) == {"predictions": [{"y": [1.5, 2.0], "z": 7}, {"y": [3.0, 4.0], "z": 8}]}
    assert _render(False, y=y, z=z) == {"outputs": {"y": [[1.5, 2.0], [3.0, 4.0]], "z": [7, 8]}}


def test_render_rows_needs_one_batch_size() -> None:
    with pytest.raises(InvalidArgument, match=r"first dimensions differ .*columnar form"):
        _render(True, y=np.zeros((2, 1), np.float32), z=np.zeros(3, np.float32))


def test_render_bytes_text_and_b64() -> None:
    s = np.array([b"text", b"\xff"], dtype=object)
    assert _render(False, s=s) == {"outputs": ["text", {"b64": base64.b64encode(b"\xff").decode()}]}
    assert _render(True, s_bytes=s) == {"predictions": [{"b64": "dGV4dA=="}, {"b64": "/w=="}]}


def test_render_non_finite_and_half_floats() -> None:
    body = render_predict_response(_response(y=np.array([np.nan, np.inf], np.float32)), False)
    assert body == b'{"outputs":[NaN,Infinity]}'
    bf = np.array([1.5], dtype=ml_dtypes.bfloat16)
    assert _render(False, a=np.array([0.5], np.float16), b=bf) == {"outputs": {"a": [0.5], "b": [1.5]}}


# ------------------------------------------------------------------------------------------------
# with the stock TensorFlow helpers


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


TF_CASES = ["FP32", "FP64", "FP16", "BF16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]


@pytest.mark.parametrize("datatype", [*TF_CASES, "BOOL", "BYTES"])
def test_make_tensor_proto_round_trip(tf: Any, datatype: str) -> None:
    """tf.make_tensor_proto -> our decoder, and our PredictResponse -> tf.make_ndarray."""
    from tensorflow_serving.apis import predict_pb2

    arr = _sample(datatype, (2, 3))
    real = predict_pb2.PredictRequest()
    real.model_spec.name = "m"
    real.inputs["x"].CopyFrom(tf.make_tensor_proto(arr))
    infer = predict_to_infer(tfs.PredictRequest.FromString(real.SerializeToString()), "")
    got = decode_inputs(infer)["x"]
    assert got.dtype == (object if datatype == "BYTES" else NUMPY[datatype]) and got.shape == arr.shape
    assert got.tobytes() == arr.tobytes() if datatype != "BYTES" else got.tolist() == arr.tolist()

    ours = infer_to_predict(_response(y=arr), [], "m", "serving_default")
    back = predict_pb2.PredictResponse.FromString(ours.SerializeToString())
    nd = tf.make_ndarray(back.outputs["y"])
    assert nd.shape == arr.shape
    assert nd.tolist() == arr.tolist() if datatype == "BYTES" else nd.tobytes() == arr.tobytes()


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16", "INT8", "UINT16", "INT64", "UINT64", "BOOL", "BYTES"])
def test_make_tensor_proto_fill_value(tf: Any, datatype: str) -> None:
    """A scalar with a larger shape is sent as one typed value: it fills the tensor."""
    value = _sample(datatype, (1,))[0]
    proto = tf.make_tensor_proto(value, shape=[2, 2], dtype=tf.dtypes.as_dtype(V2_TO_DT[datatype]))
    assert not proto.tensor_content
    got = _decode(tfs.TensorProto.FromString(proto.SerializeToString()))
    assert got.shape == (2, 2) and all(v == value for v in got.ravel().tolist())


def test_stock_client_unpacks_our_metadata(tf: Any) -> None:
    from tensorflow.core.protobuf import meta_graph_pb2  # noqa: F401
    from tensorflow_serving.apis import get_model_metadata_pb2

    wire = metadata_response("m", "1", _metadata()).SerializeToString()
    real = get_model_metadata_pb2.GetModelMetadataResponse.FromString(wire)
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    assert real.metadata["signature_def"].Unpack(sigmap)
    assert sigmap.signature_def["serving_default"].inputs["x"].tensor_shape.dim[1].size == 16


# ------------------------------------------------------------------------------------------------
# TfServingApi over a fake data plane (no repository index: status comes from readiness)


class _Plane(DataPlane):
    """One model 'm' (version 1, y = 2x) whose config names the SavedModel signature 'predict'."""

    def __init__(self) -> None:
        self.config = mc.ModelConfig(name="m")
        self.config.parameters["signature_name"].string_value = "predict"
        self.seen: list[pb.ModelInferRequest] = []

    def ready(self) -> bool:
        return True

    def model_ready(self, name: str, version: str) -> bool:
        return name == "m"

    def _check(self, name: str) -> None:
        if name != "m":
            raise NotFound(f"unknown model '{name}'")

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        self._check(name)
        meta = pb.ModelMetadataResponse(name="m", versions=["1"])
        meta.inputs.add(name="x", datatype="FP32", shape=[-1, 2])
        meta.outputs.add(name="y", datatype="FP32", shape=[-1, 2])
        return meta

    def model_config(self, name: str, version: str) -> mc.ModelConfig:
        self._check(name)
        return self.config

    def model_statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        return pb.ModelStatisticsResponse()

    async def infer(self, payload: bytes, name: str, version: str, deadline: float | None = None) -> bytes:
        self._check(name)
        request = pb.ModelInferRequest.FromString(payload)
        self.seen.append(request)
        return build_response("m", "1", "", [("y", decode_inputs(request)["x"] * 2)]).SerializeToString()


def test_api_signatures_metadata_and_status() -> None:
    api = TfServingApi(_Plane())
    request = tfs.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].CopyFrom(_proto(tfs.DT_FLOAT, [1, 2], float_val=[1, 2]))
    for signature in ("", "serving_default", "predict"):
        request.model_spec.signature_name = signature
        response = asyncio.run(api.predict(request))
        assert response.model_spec.signature_name == (signature or "serving_default")
        assert np.frombuffer(response.outputs["y"].tensor_content, np.float32).tolist() == [2.0, 4.0]
    request.model_spec.signature_name = "other"
    with pytest.raises(InvalidArgument, match=r"no signature 'other'.*'predict' or 'serving_default'"):
        asyncio.run(api.predict(request))

    meta = api.metadata("m", "", ["signature_def"])
    assert meta.model_spec.version.value == 1
    sigs = tfs.SignatureDefMap.FromString(meta.metadata["signature_def"].value).signature_def
    assert set(sigs) == {"serving_default", "predict"}
    with pytest.raises(InvalidArgument, match="metadata_field is empty"):
        api.metadata("m", "", [])

    (status,) = asyncio.run(api.status("m", "")).model_version_status
    assert (status.version, status.state) == (1, tfs.ModelVersionStatus.AVAILABLE)
    with pytest.raises(NotFound):
        asyncio.run(api.status("nope", ""))
    with pytest.raises(InvalidArgument, match=r"model_spec\.name is empty"):
        asyncio.run(api.status("", ""))


def test_api_rest_predict() -> None:
    plane = _Plane()
    api = TfServingApi(plane)
    body = asyncio.run(api.predict_json("m", "1", b'{"signature_name": "predict", "instances": [[1, 2], [3, 4]]}', 64))
    assert json.loads(body) == {"predictions": [[2.0, 4.0], [6.0, 8.0]]}
    assert plane.seen[-1].model_version == "1" and list(plane.seen[-1].inputs[0].shape) == [2, 2]
