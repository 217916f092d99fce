"""The shared-memory tensor parameters (Triton's names and rules) and the gateway -> worker locations.

A tensor in shared memory carries, in its ``parameters``: ``shared_memory_region`` (string, the
registered name), ``shared_memory_byte_size`` (int64, required with a region) and optionally
``shared_memory_offset`` (int64, default 0, from the region's start). Such an input has no data
in the request (no ``raw_input_contents`` entry, no typed ``contents``); such an output is written to
the region and answered with an empty ``raw_output_contents`` entry, so that output indexes line up
(tritonclient looks outputs up by index).

The gateway resolves the region names a request uses and appends their locations as one reserved
request parameter, :data:`LOCATIONS`, a JSON object keyed by region name. Clients may not send it:
the gateway refuses a request that does, and a standalone worker (whose gRPC port faces clients)
refuses every shared-memory request.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dl_inference.errors import InvalidArgument
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.tensors import SHARED_MEMORY_REGION, nonnegative_int

REGION = SHARED_MEMORY_REGION
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"
LOCATIONS = "dl_inference_shm_locations"  # reserved request parameter, gateway -> worker only

SYSTEM = "system"
CUDA = "cuda"


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Where one tensor's bytes are: ``byte_size`` bytes at ``offset`` in region ``region``."""

    region: str
    offset: int
    byte_size: int


def tensor_ref(params: Mapping[str, pb.InferParameter], label: str) -> TensorRef | None:
    """The shared-memory reference in a tensor's parameters, None when it has none.

    InvalidArgument (naming ``label``, e.g. "input 'x'") for an offset or size without a region, a
    region without a size, or a parameter of the wrong type.
    """
    if REGION not in params:
        for key in (OFFSET, BYTE_SIZE):
            if key in params:
                raise InvalidArgument(f"{label}: parameter '{key}' given without '{REGION}'")
        return None
    region = params[REGION]
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise InvalidArgument(f"{label}: parameter '{REGION}' must be a non-empty string (string_param)")
    if BYTE_SIZE not in params:
        raise InvalidArgument(f"{label}: parameter '{BYTE_SIZE}' must be given with '{REGION}'")
    offset = nonnegative_int(params[OFFSET], f"{label}: parameter '{OFFSET}'") if OFFSET in params else 0
    return TensorRef(
        region.string_param, offset, nonnegative_int(params[BYTE_SIZE], f"{label}: parameter '{BYTE_SIZE}'")
    )


def request_refs(request: pb.ModelInferRequest) -> dict[tuple[str, str], TensorRef]:
    """Every shared-memory reference of a request, keyed by ("input" | "output", tensor name)."""
    refs: dict[tuple[str, str], TensorRef] = {}
    for kind, tensors in (("input", request.inputs), ("output", request.outputs)):
        for tensor in tensors:
            ref = tensor_ref(tensor.parameters, f"{kind} '{tensor.name}'")
            if ref is not None:
                refs[(kind, tensor.name)] = ref
    return refs


@dataclass(frozen=True, slots=True)
class Location:
    """A registered region as a worker needs it to map the region.

    ``generation`` is unique per registration, so a worker never reuses the mapping of an earlier
    region that had the same name or key. System: ``key`` (the /dev/shm name), ``offset`` (of the
    region in that file), ``inode`` (the file registered). CUDA: ``handle`` (cudaIpcMemHandle_t
    bytes) and ``device_id``. ``byte_size`` is the region's size either way.
    """

    kind: str
    generation: int
    byte_size: int
    key: str = ""
    offset: int = 0
    inode: int = 0
    device_id: int = 0
    handle: bytes = b""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "generation": self.generation, "byte_size": self.byte_size}
        if self.kind == SYSTEM:
            out.update(key=self.key, offset=self.offset, inode=self.inode)
        else:
            out.update(device_id=self.device_id, handle=base64.b64encode(self.handle).decode())
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Location:
        handle = base64.b64decode(obj["handle"]) if "handle" in obj else b""
        return cls(
            kind=str(obj["kind"]),
            generation=int(obj["generation"]),
            byte_size=int(obj["byte_size"]),
            key=str(obj.get("key", "")),
            offset=int(obj.get("offset", 0)),
            inode=int(obj.get("inode", 0)),
            device_id=int(obj.get("device_id", 0)),
            handle=handle,
        )


def encode_locations(locations: Mapping[str, Location]) -> bytes:
    """A serialized ModelInferRequest holding only the :data:`LOCATIONS` parameter.

    Appended to a serialized request it merges into the request's parameters (protobuf merges
    concatenated messages), so the gateway forwards the client's bytes with this one field added.
    """
    text = json.dumps({name: loc.to_json() for name, loc in locations.items()}, separators=(",", ":"))
    extra = pb.ModelInferRequest()
    extra.parameters[LOCATIONS].string_param = text
    return extra.SerializeToString()


def decode_locations(request: pb.ModelInferRequest) -> dict[str, Location]:
    """The locations the gateway appended ({} when none)."""
    if LOCATIONS not in request.parameters:
        return {}
    try:
        raw = json.loads(request.parameters[LOCATIONS].string_param)
        return {str(name): Location.from_json(obj) for name, obj in raw.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidArgument(f"request parameter '{LOCATIONS}' is malformed: {exc}") from None


def uses_shared_memory(request: pb.ModelInferRequest) -> bool:
    """True when any tensor names a region or the request carries :data:`LOCATIONS`."""
    if LOCATIONS in request.parameters:
        return True
    return any(REGION in t.parameters for t in request.inputs) or any(REGION in t.parameters for t in request.outputs)
