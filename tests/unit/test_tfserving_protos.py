"""protos/tf_serving.proto against the real TensorFlow / TF-Serving descriptors.

Our copies live in package ``dl_inference.tfserving`` (so both can be imported into one process);
the wire format carries only field numbers, so every field we keep must have the real one's number,
type and label, message-typed fields must point at the counterpart of the real type, and enums must
have the real values. Skipped when tensorflow-serving-api (and TensorFlow) are not installed.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from dl_inference.protocol.generated import tf_serving_pb2 as tfs

OURS = "dl_inference.tfserving."

# Our top-level type -> the real type's full name.
COUNTERPART = {
    "DataType": "tensorflow.DataType",
    "TensorShapeProto": "tensorflow.TensorShapeProto",
    "TensorProto": "tensorflow.TensorProto",
    "ModelSpec": "tensorflow.serving.ModelSpec",
    "PredictRequest": "tensorflow.serving.PredictRequest",
    "PredictResponse": "tensorflow.serving.PredictResponse",
    "TensorInfo": "tensorflow.TensorInfo",
    "SignatureDef": "tensorflow.SignatureDef",
    "SignatureDefMap": "tensorflow.serving.SignatureDefMap",
    "GetModelMetadataRequest": "tensorflow.serving.GetModelMetadataRequest",
    "GetModelMetadataResponse": "tensorflow.serving.GetModelMetadataResponse",
    "ErrorCode": "tensorflow.error.Code",
    "StatusProto": "tensorflow.serving.StatusProto",
    "GetModelStatusRequest": "tensorflow.serving.GetModelStatusRequest",
    "GetModelStatusResponse": "tensorflow.serving.GetModelStatusResponse",
    "ModelVersionStatus": "tensorflow.serving.ModelVersionStatus",
}


@pytest.fixture(scope="module")
def real_pool() -> descriptor_pool.DescriptorPool:
    pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_serving.apis.predict_pb2")
    from tensorflow_serving.apis import (  # noqa: F401  (registers the real descriptors)
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_pb2,
        predict_pb2,
        status_pb2,
    )

    return descriptor_pool.Default()


def _counterpart(full_name: str) -> str:
    """The real full name for one of our (possibly nested) type names; others are shared (google.*)."""
    if not full_name.startswith(OURS):
        return full_name
    top, _, rest = full_name[len(OURS) :].partition(".")
    return COUNTERPART[top] + (f".{rest}" if rest else "")


def _enum_values(e: EnumDescriptor) -> list[tuple[str, int]]:
    return [(v.name, v.number) for v in e.values]


def _compare_enum(ours: EnumDescriptor, real: EnumDescriptor, problems: list[str]) -> None:
    if _enum_values(ours) != _enum_values(real):
        problems.append(f"{ours.full_name}: values {_enum_values(ours)} != {real.full_name} {_enum_values(real)}")


def _compare_message(ours: Descriptor, real: Descriptor, problems: list[str], seen: set[str]) -> None:
    if ours.full_name in seen:
        return
    seen.add(ours.full_name)
    if _counterpart(ours.full_name) != real.full_name:
        problems.append(f"{ours.full_name} corresponds to {real.full_name}, expected {_counterpart(ours.full_name)}")
    if ours.GetOptions().map_entry != real.GetOptions().map_entry:
        problems.append(f"{ours.full_name}: map_entry differs")
    for field in ours.fields:
        where = f"{ours.full_name}.{field.name}"
        other = real.fields_by_name.get(field.name)
        if other is None:
            problems.append(f"{where}: no such field in {real.full_name}")
            continue
        if field.number != other.number:
            problems.append(f"{where}: number {field.number} != {other.number}")
        if field.type != other.type:
            problems.append(f"{where}: type {field.type} != {other.type}")
        if field.is_repeated != other.is_repeated or field.is_required != other.is_required:
            problems.append(f"{where}: label differs")
        if field.is_packed != other.is_packed:
            problems.append(f"{where}: packed {field.is_packed} != {other.is_packed}")
        if field.has_presence != other.has_presence:
            problems.append(f"{where}: presence {field.has_presence} != {other.has_presence}")
        oneof = field.containing_oneof.name if field.containing_oneof else None
        real_oneof = other.containing_oneof.name if other.containing_oneof else None
        if oneof != real_oneof:
            problems.append(f"{where}: oneof {oneof} != {real_oneof}")
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            _compare_message(field.message_type, other.message_type, problems, seen)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            if _counterpart(field.enum_type.full_name) != other.enum_type.full_name:
                problems.append(f"{where}: enum {field.enum_type.full_name} vs {other.enum_type.full_name}")
            _compare_enum(field.enum_type, other.enum_type, problems)
    for nested in ours.enum_types:
        real_enum = real.enum_types_by_name.get(nested.name)
        if real_enum is None:
            problems.append(f"{nested.full_name}: no such enum in {real.full_name}")
        else:
            _compare_enum(nested, real_enum, problems)


def test_every_top_level_type_has_a_counterpart() -> None:
    ours = set(tfs.DESCRIPTOR.message_types_by_name) | set(tfs.DESCRIPTOR.enum_types_by_name)
    assert ours == set(COUNTERPART)
    assert tfs.DESCRIPTOR.package == "dl_inference.tfserving"
    assert not tfs.DESCRIPTOR.services_by_name  # the real service paths are registered by hand


@pytest.mark.parametrize("name", sorted(COUNTERPART))
def test_matches_the_real_definition(name: str, real_pool: descriptor_pool.DescriptorPool) -> None:
    problems: list[str] = []
    if name in tfs.DESCRIPTOR.enum_types_by_name:
        _compare_enum(
            tfs.DESCRIPTOR.enum_types_by_name[name], real_pool.FindEnumTypeByName(COUNTERPART[name]), problems
        )
    else:
        ours = tfs.DESCRIPTOR.message_types_by_name[name]
        _compare_message(ours, real_pool.FindMessageTypeByName(COUNTERPART[name]), problems, set())
    assert not problems, "\n".join(problems)


def test_real_messages_parse_as_ours_and_back(real_pool: Any) -> None:
    """Bytes the stock client writes parse into our classes and serialize back to the same bytes."""
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.model_spec.version.value = 3
    request.model_spec.signature_name = "serving_default"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.arange(6, dtype=np.float32).reshape(2, 3)))
    request.inputs["s"].CopyFrom(tf.make_tensor_proto([b"a", b"bc"]))
    request.inputs["h"].CopyFrom(tf.make_tensor_proto(np.float16(1.5), shape=[4]))
    request.output_filter.append("y")
    wire = request.SerializeToString(deterministic=True)
    ours = tfs.PredictRequest.FromString(wire)
    assert ours.model_spec.version.value == 3
    assert list(ours.inputs["s"].string_val) == [b"a", b"bc"]
    assert list(ours.inputs["h"].half_val) == [np.float16(1.5).view(np.uint16)]
    assert ours.SerializeToString(deterministic=True) == wire
