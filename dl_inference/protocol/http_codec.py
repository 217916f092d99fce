"""KServe V2 HTTP/REST JSON (with Triton's binary-data extension) <-> V2 protobuf messages.

Used by the gateway's HTTP frontend, so it depends only on numpy, ml_dtypes and protobuf.

Request side (:func:`parse_infer_request`): every input ends up in ``raw_input_contents``, whether
it arrived as JSON ``data`` or as a binary slice, so workers see the same message as from gRPC.

Decisions worth knowing:

* JSON ``data`` may be flat or nested; nested data must be rectangular, and only its total element
  count is compared with ``shape`` (as Triton does), not its nesting.
* Numeric data goes through ``np.array`` in C. As a consequence JSON booleans mixed with numbers
  in a numeric tensor are coerced to 0/1; a numeric tensor of *only* booleans is rejected, and a
  BOOL tensor must hold only booleans. Integers are range-checked against the datatype; floats in
  integer tensors are rejected; finite numbers that overflow FP16/FP32/BF16 are rejected.
* JSON is parsed and written with ``orjson`` (several times faster than ``json`` on tensor data);
  a document orjson refuses is parsed again with ``json``, so everything below still holds and
  errors read as ``json``'s, and a response holding a non-finite float is written with ``json``.
* Python's ``json`` accepts the non-standard tokens ``NaN``/``Infinity``/``-Infinity`` and they are
  allowed in float tensors; symmetrically the response encoder writes non-finite floats as those
  tokens (Python's default, which tritonclient's ``json.loads`` reads back), not as ``null``.
* A BYTES output that is not valid UTF-8 cannot be JSON text, so it is switched to binary
  (``parameters.binary_data_size``) automatically even when JSON was asked for.
* ``binary_data_size`` / ``binary_data`` (per tensor) and ``binary_data_output`` (request) are
  consumed here and not forwarded; all other parameters are forwarded as InferParameter.
* Tensors in shared memory (``shared_memory_region`` & co.) carry no data: their parameters are
  forwarded and the worker reads or writes the region; such an output is answered without ``data``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from dl_inference.errors import InternalError, InvalidArgument
from dl_inference.protocol.datatypes import V2_DATATYPES, numpy_dtype
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.tensors import (
    SHARED_MEMORY_REGION,
    _contents_to_numpy,
    _element_count,
    check_unicode,
    raw_to_numpy,
    serialize_bytes_tensor,
    set_parameter,
    tensor_to_raw,
)
from dl_inference.sharedmem.params import uses_shared_memory

__all__ = [
    "OutputPolicy",
    "json_to_parameters",
    "parameters_to_json",
    "parse_infer_request",
    "render_error",
    "render_infer_response",
]

_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})
_INT64_MAX = (1 << 63) - 1

# Every byte except brackets and the quote, for bytes.translate(None, delete=...).
_NON_STRUCTURAL = bytes(b for b in range(256) if b not in b'[]{}"')


@dataclass
class OutputPolicy:
    """Which outputs the HTTP response should carry as binary data.

    ``binary_data_output`` is the request-wide default (``parameters.binary_data_output``);
    ``binary_outputs`` holds the per-output ``parameters.binary_data`` that override it.
    """

    binary_data_output: bool = False
    binary_outputs: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        """True when output ``name`` should be sent as binary data."""
        return self.binary_outputs.get(name, self.binary_data_output)


# --------------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------------


def parameters_to_json(params: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a protobuf ``map<string, InferParameter>`` into a JSON-ready dict (unset entries skipped)."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(param, which)
    return out


def json_to_parameters(obj: Any, target: Any, context: str = "parameter") -> None:
    """Copy a JSON ``parameters`` object into a protobuf ``map<string, InferParameter>``.

    bool -> bool_param, int -> int64_param (uint64_param above INT64_MAX), float -> double_param,
    str -> string_param; null, arrays and objects raise InvalidArgument naming ``context``.
    """
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{context}s must be a JSON object, got {_json_type(obj)}")
    for key, value in obj.items():
        set_parameter(target, key, value, context)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _short(value: Any, limit: int = 40) -> str:
    """``repr`` of a client value, truncated so error messages stay small."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt_shape(shape: list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _check_json_depth(text: bytes, max_depth: int) -> None:
    """Reject JSON whose array/object nesting exceeds ``max_depth``, without recursing.

    Escaped backslashes and quotes are dropped first, so every remaining ``"`` delimits a string;
    only brackets and quotes are kept (``bytes.translate`` in C), brackets inside strings are masked
    by quote parity, and the running bracket balance gives the depth (numpy, vectorised). For a
    valid prefix of the document this is exact, which is all ``json.loads`` will descend into.
    """
    if b"\\" in text:
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = text.translate(None, _NON_STRUCTURAL)
    if len(marks) <= max_depth:
        return  # cannot nest deeper than the number of brackets
    arr = np.frombuffer(marks, dtype=np.uint8)
    quote = arr == 0x22
    outside = (np.cumsum(quote, dtype=np.int64) & 1) == 0
    opens = ((arr == 0x5B) | (arr == 0x7B)) & outside
    closes = ((arr == 0x5D) | (arr == 0x7D)) & outside
    depth = int(np.cumsum(opens.astype(np.int32) - closes.astype(np.int32)).max())
    if depth > max_depth:
        raise InvalidArgument(f"request JSON is nested {depth} levels deep, the limit is {max_depth}")


