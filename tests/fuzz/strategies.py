"""Hypothesis strategies shared by the fuzz tests.

* valid V2 tensors of every datatype (:func:`arrays`), edge values included;
* HTTP infer requests as a JSON document plus binary chunks (:class:`HttpCase`): built valid for a
  list of tensor specs, then broken in exactly one way (:func:`broken_http_cases`), so that the
  error can be expected to name the tensor or field that was broken;
* ModelInferRequest messages with mismatched raw sizes, wrong datatypes, odd shapes, contents mixed
  with raw, truncated BYTES framing (:func:`infer_requests`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dl_inference.errors import InternalError, ServerError, Unimplemented
from dl_inference.protocol.datatypes import V2_DATATYPES, numpy_dtype
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.tensors import serialize_bytes_tensor

BF16 = np.dtype(ml_dtypes.bfloat16)
INT64_MAX = 2**63 - 1

# --------------------------------------------------------------------------------------------------
# the property every parser must keep
# --------------------------------------------------------------------------------------------------


def check_client_error(exc: BaseException, fragments: tuple[str, ...] = ()) -> None:
    """``exc`` must be a client error (4xx) and, when ``fragments`` is given, name one of them.

    The one 5xx allowed is 501 for a shared-memory input, a feature this server does not offer.
    """
    if not isinstance(exc, ServerError):
        raise AssertionError(f"not a ServerError: {type(exc).__name__}: {exc}") from exc
    assert not isinstance(exc, InternalError), f"InternalError for client input: {exc.message}"
    assert exc.message, "error without a message"
    exc.message.encode("utf-8")  # it goes into a gRPC status, a worker frame, an HTTP body
    if isinstance(exc, Unimplemented):
        assert "shared-memory" in exc.message, exc.message
    else:
        assert 400 <= exc.http_status < 500, f"{exc.http_status}: {exc.message}"
    if fragments:
        assert any(f in exc.message for f in fragments), f"{exc.message!r} names none of {fragments}"


# --------------------------------------------------------------------------------------------------
# valid tensors
# --------------------------------------------------------------------------------------------------

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
datatypes = st.sampled_from(V2_DATATYPES)
# Text that JSON can carry (no lone surrogates) and names for tensors.
clean_text = st.text(max_size=10)
names = st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=8)


def arrays(datatype: str, shape: Any = shapes, utf8: bool = False) -> st.SearchStrategy[np.ndarray]:
    """Arrays of ``datatype`` (BF16 from any bit pattern; BYTES as ``bytes``, UTF-8 when ``utf8``)."""
    if datatype == "BYTES":
        element = clean_text.map(lambda s: s.encode()) if utf8 else st.binary(max_size=12)

        def build(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
            n = math.prod(shape)
            return st.lists(element, min_size=n, max_size=n).map(lambda v: _object_array(v, shape))

        return (st.just(shape) if isinstance(shape, tuple) else shape).flatmap(build)
    if datatype == "BF16":
        return hnp.arrays(np.uint16, shape).map(lambda a: a.view(BF16))
    return hnp.arrays(numpy_dtype(datatype), shape)


def _object_array(values: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(len(values), dtype=np.object_)
    out[:] = values
    return out.reshape(shape)


def same_values(got: np.ndarray, want: np.ndarray, exact: bool = True) -> bool:
    """Same shape, dtype and values; ``exact=False`` lets NaNs differ in sign and payload (JSON)."""
    if got.shape != want.shape:
        return False
    if want.dtype == np.object_:
        return got.dtype == np.object_ and got.ravel().tolist() == want.ravel().tolist()
    if got.dtype != want.dtype:
        return False
    if exact or not (want.dtype.kind == "f" or want.dtype == BF16):
        return got.tobytes() == want.tobytes()
    g, w = got.astype(np.float64), want.astype(np.float64)
    nan = np.isnan(w)
    return bool((np.isnan(g) == nan).all() and (g[~nan].tobytes() == w[~nan].tobytes()))


def json_data(arr: np.ndarray, nested: bool) -> Any:
    """``arr`` as JSON ``data`` (flat or nested), the way tritonclient writes it."""
    if arr.dtype == np.object_:
        values: Any = np.array([v.decode() for v in arr.ravel().tolist()] or [], dtype=object).reshape(arr.shape)
    elif arr.dtype == BF16:
        values = arr.astype(np.float32)
    else:
        values = arr
    if not nested or values.ndim == 0:
        return values.ravel().tolist()
    return values.tolist()


# --------------------------------------------------------------------------------------------------
# arbitrary JSON values, for fields of the wrong type
# --------------------------------------------------------------------------------------------------

# Unicode including lone surrogates: json writes them as \udXXX escapes, Python's json reads them back.
any_text = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=8)
huge_ints = st.sampled_from([2**31, 2**32, 2**53 + 1, INT64_MAX, 2**63, 2**64 - 1, 2**64, 10**30, -(2**63) - 1])
json_scalars = (
    st.none() | st.booleans() | st.integers() | huge_ints | huge_ints.map(lambda v: -v) | st.floats() | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


def nest(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


# --------------------------------------------------------------------------------------------------
# HTTP requests: a valid document for some tensors, then broken one way
# --------------------------------------------------------------------------------------------------


@dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]


@dataclass
class HttpCase:
    """One HTTP infer request: ``doc`` is the JSON header, ``chunks`` the binary data after it."""

    doc: Any
    chunks: list[bytes] = field(default_factory=list)
    header_length: int | str | None = "auto"  # "auto": the header's length when there are chunks
    ensure_ascii: bool = True
    tail: bytes = b""  # extra bytes after the chunks
    #: what the error, if any, must mention (any one of them); empty: anything
    fragments: tuple[str, ...] = ()
    #: expected decoded inputs when nothing was broken
    expected: dict[str, tuple[np.ndarray, bool]] | None = None
    what: str = "valid"

    def body(self) -> tuple[bytes, int | None]:
        header = json.dumps(self.doc, ensure_ascii=self.ensure_ascii).encode("utf-8", "surrogatepass")
        body = header + b"".join(self.chunks) + self.tail
        if self.header_length == "auto":
            return body, (len(header) if self.chunks or self.tail else None)
        assert not isinstance(self.header_length, str)
        return body, self.header_length

    def header_size(self) -> int:
        return len(json.dumps(self.doc, ensure_ascii=self.ensure_ascii).encode("utf-8", "surrogatepass"))


def tensor_specs(max_inputs: int = 3) -> st.SearchStrategy[list[TensorSpec]]:
    spec = st.builds(TensorSpec, names, datatypes, shapes.map(list))
    return st.lists(spec, min_size=1, max_size=max_inputs, unique_by=lambda s: s.name)


@st.composite
def valid_http_cases(draw: st.DrawFn, specs: list[TensorSpec] | None = None) -> HttpCase:
    """A valid request for ``specs`` (drawn when None): each input JSON or binary at random."""
    if specs is None:
        specs = draw(tensor_specs())
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["id"] = draw(clean_text)
    if draw(st.booleans()):
        doc["parameters"] = draw(
            st.dictionaries(
                clean_text.filter(lambda k: k not in ("binary_data_output", "priority", "timeout")),
                st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | clean_text,
                max_size=3,
            )
        )
        if draw(st.booleans()):
            doc["parameters"]["binary_data_output"] = draw(st.booleans())
    inputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    expected: dict[str, tuple[np.ndarray, bool]] = {}
    for spec in specs:
        binary = draw(st.booleans())
        arr = draw(arrays(spec.datatype, tuple(spec.shape), utf8=not binary))
        entry: dict[str, Any] = {"name": spec.name, "shape": list(spec.shape), "datatype": spec.datatype}
        if binary:
            raw = serialize_bytes_tensor(arr) if spec.datatype == "BYTES" else arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = json_data(arr, nested=draw(st.booleans()))
        inputs.append(entry)
        expected[spec.name] = (arr, binary)
    doc["inputs"] = inputs
    if draw(st.booleans()):
        out_names = draw(st.lists(names, max_size=3, unique=True))
        outputs = []
        for name in out_names:
            out: dict[str, Any] = {"name": name}
            if draw(st.booleans()):
                out["parameters"] = {"binary_data": draw(st.booleans())}
            outputs.append(out)
        doc["outputs"] = outputs
    return HttpCase(doc, chunks, ensure_ascii=draw(st.booleans()), expected=expected)


def _input_fragments(doc: dict[str, Any], index: int) -> tuple[str, ...]:
    name = doc["inputs"][index].get("name") if isinstance(doc["inputs"][index], dict) else None
    frags = [f"position {index}"]
    if isinstance(name, str):
        frags.append(f"'{name}'")
    return tuple(frags)


# Values that break a shape: wrong types, negative, beyond int64, products beyond 2**63.
bad_shapes = st.one_of(
    json_values,
    st.lists(st.integers(), max_size=4),
    st.lists(huge_ints | st.integers(-3, 3), min_size=1, max_size=4),
    st.sampled_from([[2**62, 4, 0], [2**33, 2**33, 0], [0, 2**40, 2**40], [2**63], [2**64], [-1], [1.0], [True]]),
)


def _wrong_elements(datatype: str) -> st.SearchStrategy[Any]:
    """Elements outside ``datatype``'s JSON domain: other types, out-of-range numbers, non-finite."""
    if datatype == "BYTES":
        return json_scalars.filter(lambda v: not isinstance(v, str)) | st.lists(clean_text, max_size=2)
    if datatype == "BOOL":
        return json_scalars.filter(lambda v: not isinstance(v, bool))
    dtype = numpy_dtype(datatype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return st.one_of(
            st.sampled_from([int(info.max) + 1, int(info.min) - 1, 2**64, -(2**63) - 1, 10**40]),
            st.floats(),
            any_text,
            st.none(),
        )
    limit = {"FP16": 65520.0, "FP32": 3.5e38, "BF16": 3.4e38, "FP64": None}[datatype]
    out = st.one_of(any_text, st.none(), st.dictionaries(any_text, st.integers(), max_size=1), st.just(10**400))
    if limit is not None:
        out |= st.sampled_from([limit, -limit, 1e300, -1e300])
    return out


#: The ways :func:`broken_http_cases` breaks a request.
BREAKS = (
    "field",  # an input's name/datatype/shape/data/parameters: removed or of any JSON type
    "shape",  # wrong types, negative, beyond int64, products beyond 2**63
    "data",  # element count off, ragged, out of range for the datatype, wrong types, extra nesting
    "datatype",  # another datatype (data no longer fits) or a near-miss spelling
    "duplicate",  # the same input name twice
    "in_params",  # binary_data_size off / negative / huge / wrong type, shared_memory_region, junk
    "top",  # id / parameters / inputs of the wrong type, binary_data_output not a boolean
    "outputs",  # outputs of the wrong shape or type, duplicate output names
    "header_length",  # Inference-Header-Content-Length off by one, 0, negative, huge, missing
    "binary_tail",  # binary data shorter or longer than the sizes say
    "bytes_framing",  # a BYTES input with its length prefixes truncated, lying, or a huge count
    "deep",  # nesting around the depth limit
    "doc",  # the document is not an object
    "surrogate",  # a lone UTF-16 surrogate (a \udXXX escape) in a name, key, value or BYTES element
)


@st.composite
def broken_http_cases(draw: st.DrawFn, specs: list[TensorSpec] | None = None, kind: str | None = None) -> HttpCase:
    """A valid request broken in one way (``kind``, drawn from :data:`BREAKS` when None), with the
    names its error must mention."""
    case = draw(valid_http_cases(specs))
    doc = case.doc
    inputs = doc["inputs"]
    i = draw(st.integers(0, len(inputs) - 1))
    item = inputs[i]
    frags = _input_fragments(doc, i)
    kind = kind or draw(st.sampled_from(BREAKS))
    case.what = kind
    case.expected = None
    if kind == "field":
        key = draw(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]))
        if draw(st.booleans()):
            item.pop(key, None)
        else:
            item[key] = draw(json_values)
            if key == "name" and isinstance(item[key], str):
                frags = (*frags, f"'{item[key]}'")
        case.fragments = (*frags, "binary data")  # a binary input's chunk may be left over
    elif kind == "shape":
        item["shape"] = draw(bad_shapes)
        case.fragments = frags + (("binary data",) if "parameters" in item else ())
    elif kind == "data":
        datatype = item["datatype"]
        data = item.get("data")
        if data is None:  # a binary input: give it JSON data too, or instead
            item["data"] = draw(st.lists(_wrong_elements(datatype), max_size=3))
            if draw(st.booleans()):
                case.chunks.pop(sum(1 for x in inputs[:i] if "parameters" in x))
                del item["parameters"]
            case.fragments = (*frags, "binary data")
        else:
            flat = json_data_flat(data)
            how = draw(st.sampled_from(["extra", "missing", "ragged", "wrong", "nest", "scalar"]))
            if how == "extra":
                flat.append(flat[0] if flat else 0)
                item["data"] = flat
            elif how == "missing" and flat:
                item["data"] = flat[:-1]
            elif how == "ragged":
                item["data"] = [flat[:1], flat[1:]] if len(flat) > 2 else [[0], [0, 0], 0]
            elif how == "wrong":
                wrong = draw(_wrong_elements(datatype))
                if flat:
                    flat[draw(st.integers(0, len(flat) - 1))] = wrong
                else:
                    flat = [wrong]
                item["data"] = flat
            elif how == "nest":
                item["data"] = nest(flat, draw(st.integers(1, 5)))
            else:
                item["data"] = draw(json_scalars)
            case.fragments = frags
    elif kind == "datatype":
        item["datatype"] = draw(datatypes | st.sampled_from(["fp32", "FP32 ", "", "STRING", "TYPE_FP32", "FP8"]))
        case.fragments = (*frags, "binary data")
    elif kind == "duplicate":
        dup = json.loads(json.dumps(item))
        if "parameters" in dup and "binary_data_size" in dup["parameters"]:
            case.chunks.append(case.chunks[sum(1 for x in inputs[:i] if "parameters" in x)])
        inputs.append(dup)
        case.fragments = frags[1:] or frags
    elif kind == "in_params":
        params = item.setdefault("parameters", {})
        key = draw(st.sampled_from(["binary_data_size", "shared_memory_region", "binary_data", "other"]))
        if key == "binary_data_size":
            size = params.get("binary_data_size", 0)
            params["binary_data_size"] = draw(
                st.sampled_from([size + 1, size - 1, -1, 2**63, 2**64, 10**30]) | json_values
            )
            case.fragments = (*frags, "binary data", "Inference-Header-Content-Length")
        elif key == "shared_memory_region":
            params["shared_memory_region"] = draw(json_values)
            case.fragments = frags
        elif key == "binary_data":
            params["binary_data"] = draw(json_values)  # ignored on inputs
            case.fragments = frags
        else:
            params[draw(any_text)] = draw(json_values)
            case.fragments = frags
    elif kind == "top":
        key = draw(st.sampled_from(["id", "parameters", "inputs", "binary_data_output", "unknown"]))
        if key == "binary_data_output":
            doc.setdefault("parameters", {})["binary_data_output"] = draw(json_values)
            case.fragments = ("binary_data_output",)
        elif key == "unknown":
            doc[draw(any_text)] = draw(json_values)
        elif key == "parameters":
            reserved = st.sampled_from(["timeout", "priority", "sequence_id", "binary_data_output", "headers"])
            doc["parameters"] = draw(json_values | st.dictionaries(reserved | any_text, json_values, max_size=3))
            case.fragments = ("parameter",)
        else:
            doc[key] = draw(json_values)
            case.fragments = (f"'{key}'", "position", "binary data") if key == "inputs" else (f"'{key}'",)
    elif kind == "outputs":
        outputs = draw(
            json_values
            | st.lists(json_values, max_size=3)
            | st.lists(st.dictionaries(st.sampled_from(["name", "parameters"]), json_values), max_size=3)
            | st.just([{"name": "o"}, {"name": "o"}])
        )
        doc["outputs"] = outputs
        case.fragments = ("output",)
    elif kind == "header_length":
        size = case.header_size()
        case.header_length = draw(
            st.sampled_from([size + 1, size - 1, 0, -1, -size, size + 10**6, 2**63, 1, None]) | st.integers()
        )
        case.fragments = ("Inference-Header-Content-Length", "JSON", "binary", "raw binary", "request")
    elif kind == "binary_tail":
        if case.chunks and draw(st.booleans()):
            last = case.chunks[-1]
            case.chunks[-1] = last[: draw(st.integers(0, max(len(last) - 1, 0)))]
        else:
            case.tail = draw(st.binary(min_size=1, max_size=9))
        binary = [x["name"] for x in inputs if "binary_data_size" in x.get("parameters", {})]
        case.fragments = ("binary data", *(f"'{n}'" for n in binary[-1:]))
    elif kind == "bytes_framing":
        # A BYTES input sent binary with its length prefixes wrong: parses, fails to decode.
        name = draw(names.filter(lambda n: n not in {x.get("name") for x in inputs}))
        raw = serialize_bytes_tensor(np.array([b"ab", b"\xff\xfe\xfd"], dtype=object))
        cut = draw(st.sampled_from(["truncate_prefix", "truncate_data", "extra", "huge_length", "huge_count"]))
        shape = [2]
        if cut == "truncate_prefix":
            raw = raw[:2]
        elif cut == "truncate_data":
            raw = raw[:-1]
        elif cut == "extra":
            raw += b"\x00"
        elif cut == "huge_length":
            raw = b"\xff\xff\xff\xff" + raw[4:]
        else:
            shape = [draw(st.sampled_from([2**31, 2**40, 2**62, INT64_MAX]))]
        inputs.append({"name": name, "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": len(raw)}})
        case.chunks.append(raw)
        case.fragments = (f"'{name}'",)
    elif kind == "deep":
        depth = draw(st.integers(55, 70))
        where = draw(st.sampled_from(["data", "parameters", "id"]))
        if where == "data":
            item["data"] = nest(0, depth)
        elif where == "parameters":
            item["parameters"] = {"p": nest(0, depth)}
        else:
            doc["id"] = nest("x", depth)
        case.fragments = ("nested", *frags, "'id'")
    elif kind == "surrogate":
        lone = draw(st.characters(categories=["Cs"]))
        text = draw(st.text(max_size=3)) + lone + draw(st.text(max_size=3))
        where = draw(st.sampled_from(["id", "name", "param_key", "param_value", "in_param", "output", "bytes"]))
        if where == "id":
            doc["id"] = text
            case.fragments = ("'id'",)
        elif where == "name":
            item["name"] = text
            case.fragments = (f"position {i}",)
        elif where in ("param_key", "param_value"):
            params = doc.setdefault("parameters", {})
            params[text if where == "param_key" else "p"] = text if where == "param_value" else 1
            case.fragments = ("request parameter",)
        elif where == "in_param":
            item.setdefault("parameters", {})[text] = text
            case.fragments = frags
        elif where == "output":
            doc["outputs"] = [{"name": text}]
            case.fragments = ("output at position 0",)
        else:
            name = draw(names.filter(lambda n: n not in {x.get("name") for x in inputs}))
            inputs.append({"name": name, "datatype": "BYTES", "shape": [2], "data": ["ok", text]})
            case.fragments = (f"'{name}'",)
    else:  # the whole document of the wrong type
        case.doc = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        case.chunks = []
        case.fragments = ("request JSON",)
    if not case.ensure_ascii:
        try:
            json.dumps(case.doc, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # lone surrogates written raw: the header is not UTF-8
            case.fragments = (*case.fragments, "UTF-8")
    return case


def json_data_flat(data: Any) -> list[Any]:
    """Leaves of (rectangular) JSON data, row-major."""
    if isinstance(data, list):
        return [leaf for item in data for leaf in json_data_flat(item)]
    return [data]


# --------------------------------------------------------------------------------------------------
# ModelInferRequest messages
# --------------------------------------------------------------------------------------------------

pb_shapes = st.one_of(
    shapes.map(list),
    st.lists(st.integers(-(2**63), INT64_MAX), max_size=4),
    st.lists(st.sampled_from([0, 1, 2, -1, 2**31, 2**32, 2**62, INT64_MAX, -(2**63)]), max_size=4),
)
pb_datatypes = datatypes | st.sampled_from(["", "fp32", "STRING", "BYTES\x00", "FP8", "TYPE_FP32"])

_CONTENTS_FIELDS = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), INT64_MAX),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=6),
}


