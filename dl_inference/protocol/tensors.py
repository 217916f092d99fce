"""Conversions between V2 protobuf tensors and numpy arrays (the workers' hot path).

Wire rules (KServe V2 as Triton speaks it):

* ``raw_input_contents`` / ``raw_output_contents`` hold one entry per tensor, in tensor order,
  row-major and little-endian with no padding; BOOL is one byte per element.
* BYTES elements are a 4-byte unsigned little-endian length followed by that many bytes.
* Typed ``contents`` are the alternative to raw; FP16 and BF16 only travel raw, and a request may
  not mix the two forms.

Decoded fixed-size arrays are zero-copy views (``np.frombuffer``) of the message's bytes and are
therefore **read-only**; copy them if a backend needs to write in place. BYTES arrays are 1-D
object arrays of ``bytes`` reshaped to the tensor shape.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from dl_inference.errors import InternalError, InvalidArgument
from dl_inference.protocol.datatypes import V2_DATATYPES, datatype_of, numpy_dtype
from dl_inference.protocol.generated import grpc_service_pb2 as pb

__all__ = [
    "ParameterValue",
    "build_response",
    "check_unicode",
    "decode_inputs",
    "decode_request",
    "deserialize_bytes_tensor",
    "nonnegative_int",
    "raw_to_numpy",
    "response_to_numpy",
    "serialize_bytes_tensor",
    "set_parameter",
    "tensor_to_raw",
]

ParameterValue = bool | int | float | str | pb.InferParameter

_LEN = struct.Struct("<I")
_MAX_ELEMENT = 0xFFFFFFFF
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1

# V2 datatype -> the InferTensorContents field that carries it (FP16/BF16 have none).
_CONTENTS_FIELD: dict[str, str] = {
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
# numpy dtype used to pull each contents field out of protobuf before narrowing.
_FIELD_DTYPE: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int64),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint64),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


# --------------------------------------------------------------------------------------------------
# BYTES
# --------------------------------------------------------------------------------------------------


def serialize_bytes_tensor(arr: np.ndarray) -> bytes:
    """Serialize a BYTES tensor: each element (row-major) as a 4-byte LE length plus its bytes.

    Elements may be ``bytes``/``bytearray``/``memoryview``, ``str`` (encoded UTF-8) or any other
    object (``str(obj)`` encoded UTF-8). Works for object, ``S`` and ``U`` numpy arrays.
    """
    items = np.asarray(arr).ravel(order="C").tolist()
    parts: list[bytes] = []
    append = parts.append
    pack = _LEN.pack
    for item in items:
        if isinstance(item, bytes):
            data = item
        elif isinstance(item, str):
            data = item.encode("utf-8")
        elif isinstance(item, (bytearray, memoryview)):
            data = bytes(item)
        else:
            data = str(item).encode("utf-8")
        if len(data) > _MAX_ELEMENT:
            raise InvalidArgument(f"BYTES element of {len(data)} bytes exceeds the 4 GiB element limit")
        append(pack(len(data)))
        append(data)
    return b"".join(parts)


def deserialize_bytes_tensor(buf: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """Parse ``count`` length-prefixed BYTES elements from ``buf`` into a 1-D object array of bytes.

    Raises InvalidArgument naming tensor ``name`` when the buffer is truncated, holds fewer or more
    elements than ``count``, or has trailing bytes.
    """
    return _deserialize_bytes(buf, count, f"tensor '{name}'")


def _deserialize_bytes(buf: bytes | memoryview, count: int, label: str) -> np.ndarray:
    view = memoryview(buf).cast("B") if isinstance(buf, memoryview) else buf
    total = len(view)
    if count > total // 4:  # every element takes at least its 4-byte length: don't allocate for a lie
        raise InvalidArgument(
            f"{label}: BYTES data truncated: expected {count} elements, which take at least {4 * count} "
            f"bytes, but the buffer has {total}"
        )
    out = np.empty(count, dtype=np.object_)
    offset = 0
    unpack_from = _LEN.unpack_from
    for i in range(count):
        if offset + 4 > total:
            raise InvalidArgument(
                f"{label}: BYTES data truncated: expected {count} elements but the {total}-byte "
                f"buffer ends before element {i}"
            )
        (length,) = unpack_from(view, offset)
        offset += 4
        end = offset + length
        if end > total:
            raise InvalidArgument(
                f"{label}: BYTES data truncated: element {i} declares {length} bytes but only {total - offset} remain"
            )
        out[i] = bytes(view[offset:end])
        offset = end
    if offset != total:
        raise InvalidArgument(
            f"{label}: BYTES data has {total - offset} trailing bytes after the expected {count} elements"
        )
    return out


# --------------------------------------------------------------------------------------------------
# raw <-> numpy
# --------------------------------------------------------------------------------------------------


def tensor_to_raw(arr: np.ndarray, datatype: str) -> bytes:
    """Row-major little-endian bytes of ``arr`` as V2 ``datatype`` (BYTES length-prefixed).

    A non-matching numpy dtype is converted when numpy considers it a same-kind cast (e.g. a
    big-endian array, int64 -> INT32); anything else raises InvalidArgument.
    """
    if datatype == "BYTES":
        return serialize_bytes_tensor(arr)
    dtype = numpy_dtype(datatype)
    arr = np.asarray(arr)
    if arr.dtype != dtype:
        if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
            raise InvalidArgument(f"cannot convert a numpy {arr.dtype} array to {datatype}")
        arr = arr.astype(dtype)
    return arr.tobytes(order="C")


def _element_count(shape: Sequence[int], label: str, itemsize: int = 8) -> int:
    """prod(shape), after checking that numpy can hold an array of that shape and ``itemsize``.

    numpy (and every backend) needs the product of the non-zero dimensions times the item size to
    fit in a signed 64-bit integer, even when another dimension is 0 and the array is empty.
    """
    nonzero = 1
    for d in shape:
        if d < 0:
            raise InvalidArgument(f"{label}: shape {_fmt_shape(shape)} has a negative dimension")
        if d:
            nonzero *= d
    if nonzero * itemsize > _INT64_MAX:
        raise InvalidArgument(f"{label}: shape {_fmt_shape(shape)} is too large: its dimensions multiply beyond 2**63")
    return math.prod(shape)


def raw_to_numpy(
    raw: bytes | memoryview,
    datatype: str,
    shape: Sequence[int],
    name: str,
    kind: str = "input",
) -> np.ndarray:
    """Decode one raw tensor to numpy (zero-copy, read-only for fixed-size types).

    Validates that the byte count is ``prod(shape) * itemsize`` (BYTES: the element count) and
    raises InvalidArgument naming the tensor otherwise. ``kind`` ("input"/"output") prefixes messages.
    """
    label = f"{kind} '{name}'"
    if datatype not in V2_DATATYPES:
        raise InvalidArgument(f"{label}: unknown datatype '{datatype}', expected one of {', '.join(V2_DATATYPES)}")
    shape = tuple(int(d) for d in shape)
    dtype = numpy_dtype(datatype)
    count = _element_count(shape, label, dtype.itemsize)
    if datatype == "BYTES":
        return _deserialize_bytes(raw, count, label).reshape(shape)
    nbytes = raw.nbytes if isinstance(raw, memoryview) else len(raw)
    expected = count * dtype.itemsize
    if nbytes != expected:
        raise InvalidArgument(
            f"{label}: expected {expected} bytes for shape {_fmt_shape(shape)} {datatype}, got {nbytes}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count)
    if datatype == "BOOL" and count:
        as_u8 = arr.view(np.uint8)
        if as_u8.max() > 1:  # normalise non-canonical true bytes so numpy bool ops behave
            arr = as_u8 != 0
    return arr.reshape(shape)


# --------------------------------------------------------------------------------------------------
# typed contents
# --------------------------------------------------------------------------------------------------


def _contents_to_numpy(tensor: Any, label: str) -> np.ndarray:
    """Decode a tensor's typed ``contents`` (InferInputTensor or InferOutputTensor)."""
    datatype = tensor.datatype
    shape = tuple(tensor.shape)
    count = _element_count(shape, label, numpy_dtype(datatype).itemsize if datatype in V2_DATATYPES else 8)
    contents = tensor.contents
    present = [fd.name for fd, _ in contents.ListFields()]
    if datatype in ("FP16", "BF16"):
        if present:
            raise InvalidArgument(
                f"{label}: {datatype} data must be sent in raw contents, typed contents are not supported"
            )
        if count:
            raise InvalidArgument(f"{label}: expected {count} {datatype} elements, got no data")
        return np.empty(shape, dtype=numpy_dtype(datatype))
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"{label}: unknown datatype '{datatype}', expected one of {', '.join(V2_DATATYPES)}")
    wrong = [f for f in present if f != field]
    if wrong:
        raise InvalidArgument(f"{label}: datatype {datatype} expects {field}, got {', '.join(wrong)}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"{label}: expected {count} elements for shape {_fmt_shape(shape)} {datatype}, got {len(values)} in {field}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=np.object_)
        if count:
            out[:] = list(values)
        return out.reshape(shape)
    arr = np.fromiter(values, dtype=_FIELD_DTYPE[field], count=count)
    dtype = numpy_dtype(datatype)
    if arr.dtype != dtype:
        if dtype.kind in "iu" and count:
            info = np.iinfo(dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                bad = lo if lo < info.min else hi
                raise InvalidArgument(f"{label}: value {bad} is out of range for {datatype} [{info.min}, {info.max}]")
        arr = arr.astype(dtype)
    return arr.reshape(shape)


def _has_contents(tensor: Any) -> bool:
    return tensor.HasField("contents") and bool(tensor.contents.ListFields())


def decode_request(payload: bytes) -> pb.ModelInferRequest:
    """A serialized ModelInferRequest parsed; InvalidArgument when it is not one."""
    try:
        return pb.ModelInferRequest.FromString(payload)
    except DecodeError as exc:
        raise InvalidArgument(f"malformed ModelInferRequest: {exc}") from None


def known_fields_only(payload: bytes) -> tuple[bytes, None]:
    """The request re-serialized without unknown fields, in the offload form (a helper process does this
    for large payloads: parsing millions of unknown fields holds the GIL for seconds; the result parses
    at memcpy speed)."""
    request = decode_request(payload)
    request.DiscardUnknownFields()
    return request.SerializeToString(), None


SHARED_MEMORY_REGION = "shared_memory_region"  # the tensor parameter of Triton's shared-memory extension

# (input tensor, label) -> its bytes from shared memory, or None when it has no region
SharedReader = Callable[[Any, str], Any]  # bytes | memoryview | a device buffer | None


def decode_inputs(request: pb.ModelInferRequest, read_shared: SharedReader | None = None) -> dict[str, np.ndarray]:
    """Decode all inputs of a ModelInferRequest into ``{name: array}`` (in request order).

    Uses ``raw_input_contents`` (exactly one entry per input not in shared memory) when present, else
    typed ``contents``. An input in shared memory (parameter ``shared_memory_region``) takes its bytes
    from ``read_shared``; without one such an input is refused.
    Raises InvalidArgument for duplicate/empty names, negative dimensions, unknown datatypes,
    raw/contents mixing, raw count mismatch, and data that does not match the shape.
    """
    inputs = request.inputs
    raws = request.raw_input_contents
    shared: dict[int, Any] = {}  # bytes, a memoryview, or a device buffer
    for i, tensor in enumerate(inputs):
        if SHARED_MEMORY_REGION in tensor.parameters:
            label = f"input '{tensor.name}'"
            data = read_shared(tensor, label) if read_shared is not None else None
            if data is None:
                raise InvalidArgument(f"{label}: shared-memory tensors are not served by this endpoint")
            if _has_contents(tensor):
                raise InvalidArgument(f"{label}: has both a shared-memory region and typed contents")
            shared[i] = data
    use_raw = len(raws) > 0
    inline = len(inputs) - len(shared)
    if use_raw and len(raws) != inline:
        raise InvalidArgument(
            f"expected {inline} raw_input_contents entries (one per input"
            + (" not in shared memory" if shared else "")
            + f"), got {len(raws)}"
        )
    out: dict[str, np.ndarray] = {}
    raw_index = 0
    for i, tensor in enumerate(inputs):
        name = tensor.name
        if not name:
            raise InvalidArgument(f"input at position {i} has no name")
        label = f"input '{name}'"
        if name in out:
            raise InvalidArgument(f"{label} is given more than once")
        if i in shared:
            data = shared[i]
            if isinstance(data, bytes | memoryview):
                out[name] = raw_to_numpy(data, tensor.datatype, tensor.shape, name, "input")
            else:  # device memory left in place (sharedmem.cuda.DeviceArray)
                out[name] = _device_input(data, tensor.datatype, tensor.shape, name)
        elif use_raw:
            if _has_contents(tensor):
                raise InvalidArgument(f"{label}: typed contents cannot be mixed with raw_input_contents in one request")
            out[name] = raw_to_numpy(raws[raw_index], tensor.datatype, tensor.shape, name, "input")
            raw_index += 1
        else:
            out[name] = _contents_to_numpy(tensor, label)
    return out


def _device_input(data: Any, datatype: str, shape: Sequence[int], name: str) -> Any:
    """A device buffer typed as the input's datatype and shape, checked like raw bytes (BYTES: via host)."""
    if datatype == "BYTES" or datatype not in V2_DATATYPES:
        return raw_to_numpy(data.to_host().tobytes(), datatype, shape, name, "input")
    shape = tuple(int(d) for d in shape)
    dtype = numpy_dtype(datatype)
    expected = _element_count(shape, f"input '{name}'", dtype.itemsize) * dtype.itemsize
    if data.nbytes != expected:
        raise InvalidArgument(
            f"input '{name}': expected {expected} bytes for shape {_fmt_shape(shape)} {datatype}, got {data.nbytes}"
        )
    return data.typed(dtype, shape)


# --------------------------------------------------------------------------------------------------
# parameters and responses
# --------------------------------------------------------------------------------------------------


def set_parameter(target: Any, key: str, value: ParameterValue, context: str = "parameter") -> None:
    """Store a Python value into a protobuf ``map<string, InferParameter>`` entry.

    bool -> bool_param, int -> int64_param (uint64_param above INT64_MAX), float -> double_param,
    str -> string_param, InferParameter -> copied. Anything else raises InvalidArgument naming
    ``context`` and ``key``.
    """
    if not isinstance(key, str):
        raise InvalidArgument(f"{context} names must be strings, got {type(key).__name__}")
    check_unicode(key, f"{context} name")
    if isinstance(value, str):
        check_unicode(value, f"{context} {key!r}")
    param = target[key]
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            param.int64_param = value
        elif _INT64_MAX < value <= _UINT64_MAX:
            param.uint64_param = value
        else:
            del target[key]
            raise InvalidArgument(f"{context} '{key}': integer {value} does not fit in 64 bits")
    elif isinstance(value, float):
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    elif isinstance(value, pb.InferParameter):
        param.CopyFrom(value)
    else:
        del target[key]
        raise InvalidArgument(f"{context} '{key}': value must be a bool, number or string, got {type(value).__name__}")


def nonnegative_int(param: pb.InferParameter, what: str) -> int:
    """The value of an integer parameter (int64_param or uint64_param); InvalidArgument naming ``what``
    (e.g. "request parameter 'timeout'") when it holds another type or a negative number."""
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"{what} must be an integer, got {kind or 'nothing'}")
    value = int(getattr(param, kind))
    if value < 0:
        raise InvalidArgument(f"{what} must not be negative, got {value}")
    return value