# Digits -> "0", the bytes that can precede a number -> ",": then a number with 20 or more integer
# digits (2**64 - 1 has 20) is a plain substring search, done in C.
_NUMBER_MAP = bytes.maketrans(b"0123456789[:\t\n\r ", b"0000000000,,,,,,")
_LONG_INTEGERS = (b"," + b"0" * 20, b",-" + b"0" * 20)


def _has_long_integer(text: bytes) -> bool:
    mapped = text.translate(_NUMBER_MAP)
    return any(needle in mapped for needle in _LONG_INTEGERS)


def _load_json(header: bytes, max_json_depth: int) -> Any:
    _check_json_depth(header, max_json_depth)
    if not _has_long_integer(header):  # orjson turns integers beyond 64 bits into floats
        try:
            return orjson.loads(header)
        except orjson.JSONDecodeError:
            pass  # NaN/Infinity tokens, lone surrogates...: json's rules and messages
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"request JSON is not valid UTF-8: {e}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidArgument(f"request JSON is nested too deeply (limit {max_json_depth})") from None
    except ValueError as e:
        raise InvalidArgument(f"malformed request JSON: {e}") from None


def _get_str(obj: dict[str, Any], key: str, context: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidArgument(f"{context}: missing required field '{key}'")
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"{context}: '{key}' must be a string, got {_json_type(value)}")
    check_unicode(value, f"{context}: '{key}'")
    return value


def _require_name(obj: dict[str, Any], context: str) -> str:
    name = _get_str(obj, "name", context)
    if not name:
        raise InvalidArgument(f"{context}: 'name' must not be empty")
    return name


def _parse_shape(value: Any, label: str) -> list[int]:
    if value is None:
        raise InvalidArgument(f"{label}: missing required field 'shape'")
    if not isinstance(value, list):
        raise InvalidArgument(f"{label}: 'shape' must be an array of integers, got {_json_type(value)}")
    for d in value:
        if type(d) is not int:
            raise InvalidArgument(f"{label}: 'shape' must contain only integers, got {_json_type(d)} {_short(d)}")
        if d < 0:
            raise InvalidArgument(f"{label}: shape {_fmt_shape(value)} has a negative dimension")
        if d > _INT64_MAX:
            raise InvalidArgument(f"{label}: shape {_fmt_shape(value)} has a dimension beyond the int64 range")
    return value


def _parse_datatype(value: Any, label: str) -> str:
    if value is None:
        raise InvalidArgument(f"{label}: missing required field 'datatype'")
    if not isinstance(value, str) or value not in V2_DATATYPES:
        raise InvalidArgument(f"{label}: unknown datatype {_short(value)}, expected one of {', '.join(V2_DATATYPES)}")
    return value


# --------------------------------------------------------------------------------------------------
# JSON data -> raw
# --------------------------------------------------------------------------------------------------


def _flatten_objects(data: list[Any], label: str) -> list[Any]:
    """Row-major flat list of the leaves of rectangular nested ``data`` (slow, exact path)."""
    try:
        obj = np.array(data, dtype=np.object_)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"{label}: 'data' is not a rectangular array: {e}") from None
    flat = obj.ravel().tolist()
    for value in flat:
        if isinstance(value, list):
            raise InvalidArgument(f"{label}: 'data' is not a rectangular array (ragged nesting)")
    return flat