def bytes_raw(count: int) -> st.SearchStrategy[bytes]:
    """BYTES raw data for ``count`` elements, sometimes truncated or with garbage after it."""
    valid = st.lists(st.binary(max_size=5), min_size=count, max_size=count).map(
        lambda v: serialize_bytes_tensor(_object_array(v, (len(v),)))
    )
    return st.one_of(
        valid,
        valid.flatmap(lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda n: b[:n])),
        valid.flatmap(lambda b: st.binary(min_size=1, max_size=4).map(lambda t: b + t)),
        st.binary(max_size=24),
        st.just(b"\xff\xff\xff\xff"),
    )


@st.composite
def raw_for(draw: st.DrawFn, datatype: str, shape: list[int]) -> bytes:
    """Raw contents for a tensor: the right size, off by a little, or random."""
    count = math.prod(shape) if all(0 <= d for d in shape) else 0
    if datatype == "BYTES":
        return draw(bytes_raw(min(count, 6)))
    try:
        itemsize = numpy_dtype(datatype).itemsize
    except ServerError:
        itemsize = 4
    right = count * itemsize if count * itemsize <= 256 else 0
    size = draw(st.sampled_from([right, right, right + 1, max(right - 1, 0), right + itemsize]) | st.integers(0, 40))
    return draw(st.binary(min_size=size, max_size=size))


