"""Facts about a loaded model derived from its (completed) ModelConfig, shared by gateway and worker."""

from __future__ import annotations

from collections.abc import Iterable

from dl_inference.protocol.datatypes import config_to_v2
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc


def dtype_name(config_type: int) -> str:
    """V2 datatype name of a ``DataType`` enum value."""
    return config_to_v2(mc.DataType.Name(config_type))


def wire_shape(config: mc.ModelConfig, dims: Iterable[int]) -> list[int]:
    """Shape a client sees: a leading -1 batch dimension when the model batches."""
    dims = list(dims)
    return [-1, *dims] if config.max_batch_size > 0 else dims


def platform_of(config: mc.ModelConfig) -> str:
    if config.platform:
        return config.platform
    return {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "pytorch": "pytorch_libtorch"}.get(
        config.backend, config.backend
    )


def model_metadata(config: mc.ModelConfig, versions: Iterable[str]) -> pb.ModelMetadataResponse:
    response = pb.ModelMetadataResponse(name=config.name, versions=list(versions), platform=platform_of(config))
    for tensor in config.input:
        response.inputs.add(
            name=tensor.name, datatype=dtype_name(tensor.data_type), shape=wire_shape(config, tensor.dims)
        )
    for tensor in config.output:
        response.outputs.add(
            name=tensor.name, datatype=dtype_name(tensor.data_type), shape=wire_shape(config, tensor.dims)
        )
    return response