def _range_error(label: str, datatype: str, value: Any) -> InvalidArgument:
    info = np.iinfo(numpy_dtype(datatype))
    return InvalidArgument(f"{label}: value {value} is out of range for {datatype} [{info.min}, {info.max}]")


def _slow_numeric(data: list[Any], datatype: str, dtype: np.dtype, label: str) -> np.ndarray:
    """Validate every element in Python; used only when numpy's fast inference did not fit."""
    flat = _flatten_objects(data, label)
    if datatype == "BOOL":
        for v in flat:
            if not isinstance(v, bool):
                raise InvalidArgument(f"{label}: BOOL data must be JSON booleans, got {_json_type(v)} {_short(v)}")
        return np.array(flat, dtype=dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        for v in flat:
            if type(v) is not int:
                raise InvalidArgument(f"{label}: {datatype} data must be integers, got {_json_type(v)} {_short(v)}")
            if v < info.min or v > info.max:
                raise _range_error(label, datatype, v)
        return np.array(flat, dtype=dtype)
    floats: list[float] = []
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidArgument(f"{label}: {datatype} data must be numbers, got {_json_type(v)} {_short(v)}")
        try:
            floats.append(float(v))
        except OverflowError:
            raise InvalidArgument(f"{label}: value {v} is out of range for {datatype}") from None
    return _to_float(np.array(floats, dtype=np.float64), datatype, dtype, label)


def _to_float(arr: np.ndarray, datatype: str, dtype: np.dtype, label: str) -> np.ndarray:
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dtype)
    if datatype != "FP64" and out.size:
        inf_out = np.isinf(out.astype(np.float32) if datatype == "BF16" else out)
        if inf_out.any():
            bad = inf_out & ~np.isinf(arr)
            if bad.any():
                value = arr[np.argmax(bad)]
                raise InvalidArgument(f"{label}: value {value} is out of range for {datatype}")
    return out


def _json_numeric(data: list[Any], datatype: str, label: str) -> np.ndarray:
    """JSON ``data`` -> flat numpy array of ``datatype`` (fast path through ``np.array``)."""
    dtype = numpy_dtype(datatype)
    try:
        arr = np.array(data)
    except (ValueError, TypeError, OverflowError):
        return _slow_numeric(data, datatype, dtype, label)  # reports ragged data precisely
    arr = arr.ravel()
    kind = arr.dtype.kind
    if arr.size == 0:
        return np.empty(0, dtype=dtype)
    if datatype == "BOOL":
        return arr if kind == "b" else _slow_numeric(data, datatype, dtype, label)
    if dtype.kind in "iu":
        if kind not in "iu":
            return _slow_numeric(data, datatype, dtype, label)
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min:
            raise _range_error(label, datatype, lo)
        if hi > info.max:
            raise _range_error(label, datatype, hi)
        return arr.astype(dtype, copy=False)
    if kind not in "iuf":
        return _slow_numeric(data, datatype, dtype, label)
    return _to_float(arr, datatype, dtype, label)


def _json_data_to_raw(data: Any, datatype: str, shape: list[int], label: str) -> bytes:
    if not isinstance(data, list):
        raise InvalidArgument(f"{label}: 'data' must be an array, got {_json_type(data)}")
    count = math.prod(shape)
    if datatype == "BYTES":
        flat = _flatten_objects(data, label)
        for v in flat:
            if not isinstance(v, str):
                raise InvalidArgument(f"{label}: BYTES data must be JSON strings, got {_json_type(v)} {_short(v)}")
        _check_count(len(flat), count, datatype, shape, label)
        try:
            return serialize_bytes_tensor(np.array(flat, dtype=np.object_))
        except UnicodeEncodeError:  # a lone surrogate from a \udXXX escape: find it for the message
            for i, v in enumerate(flat):
                check_unicode(v, f"{label}: BYTES element {i}")
            raise
    arr = _json_numeric(data, datatype, label)
    _check_count(arr.size, count, datatype, shape, label)
    return arr.tobytes()


def _check_count(n: int, count: int, datatype: str, shape: list[int], label: str) -> None:
    if n != count:
        raise InvalidArgument(
            f"{label}: expected {count} elements for shape {_fmt_shape(shape)} {datatype}, got {n} in 'data'"
        )


# --------------------------------------------------------------------------------------------------
# request
# --------------------------------------------------------------------------------------------------


