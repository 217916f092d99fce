"""Property-based fuzzing of the shared-memory tensor parameters: gateway checks, then worker reads/writes.

Property: whatever parameters a request carries (any region name, type, offset, size, mixed with the
server's reserved parameter), the gateway either refuses it with a client error or attaches it, and a
worker then reads and writes only inside the registered region: exactly ``shared_memory_byte_size``
bytes, never past the region's end, with only client errors otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from dl_inference.errors import ServerError
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.tensors import set_parameter
from dl_inference.sharedmem.mapping import RegionMaps
from dl_inference.sharedmem.params import LOCATIONS, decode_locations, request_refs
from dl_inference.sharedmem.registry import SharedMemoryRegistry

FILE_BYTES = 4096
REGIONS = {"a": (0, 1024), "b": (1000, 3096), "c": (4095, 1)}  # name -> (offset in the file, byte size)

values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(min_value=-8, max_value=FILE_BYTES + 8),
    st.sampled_from(["a", "b", "c", "", "missing", "../x"]),
    st.booleans(),
    st.floats(allow_nan=False, width=32),
)
keys = st.sampled_from(["shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"])
param_maps = st.dictionaries(keys, values, max_size=3)
tensors = st.lists(param_maps, min_size=1, max_size=3)


def _request(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], reserved: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for i, params in enumerate(inputs):
        tensor = request.inputs.add(name=f"in{i}", datatype="UINT8", shape=[1])
        for k, v in params.items():
            set_parameter(tensor.parameters, k, v)
    for i, params in enumerate(outputs):
        out = request.outputs.add(name=f"out{i}")
        for k, v in params.items():
            set_parameter(out.parameters, k, v)
    if reserved:
        set_parameter(request.parameters, LOCATIONS, '{"a": {"kind": "system", "key": "../etc"}}')
    return request


@given(inputs=tensors, outputs=st.lists(param_maps, max_size=2), reserved=st.booleans())
def test_region_parameters_stay_inside_their_region(
    tmp_path_factory: Any, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], reserved: bool
) -> None:
    directory: Path = tmp_path_factory.getbasetemp() / "fuzz_shm"
    directory.mkdir(exist_ok=True)
    (directory / "k").write_bytes(bytes(range(256)) * (FILE_BYTES // 256))
    registry = SharedMemoryRegistry(shm_dir=directory)
    for name, (offset, size) in REGIONS.items():
        registry.register_system(name, "/k", offset, size)
    request = _request(inputs, outputs, reserved)
    try:
        extra, pinned = registry.attach(request)
    except ServerError as exc:
        assert exc.http_status < 500, exc.message
        return
    assert not reserved
    merged = pb.ModelInferRequest.FromString(request.SerializeToString() + extra)
    locations = decode_locations(merged)
    maps = RegionMaps(directory)
    try:
        for (kind, name), ref in request_refs(merged).items():
            loc = locations[ref.region]
            start = loc.offset + ref.offset
            assert ref.offset + ref.byte_size <= loc.byte_size
            if kind == "input":
                data = bytes(maps.read_input(ref.region, loc, ref, name))
                assert data == (directory / "k").read_bytes()[start : start + ref.byte_size]
            else:
                arr = np.full(ref.byte_size, 7, np.uint8)
                assert maps.write_output(ref.region, loc, ref, arr, "UINT8", name) == ref.byte_size
    except ServerError as exc:
        assert exc.http_status < 500, exc.message
    finally:
        maps.close()
        registry.release(pinned)
    assert len((directory / "k").read_bytes()) == FILE_BYTES
