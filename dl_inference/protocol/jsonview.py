"""Protobuf messages as the plain JSON Triton's HTTP API returns (proto field names, int64 as numbers)."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_T = FieldDescriptor


def _value(field: FieldDescriptor, value: Any, defaults: bool) -> Any:
    if field.type == _T.TYPE_MESSAGE:
        return to_json(value, defaults)
    if field.type == _T.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if field.type == _T.TYPE_BYTES:
        return value.decode(errors="replace")
    return value


def to_json(message: Message, defaults: bool = True) -> dict[str, Any]:
    """Dict of ``message``; with ``defaults`` unset scalars and empty lists are included too."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value(value_field, v, defaults) for k, v in value.items()}
        elif field.is_repeated:  # protobuf 7 removed FieldDescriptor.label
            out[field.name] = [_value(field, v, defaults) for v in value]
        elif field.type == _T.TYPE_MESSAGE:
            if message.HasField(field.name):
                out[field.name] = to_json(value, defaults)
        elif field.containing_oneof is not None:
            if message.HasField(field.name):
                out[field.name] = _value(field, value, defaults)
        else:
            out[field.name] = _value(field, value, defaults)
        if not defaults and field.name in out and out[field.name] in ({}, [], "", 0, False):
            del out[field.name]
    return out