def _pop_bool(params: dict[str, Any], key: str, what: str) -> bool | None:
    """Remove ``key`` from ``params``; it must be a JSON boolean when present."""
    value = params.pop(key, None)
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(f"{what} '{key}' must be a boolean, got {_json_type(value)}")
    return value


def parse_infer_request(
    body: bytes,
    header_length: int | None,
    model_name: str,
    model_version: str,
    max_json_depth: int = 64,
    raw_input: tuple[str, str, list[int]] | None = None,
) -> tuple[pb.ModelInferRequest, OutputPolicy]:
    """Parse an HTTP infer request body into a ModelInferRequest (all inputs raw) and an OutputPolicy.

    ``header_length`` is the ``Inference-Header-Content-Length`` header: None means the body is
    all JSON; N > 0 means the JSON is ``body[:N]`` and inputs with ``parameters.binary_data_size``
    take consecutive slices of the rest, which must be used up exactly; 0 means the whole body is
    the single input described by ``raw_input`` = (name, datatype, shape), with all outputs binary.
    Raises InvalidArgument for anything malformed.
    """
    body = bytes(body) if not isinstance(body, bytes) else body
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    policy = OutputPolicy()

    if header_length is not None:
        if isinstance(header_length, bool) or not isinstance(header_length, int) or header_length < 0:
            raise InvalidArgument(
                f"Inference-Header-Content-Length must be a non-negative integer, got {header_length!r}"
            )
        if header_length > len(body):
            raise InvalidArgument(
                f"Inference-Header-Content-Length {header_length} exceeds the request body size {len(body)}"
            )
        if header_length == 0:
            return _parse_raw_request(body, request, policy, raw_input), policy
        header = body[:header_length]
        binary = memoryview(body)[header_length:]
    else:
        header = body
        binary = memoryview(b"")

    root = _load_json(header, max_json_depth)
    if not isinstance(root, dict):
        raise InvalidArgument(f"request JSON must be an object, got {_json_type(root)}")

    request_id = _get_str(root, "id", "request", required=False)
    if request_id is not None:
        request.id = request_id

    params = root.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise InvalidArgument(f"request 'parameters' must be a JSON object, got {_json_type(params)}")
        params = dict(params)
        bdo = _pop_bool(params, "binary_data_output", "request parameter")
        if bdo is not None:
            policy.binary_data_output = bdo
        json_to_parameters(params, request.parameters, "request parameter")

    inputs = root.get("inputs")
    if inputs is None:
        raise InvalidArgument("request: missing required field 'inputs'")
    if not isinstance(inputs, list):
        raise InvalidArgument(f"request 'inputs' must be an array, got {_json_type(inputs)}")

    offset = 0
    available = len(binary)
    seen: set[str] = set()
    for index, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise InvalidArgument(f"input at position {index} must be a JSON object, got {_json_type(item)}")
        name = _require_name(item, f"input at position {index}")
        label = f"input '{name}'"
        if name in seen:
            raise InvalidArgument(f"{label} is given more than once")
        seen.add(name)
        datatype = _parse_datatype(item.get("datatype"), label)
        shape = _parse_shape(item.get("shape"), label)
        _element_count(shape, label, numpy_dtype(datatype).itemsize)

        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(shape)

        size: Any = None
        in_params = item.get("parameters")
        if in_params is not None:
            if not isinstance(in_params, dict):
                raise InvalidArgument(f"{label}: 'parameters' must be a JSON object, got {_json_type(in_params)}")
            in_params = dict(in_params)
            size = in_params.pop("binary_data_size", None)
            in_params.pop("binary_data", None)
            json_to_parameters(in_params, tensor.parameters, f"{label} parameter")

        data = item.get("data")
        if SHARED_MEMORY_REGION in tensor.parameters:  # the bytes are in a region: the worker reads them
            if data is not None or size is not None:
                raise InvalidArgument(f"{label}: has both a shared-memory region and 'data' or binary data")
            continue
        if size is not None:
            if data is not None:
                raise InvalidArgument(f"{label}: has both 'data' and parameters.binary_data_size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidArgument(
                    f"{label}: binary_data_size must be a non-negative integer, got {_json_type(size)} {_short(size)}"
                )
            if header_length is None:
                raise InvalidArgument(
                    f"{label}: binary_data_size given but the request has no Inference-Header-Content-Length"
                )
            if offset + size > available:
                raise InvalidArgument(
                    f"{label}: binary_data_size {size} runs past the end of the binary data "
                    f"({available - offset} bytes left after the JSON header and earlier inputs)"
                )
            chunk = binary[offset : offset + size]
            offset += size
            _check_binary_size(chunk.nbytes, datatype, shape, label)
            request.raw_input_contents.append(bytes(chunk))
        elif data is not None:
            request.raw_input_contents.append(_json_data_to_raw(data, datatype, shape, label))
        else:
            raise InvalidArgument(f"{label}: has neither 'data' nor parameters.binary_data_size")

    if offset != available:
        raise InvalidArgument(
            f"binary data sizes of the inputs add up to {offset} bytes but {available} bytes follow the JSON header"
        )

    outputs = root.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidArgument(f"request 'outputs' must be an array, got {_json_type(outputs)}")
        seen_out: set[str] = set()
        for index, item in enumerate(outputs):
            if not isinstance(item, dict):
                raise InvalidArgument(f"output at position {index} must be a JSON object, got {_json_type(item)}")
            name = _require_name(item, f"output at position {index}")
            label = f"output '{name}'"
            if name in seen_out:
                raise InvalidArgument(f"{label} is requested more than once")
            seen_out.add(name)
            out = request.outputs.add()
            out.name = name
            out_params = item.get("parameters")
            if out_params is not None:
                if not isinstance(out_params, dict):
                    raise InvalidArgument(f"{label}: 'parameters' must be a JSON object, got {_json_type(out_params)}")
                out_params = dict(out_params)
                binary_flag = _pop_bool(out_params, "binary_data", f"{label}: parameter")
                if binary_flag is not None:
                    policy.binary_outputs[name] = binary_flag
                json_to_parameters(out_params, out.parameters, f"{label} parameter")
    return request, policy


