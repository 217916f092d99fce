"""TensorFlow Serving's REST ``:predict`` JSON <-> KServe V2 messages.

Request (:func:`parse_predict_body`, :func:`predict_json_to_infer`), as TF-Serving reads it:

* row form ``{"signature_name"?, "instances": [...]}``: one entry per row; a value when the model has
  one input, else an object keyed by input name (every row with the same names). The rows are
  stacked, so each input's shape is ``[rows, *shape of one row]``.
* columnar form ``{"signature_name"?, "inputs": value or {name: value}}``: each value is the whole
  tensor, its shape given by its nesting.
* JSON carries no dtype: numbers take the model input's datatype (from the V2 metadata), with the
  same range and type checks as the V2 JSON API. BYTES values are JSON strings (sent as UTF-8) or
  ``{"b64": "<base64>"}`` for arbitrary bytes.

Response (:func:`render_predict_response`): ``{"predictions": [...]}`` for the row form (per row a
value when the model answers one output, else an object by output name; every output must then
have the same first dimension) and ``{"outputs": value or {name: value}}`` for the columnar form.
A BYTES output is written ``{"b64": ...}`` when its name ends in ``_bytes`` (TF-Serving's rule) or
when it is not valid UTF-8 (JSON text cannot hold it); otherwise as a string. Non-finite floats are
written ``NaN`` / ``Infinity`` / ``-Infinity``, as TF-Serving does.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from dl_inference.errors import InvalidArgument
from dl_inference.protocol.datatypes import BF16
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.http_codec import _json_numeric, _json_type, _load_json, _short
from dl_inference.protocol.tensors import _element_count, check_unicode, response_to_numpy, serialize_bytes_tensor

__all__ = [
    "PredictBody", "parse_predict_body", "predict_body_to_infer", "predict_json_to_infer",
    "render_predict_body", "render_predict_response",
]  # fmt: skip


@dataclass
class PredictBody:
    """A parsed ``:predict`` body: the signature it names and its row or columnar inputs."""

    signature_name: str
    row: bool  # "instances" (row form) or "inputs" (columnar form)
    data: Any


def parse_predict_body(body: bytes, max_json_depth: int) -> PredictBody:
    """Parse and check the top level of a ``:predict`` body; InvalidArgument when malformed."""
    if not body.strip():
        raise InvalidArgument('the request body is empty: send {"instances": [...]} or {"inputs": ...}')
    root = _load_json(body, max_json_depth)
    if not isinstance(root, dict):
        raise InvalidArgument(f"the request body must be a JSON object, got {_json_type(root)}")
    signature = root.get("signature_name", "")
    if not isinstance(signature, str):
        raise InvalidArgument(f"'signature_name' must be a string, got {_json_type(signature)}")
    check_unicode(signature, "'signature_name'")
    unknown = sorted(set(root) - {"signature_name", "instances", "inputs"})
    if unknown:
        raise InvalidArgument(
            f"unknown key(s) {', '.join(repr(k) for k in unknown)} in the request; "
            f"expected 'instances' or 'inputs', and optionally 'signature_name'"
        )
    if "instances" in root and "inputs" in root:
        raise InvalidArgument("the request has both 'instances' and 'inputs'; send only one of them")
    if "instances" in root:
        instances = root["instances"]
        if not isinstance(instances, list):
            raise InvalidArgument(f"'instances' must be a JSON array, got {_json_type(instances)}")
        if not instances:
            raise InvalidArgument("'instances' is empty: send at least one row")
        return PredictBody(signature, True, instances)
    if "inputs" in root:
        return PredictBody(signature, False, root["inputs"])
    raise InvalidArgument("the request has neither 'instances' (row form) nor 'inputs' (columnar form)")


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _leaves(value: Any, label: str) -> tuple[list[int], list[Any]]:
    """Shape of a nested JSON array and its leaves in row-major order; InvalidArgument when ragged."""
    shape: list[int] = []
    level = [value]
    while level and isinstance(level[0], list):
        n = len(level[0])
        for item in level:
            if not isinstance(item, list) or len(item) != n:
                raise InvalidArgument(
                    f"{label}: the values do not form a rectangular array (nested lists of different "
                    f"lengths, or lists mixed with values at depth {len(shape)})"
                )
        shape.append(n)
        level = [x for item in level for x in item]
    if level and any(isinstance(x, list) for x in level):
        raise InvalidArgument(
            f"{label}: the values do not form a rectangular array (lists mixed with values at depth {len(shape)})"
        )
    return shape, level


def _bytes_of(value: Any, label: str) -> bytes:
    if isinstance(value, str):
        check_unicode(value, label)
        return value.encode("utf-8")
    if _is_b64(value):
        text = value["b64"]
        if not isinstance(text, str):
            raise InvalidArgument(f"{label}: 'b64' must be a base64 string, got {_json_type(text)}")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidArgument(f"{label}: 'b64' is not valid base64: {exc}") from None
    raise InvalidArgument(
        f'{label}: BYTES values must be strings or {{"b64": "..."}} objects, got {_json_type(value)} {_short(value)}'
    )


def _tensor(value: Any, name: str, datatype: str) -> tuple[list[int], bytes]:
    """Shape and V2 raw bytes of one input's JSON value."""
    label = f"input '{name}'"
    shape, leaves = _leaves(value, label)
    if datatype == "BYTES":
        _element_count(shape, label)
        items = np.empty(len(leaves), dtype=np.object_)
        items[:] = [_bytes_of(v, label) for v in leaves]
        return shape, serialize_bytes_tensor(items)
    for v in leaves[:1]:
        if _is_b64(v):
            raise InvalidArgument(
                f'{label}: a {{"b64": ...}} value needs a BYTES (DT_STRING) input, this one is {datatype}'
            )
    arr = _json_numeric(leaves, datatype, label)
    return shape, arr.tobytes()


