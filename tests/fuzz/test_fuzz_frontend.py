"""Property-based fuzzing of the HTTP frontend's own request handling: the shape it derives for a
raw binary request (``Inference-Header-Content-Length: 0``) from the model's metadata."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from dl_inference.frontends.http_server import HttpFrontend
from dl_inference.protocol.datatypes import V2_DATATYPES
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.http_codec import parse_infer_request
from dl_inference.protocol.tensors import decode_inputs
from tests.fuzz.strategies import check_client_error


class _Metadata:
    """Just enough of a DataPlane for ``HttpFrontend._raw_input``."""

    def __init__(self, inputs: list[tuple[str, list[int]]]) -> None:
        self.meta = pb.ModelMetadataResponse(name="m")
        for datatype, shape in inputs:
            self.meta.inputs.add(name="in", datatype=datatype, shape=shape)

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        return self.meta


metadata_inputs = st.lists(
    st.tuples(st.sampled_from(V2_DATATYPES), st.lists(st.sampled_from([-1, 0, 1, 2, 3, 16]), max_size=3)),
    min_size=0,
    max_size=2,
)


@given(inputs=metadata_inputs, body=st.binary(max_size=64))
@example(inputs=[("FP32", [-1, 0])], body=b"")  # bug: ZeroDivisionError (500) before the fix
@example(inputs=[("FP32", [0, -1])], body=b"\x00" * 4)
def test_raw_binary_request_shape(inputs: list[tuple[str, list[int]]], body: bytes) -> None:
    frontend: Any = HttpFrontend(_Metadata(inputs), max_request_bytes=1 << 20)  # type: ignore[arg-type]
    try:
        name, datatype, shape = frontend._raw_input("m", "", len(body))
        request, policy = parse_infer_request(body, 0, "m", "", raw_input=(name, datatype, shape))
        decoded = decode_inputs(request)
    except Exception as exc:
        check_client_error(exc)
        return
    assert all(d >= 0 for d in shape)
    assert decoded[name].shape == tuple(shape)
    assert policy.binary_data_output