def json_object(body: bytes) -> tuple[bytes, dict[str, Any]]:
    """A request body that must be one JSON object, as ``(b"", the object)`` (the form
    :func:`dl_inference.offload.call` takes); InvalidArgument saying what is wrong otherwise."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("request body must be a JSON object")
    return b"", data


@dataclass(frozen=True)
class InferExtras:
    """What the data plane needs beside the serialized request of an HTTP infer body."""

    policy: OutputPolicy
    shared: bool  # names shared-memory regions
    timeout_us: int  # Triton's request "timeout" parameter; 0: none


def parse_infer_body(
    body: bytes,
    header_length: int | None,
    model_name: str,
    model_version: str,
    max_json_depth: int = 64,
    raw_input: tuple[str, str, list[int]] | None = None,
) -> tuple[bytes, InferExtras]:
    """:func:`parse_infer_request`, serialized: the form :func:`dl_inference.offload.call` takes."""
    request, policy = parse_infer_request(body, header_length, model_name, model_version, max_json_depth, raw_input)
    timeout_us = request.parameters["timeout"].int64_param if "timeout" in request.parameters else 0
    return request.SerializeToString(), InferExtras(policy, uses_shared_memory(request), timeout_us)


def render_infer_body(reply: bytes, policy: OutputPolicy) -> tuple[bytes, int | None]:
    """:func:`render_infer_response` of a serialized response (the :func:`~dl_inference.offload.call` form)."""
    return render_infer_response(pb.ModelInferResponse.FromString(reply), policy)


def _check_binary_size(nbytes: int, datatype: str, shape: list[int], label: str) -> None:
    """Fixed-size types: the binary slice must be exactly prod(shape) * itemsize bytes."""
    if datatype == "BYTES":
        return  # element framing is validated by the worker's decoder
    expected = math.prod(shape) * numpy_dtype(datatype).itemsize
    if nbytes != expected:
        raise InvalidArgument(
            f"{label}: expected {expected} bytes for shape {_fmt_shape(shape)} {datatype}, got {nbytes}"
        )


def _parse_raw_request(
    body: bytes,
    request: pb.ModelInferRequest,
    policy: OutputPolicy,
    raw_input: tuple[str, str, list[int]] | None,
) -> pb.ModelInferRequest:
    if raw_input is None:
        raise InvalidArgument(
            "raw binary request (Inference-Header-Content-Length: 0) needs a model with exactly one "
            "input of known name, datatype and shape"
        )
    name, datatype, shape = raw_input
    label = f"input '{name}'"
    datatype = _parse_datatype(datatype, label)
    shape = _parse_shape(list(shape), label)
    _check_binary_size(len(body), datatype, shape, label)
    tensor = request.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(shape)
    request.raw_input_contents.append(body)
    policy.binary_data_output = True
    return request


# --------------------------------------------------------------------------------------------------
# response
# --------------------------------------------------------------------------------------------------


def _array_to_json_data(arr: np.ndarray, datatype: str) -> tuple[list[Any] | None, bool]:
    """Flat JSON-ready list (None when a BYTES element is not valid UTF-8), and whether every
    element is finite (orjson would write NaN/Infinity as ``null``)."""
    flat = arr.ravel()
    if datatype == "BYTES":
        try:
            return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat.tolist()], True
        except UnicodeDecodeError:
            return None, True
    if datatype == "BF16":
        flat = flat.astype(np.float32)
    finite = flat.dtype.kind != "f" or bool(np.isfinite(flat).all())
    return flat.tolist(), finite


def _render_output(tensor: Any, raw: bytes | None, binary: bool) -> tuple[dict[str, Any], bytes | None, bool]:
    """JSON entry for one output, its binary payload when it is sent binary, and whether its JSON
    data is all finite."""
    name = tensor.name
    datatype = tensor.datatype
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(tensor.shape)}
    params = parameters_to_json(tensor.parameters) if tensor.parameters else {}
    if SHARED_MEMORY_REGION in params:  # written to the client's region: no data here
        entry["parameters"] = params
        return entry, None, True
    if not binary:
        if raw is not None:
            arr = raw_to_numpy(raw, datatype, tensor.shape, name, "output")
        else:
            arr = _contents_to_numpy(tensor, f"output '{name}'")
        data, finite = _array_to_json_data(arr, datatype)
        if data is not None:
            entry["data"] = data
            if params:
                entry["parameters"] = params
            return entry, None, finite
        if raw is None:  # not UTF-8: switch this BYTES output to binary
            raw = tensor_to_raw(arr, datatype)
    elif raw is None:
        raw = tensor_to_raw(_contents_to_numpy(tensor, f"output '{name}'"), datatype)
    params["binary_data_size"] = len(raw)
    entry["parameters"] = params
    return entry, raw, True


def render_infer_response(response: pb.ModelInferResponse, policy: OutputPolicy) -> tuple[bytes, int | None]:
    """Encode a ModelInferResponse as the HTTP body: returns ``(body, json_header_length)``.

    ``json_header_length`` is None when no output is binary (the body is plain JSON); otherwise it
    is the value for ``Inference-Header-Content-Length`` and the binary outputs follow the JSON in
    output order. BYTES outputs that are not valid UTF-8 are sent binary regardless of ``policy``.
    """
    result: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        result["id"] = response.id
    if response.parameters:
        result["parameters"] = parameters_to_json(response.parameters)
    raws = response.raw_output_contents
    n_out = len(response.outputs)
    if raws and len(raws) != n_out:
        raise InternalError(f"response has {len(raws)} raw_output_contents entries for {n_out} outputs")
    buffers: list[bytes] = []
    json_outputs: list[dict[str, Any]] = []
    all_finite = True
    for i, tensor in enumerate(response.outputs):
        try:
            entry, raw, finite = _render_output(tensor, raws[i] if raws else None, policy.is_binary(tensor.name))
            all_finite = all_finite and finite
        except InvalidArgument as e:  # the model's response is malformed: a server fault
            raise InternalError(f"malformed inference response: {e.message}") from None
        if raw is not None:
            buffers.append(raw)
        json_outputs.append(entry)
    result["outputs"] = json_outputs
    header = b""
    if all_finite:
        try:
            header = orjson.dumps(result)
        except orjson.JSONEncodeError:  # e.g. an integer parameter beyond 64 bits
            header = b""
    if not header:  # json writes NaN/Infinity tokens, which tritonclient reads back
        header = json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if not buffers:
        return header, None
    return b"".join([header, *buffers]), len(header)


def render_error(message: str) -> bytes:
    """The HTTP error body ``{"error": message}`` as UTF-8 JSON.

    A message quoting client text that is not valid Unicode (a lone surrogate) is written with
    ``\\uXXXX`` escapes instead, so rendering an error never fails.
    """
    try:
        return json.dumps({"error": message}, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps({"error": message}).encode("ascii")