@st.composite
def infer_requests(draw: st.DrawFn, names_pool: list[str] | None = None) -> pb.ModelInferRequest:
    """A ModelInferRequest with inputs of every kind of wrongness (or none)."""
    request = pb.ModelInferRequest()
    if draw(st.booleans()):
        request.model_name = draw(st.sampled_from(names_pool or ["m"]) | clean_text)
    if draw(st.booleans()):
        request.id = draw(clean_text)
    n = draw(st.integers(0, 3))
    raw_mode = draw(st.sampled_from(["raw", "contents", "mixed", "raw_count"]))
    raws: list[bytes] = []
    input_names = st.sampled_from(names_pool) if names_pool else clean_text
    for _ in range(n):
        t = request.inputs.add()
        t.name = draw(input_names | clean_text)
        t.datatype = draw(pb_datatypes)
        shape = draw(pb_shapes)
        t.shape.extend(shape)
        use_contents = raw_mode == "contents" or (raw_mode == "mixed" and draw(st.booleans()))
        if use_contents:
            fields = draw(st.lists(st.sampled_from(sorted(_CONTENTS_FIELDS)), max_size=2, unique=True))
            count = math.prod(shape) if all(0 <= d <= 8 for d in shape) else 2
            for fname in fields:
                values = draw(st.lists(_CONTENTS_FIELDS[fname], min_size=0, max_size=count + 1))
                if draw(st.booleans()):
                    values = (values * (count + 1))[:count]
                getattr(t.contents, fname).extend(values)
        if not use_contents or raw_mode == "mixed":
            raws.append(draw(raw_for(t.datatype, shape)))
    if raw_mode == "raw_count":
        raws = raws[: draw(st.integers(0, len(raws)))] + draw(st.lists(st.binary(max_size=8), max_size=2))
    request.raw_input_contents.extend(raws)
    if draw(st.booleans()):
        for name in draw(st.lists(clean_text, max_size=2)):
            request.outputs.add(name=name)
    if draw(st.booleans()):
        key = draw(st.sampled_from(["priority", "timeout", "x"]))
        param = request.parameters[key]
        which = draw(st.sampled_from(["int64_param", "uint64_param", "string_param", "bool_param", "double_param"]))
        value = {
            "int64_param": st.integers(-(2**63), INT64_MAX),
            "uint64_param": st.integers(0, 2**64 - 1),
            "string_param": clean_text,
            "bool_param": st.booleans(),
            "double_param": st.floats(),
        }[which]
        setattr(param, which, draw(value))
    return request


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few bytes flipped, inserted, deleted or truncated."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)