def check_unicode(text: str, what: str) -> None:
    """InvalidArgument when ``text`` cannot be UTF-8 (a lone UTF-16 surrogate, which Python's JSON
    decoder lets through from a ``\\udXXX`` escape); protobuf string fields refuse such text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(
            f"{what} is not valid Unicode: a lone UTF-16 surrogate \\u{ord(text[e.start]):04x} at character {e.start}"
        ) from None


def build_response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Sequence[tuple[str, np.ndarray]],
    parameters: Mapping[str, ParameterValue] | None = None,
    shared: Mapping[str, Mapping[str, ParameterValue]] | None = None,
) -> pb.ModelInferResponse:
    """Build a ModelInferResponse with every output in ``raw_output_contents``, in the given order.

    The V2 datatype of each output is derived from its numpy dtype (object/str/bytes -> BYTES).
    Outputs named in ``shared`` were written to shared memory: they get an empty raw entry (so the
    indexes of the others still line up, as tritonclient expects) and those parameters.
    """
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    if parameters:
        for key, value in parameters.items():
            set_parameter(response.parameters, key, value, "response parameter")
    out_tensors = response.outputs
    raws = response.raw_output_contents
    for name, arr in outputs:
        arr = np.asarray(arr)
        datatype = datatype_of(arr.dtype)
        tensor = out_tensors.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(arr.shape)
        if shared is not None and name in shared:
            for key, value in shared[name].items():
                set_parameter(tensor.parameters, key, value, "output parameter")
            raws.append(b"")
        else:
            raws.append(tensor_to_raw(arr, datatype))
    return response


def response_to_numpy(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Decode a ModelInferResponse's outputs (raw or typed contents) into ``{name: array}``."""
    outputs = response.outputs
    raws = response.raw_output_contents
    if raws and len(raws) != len(outputs):
        raise InternalError(f"response has {len(raws)} raw_output_contents entries for {len(outputs)} outputs")
    result: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(outputs):
        if raws:
            result[tensor.name] = raw_to_numpy(raws[i], tensor.datatype, tensor.shape, tensor.name, "output")
        else:
            result[tensor.name] = _contents_to_numpy(tensor, f"output '{tensor.name}'")
    return result