def _named(data: Any) -> bool:
    return isinstance(data, dict) and not _is_b64(data)


def _input_values(body: PredictBody, inputs: Mapping[str, str], model: str) -> dict[str, Any]:
    """Input name -> its whole JSON value (rows stacked into one nested array in the row form)."""
    names = list(inputs)
    first = body.data[0] if body.row else body.data
    if not _named(first):
        if len(names) != 1:
            raise InvalidArgument(
                f"model '{model}' has {len(names)} inputs ({', '.join(names)}): "
                + ("each instance must be an object keyed by input name" if body.row
                   else "'inputs' must be an object keyed by input name")
            )  # fmt: skip
        if body.row and any(_named(row) for row in body.data):
            raise InvalidArgument("instances mix objects and plain values; use one form for every row")
        return {names[0]: body.data}
    if not body.row:
        return dict(first)
    keys = set(first)
    for i, row in enumerate(body.data):
        if not _named(row):
            raise InvalidArgument(f"instance {i} is {_json_type(row)}, but instance 0 is an object of named inputs")
        if set(row) != keys:
            raise InvalidArgument(
                f"instance {i} names inputs {sorted(row)}, but instance 0 names {sorted(keys)}; "
                f"every instance must name the same inputs"
            )
    return {key: [row[key] for row in body.data] for key in first}


def predict_json_to_infer(
    body: PredictBody, metadata: pb.ModelMetadataResponse, model: str, version: str
) -> pb.ModelInferRequest:
    """The V2 request for a parsed ``:predict`` body, typed by the model's V2 metadata."""
    inputs = {t.name: t.datatype for t in metadata.inputs}
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, value in _input_values(body, inputs, model).items():
        check_unicode(name, "an input name")
        datatype = inputs.get(name)
        if datatype is None:
            raise InvalidArgument(
                f"unexpected input '{name}' for model '{model}', expected one of: {', '.join(inputs)}"
            )
        shape, raw = _tensor(value, name, datatype)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def predict_body_to_infer(
    body: bytes, max_json_depth: int, metadata: bytes, model: str, version: str
) -> tuple[bytes, tuple[str, bool]]:
    """Parse a ``:predict`` body into ``(serialized V2 request, (signature name, row form))``, given the
    model's serialized V2 metadata (the form :func:`dl_inference.offload.call` takes)."""
    parsed = parse_predict_body(body, max_json_depth)
    request = predict_json_to_infer(parsed, pb.ModelMetadataResponse.FromString(metadata), model, version)
    return request.SerializeToString(), (parsed.signature_name, parsed.row)


# --------------------------------------------------------------------------------------------------
# response
# --------------------------------------------------------------------------------------------------


def _text_or_b64(value: bytes, b64: bool) -> Any:
    if not b64:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(value).decode("ascii")}


def _bytes_json(nested: Any, b64: bool) -> Any:
    if isinstance(nested, list):
        return [_bytes_json(v, b64) for v in nested]
    return _text_or_b64(nested if isinstance(nested, bytes) else str(nested).encode("utf-8"), b64)


def _to_json(name: str, arr: np.ndarray) -> tuple[Any, bool]:
    """JSON-ready nested value of an output, and whether all of it is finite."""
    if arr.dtype == np.object_:
        return _bytes_json(arr.tolist(), name.endswith("_bytes")), True
    if arr.dtype == BF16:
        arr = arr.astype(np.float32)
    finite = arr.dtype.kind != "f" or bool(np.isfinite(arr).all())
    return arr.tolist(), finite


def _dumps(doc: dict[str, Any], finite: bool) -> bytes:
    if finite:
        try:
            return orjson.dumps(doc)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def render_predict_response(response: pb.ModelInferResponse, row: bool) -> bytes:
    """The ``:predict`` answer body for a V2 response, in the request's form."""
    arrays = response_to_numpy(response)
    values: dict[str, Any] = {}
    finite = True
    for name, arr in arrays.items():
        values[name], ok = _to_json(name, arr)
        finite = finite and ok
    if not row:
        outputs = next(iter(values.values())) if len(values) == 1 else values
        return _dumps({"outputs": outputs}, finite)
    rows = {name: (int(arr.shape[0]) if arr.ndim else -1) for name, arr in arrays.items()}
    sizes = set(rows.values())
    if -1 in sizes or len(sizes) > 1:
        described = ", ".join(f"{n}: {'scalar' if r < 0 else r}" for n, r in rows.items())
        raise InvalidArgument(
            f"the outputs cannot be returned as rows: their first dimensions differ ({described}); "
            f"send the request in columnar form ('inputs') instead"
        )
    count = sizes.pop() if sizes else 0
    if len(values) == 1:
        predictions: list[Any] = next(iter(values.values()))
    else:
        predictions = [{name: value[i] for name, value in values.items()} for i in range(count)]
    return _dumps({"predictions": predictions}, finite)


def render_predict_body(reply: bytes, row: bool) -> tuple[bytes, None]:
    """:func:`render_predict_response` of a serialized V2 response (the offload form)."""
    return render_predict_response(pb.ModelInferResponse.FromString(reply), row), None
