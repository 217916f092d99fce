"""Just enough protobuf wire-format reading to route a ``ModelInferRequest`` without decoding it.

The gateway forwards the client's request bytes to a worker unchanged; to pick the worker it needs
only ``model_name`` (field 1) and ``model_version`` (field 2). Parsing the whole message would copy
every tensor, so this walks the top-level fields and skips the rest.
"""

from __future__ import annotations

from dl_inference.errors import InvalidArgument
from dl_inference.sharedmem.params import LOCATIONS, REGION


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise InvalidArgument("malformed ModelInferRequest: truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise InvalidArgument("malformed ModelInferRequest: varint too long")


# Shared-memory requests need the gateway's attention (region checks, locations); their markers can
# only sit in the request's parameters (field 4), inputs (5) or requested outputs (6).
_SHARED_MARKERS = (REGION.encode(), LOCATIONS.encode())


def route_fields(buf: bytes) -> tuple[str, str]:
    """(model_name, model_version) of a serialized ModelInferRequest; last occurrence wins."""
    name, version, _ = peek_request(buf)
    return name, version


# Fields walked in Python before the rest is left to the worker's full decode. A request has a few
# scalars plus one field per parameter, input, output and raw tensor: thousands is already unusual,
# while a request made of millions of tiny unknown fields would hold the event loop for seconds.
MAX_PEEK_FIELDS = 4096


def peek_request(buf: bytes, max_fields: int = MAX_PEEK_FIELDS) -> tuple[str, str, bool]:
    """(model_name, model_version, may use shared memory) of a serialized ModelInferRequest.

    The flag is True when the parameters, inputs or outputs contain a shared-memory marker; it may
    be a false alarm (a tensor named so), never a miss, so a True request is parsed to be sure.

    At most ``max_fields`` top-level fields are walked (every protobuf writer puts ``model_name``
    first): a longer request is flagged too, so it takes the careful path, where a helper process
    decodes it in full (the rest is not even searched here: ``bytes.find`` over 90 MB holds the GIL
    for a tenth of a second or more).
    """
    name = b""
    version = b""
    shared = False
    pos = 0
    end = len(buf)
    walked = 0
    while pos < end:
        if walked == max_fields:
            shared = True
            break
        walked += 1
        tag, pos = _varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 2:
            length, pos = _varint(buf, pos)
            stop = pos + length
            if stop > end:
                raise InvalidArgument("malformed ModelInferRequest: field runs past the end")
            if field == 1:
                name = buf[pos:stop]
            elif field == 2:
                version = buf[pos:stop]
            elif 4 <= field <= 6 and not shared:
                shared = any(buf.find(marker, pos, stop) >= 0 for marker in _SHARED_MARKERS)
            pos = stop
        elif wire_type == 0:
            _, pos = _varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise InvalidArgument(f"malformed ModelInferRequest: wire type {wire_type}")
        if pos > end:
            raise InvalidArgument("malformed ModelInferRequest: field runs past the end")
    try:
        return name.decode(), version.decode(), shared
    except UnicodeDecodeError:
        raise InvalidArgument("malformed ModelInferRequest: model name is not UTF-8") from None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def stream_response(response: bytes | None, error_message: str) -> bytes:
    """Serialize ``ModelStreamInferResponse{error_message=1, infer_response=2}`` around raw bytes."""
    out = b""
    if error_message:
        msg = error_message.encode()
        out += b"\x0a" + _encode_varint(len(msg)) + msg
    if response is not None:
        out += b"\x12" + _encode_varint(len(response)) + response
    return out
