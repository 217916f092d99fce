"""Reference server: the fastest straightforward single-process Python V2 gRPC server for one ONNX model.

It is the yardstick for ``dl-inference serve``: one ``grpc.aio`` server, onnxruntime in-process, the
model run inline in the RPC handler (no thread pool hop, no batching, no worker processes). It
implements only what ``load_tests.loadgen`` needs: ServerLive, ServerReady, ModelReady,
ModelMetadata and ModelInfer (raw or typed input contents; always raw outputs, like Triton).
Everything else answers UNIMPLEMENTED.

Run from the repository root::

    python -m load_tests.bare_server --model /path/to/repo/simple/1/model.onnx --port 8001

``--port 0`` picks a free port. Once serving it prints ``READY port=<P> model=<name>`` on stdout.
The model name defaults to the repository folder (``<name>/<version>/model.onnx``) or the file stem.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import grpc_service_pb2_grpc as pb_grpc

# onnxruntime type string -> (V2 datatype, numpy dtype)
_ORT_TYPES: dict[str, tuple[str, np.dtype]] = {
    "tensor(bool)": ("BOOL", np.dtype(np.bool_)),
    "tensor(uint8)": ("UINT8", np.dtype(np.uint8)),
    "tensor(uint16)": ("UINT16", np.dtype(np.uint16)),
    "tensor(uint32)": ("UINT32", np.dtype(np.uint32)),
    "tensor(uint64)": ("UINT64", np.dtype(np.uint64)),
    "tensor(int8)": ("INT8", np.dtype(np.int8)),
    "tensor(int16)": ("INT16", np.dtype(np.int16)),
    "tensor(int32)": ("INT32", np.dtype(np.int32)),
    "tensor(int64)": ("INT64", np.dtype(np.int64)),
    "tensor(float16)": ("FP16", np.dtype(np.float16)),
    "tensor(float)": ("FP32", np.dtype(np.float32)),
    "tensor(double)": ("FP64", np.dtype(np.float64)),
}
_V2_TO_NUMPY: dict[str, np.dtype] = {v2: dt for v2, dt in _ORT_TYPES.values()}
_NUMPY_TO_V2: dict[np.dtype, str] = {dt: v2 for v2, dt in _ORT_TYPES.values()}
# typed InferTensorContents field per V2 datatype (for requests that do not use raw contents)
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

MAX_MESSAGE_BYTES = 2**31 - 1


def make_session(model_path: str | Path) -> ort.InferenceSession:
    """An onnxruntime CPU session with the options the real server uses for its workers."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])


def default_model_name(model_path: Path) -> str:
    """``repo/<name>/<version>/model.onnx`` -> ``<name>``; otherwise the file stem."""
    if model_path.parent.name.isdigit() and model_path.parent.parent.name:
        return model_path.parent.parent.name
    return model_path.stem


def _shape(dims: list[Any]) -> list[int]:
    return [d if isinstance(d, int) and d >= 0 else -1 for d in dims]


class BareServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Just enough of GRPCInferenceService for load tests, around one onnxruntime session."""

    def __init__(self, session: ort.InferenceSession, name: str, version: str = "1") -> None:
        self.session = session
        self.name = name
        self.version = version
        self.inputs: dict[str, tuple[str, np.dtype]] = {}
        meta = pb.ModelMetadataResponse(name=name, versions=[version], platform="onnxruntime_onnx")
        for arg in session.get_inputs():
            v2, dtype = _ORT_TYPES[arg.type]
            self.inputs[arg.name] = (v2, dtype)
            meta.inputs.add(name=arg.name, datatype=v2, shape=_shape(arg.shape))
        for arg in session.get_outputs():
            meta.outputs.add(name=arg.name, datatype=_ORT_TYPES[arg.type][0], shape=_shape(arg.shape))
        self.metadata = meta
        self.output_names = [o.name for o in session.get_outputs()]

    def _check_model(self, name: str, version: str) -> bool:
        return name == self.name and version in ("", self.version)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ModelReadyResponse(ready=self._check_model(request.name, request.version))

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not self._check_model(request.name, request.version):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.name}'")
        return self.metadata

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not self._check_model(request.model_name, request.model_version):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.model_name}'")
        try:
            feeds = self._feeds(request)
            names = [o.name for o in request.outputs] or self.output_names
            results = self.session.run(names, feeds)
        except (ValueError, OrtInvalidArgument) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # anything else from onnxruntime is a server-side failure
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        response = pb.ModelInferResponse(model_name=self.name, model_version=self.version, id=request.id)
        raw = response.raw_output_contents
        for name, array in zip(names, results, strict=True):
            array = np.ascontiguousarray(array)
            response.outputs.add(name=name, datatype=_NUMPY_TO_V2[array.dtype], shape=array.shape)
            raw.append(array.tobytes())
        return response

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        use_raw = len(request.raw_input_contents) > 0
        if use_raw and len(request.raw_input_contents) != len(request.inputs):
            raise ValueError(f"{len(request.inputs)} inputs but {len(request.raw_input_contents)} raw_input_contents")
        feeds: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(request.inputs):
            if tensor.name not in self.inputs:
                raise ValueError(f"unexpected input '{tensor.name}', expected {sorted(self.inputs)}")
            datatype, dtype = self.inputs[tensor.name]
            if tensor.datatype != datatype:
                raise ValueError(f"input '{tensor.name}': datatype {tensor.datatype}, expected {datatype}")
            shape = tuple(tensor.shape)
            if use_raw:
                array = np.frombuffer(request.raw_input_contents[i], dtype=dtype)
            else:
                field = _CONTENTS_FIELD.get(datatype)
                if field is None:
                    raise ValueError(f"input '{tensor.name}': {datatype} must be sent in raw_input_contents")
                array = np.asarray(getattr(tensor.contents, field), dtype=dtype)
            feeds[tensor.name] = array.reshape(shape)  # ValueError on a size mismatch
        return feeds


async def serve(model: Path, port: int, host: str, name: str | None, reuse_port: bool = False) -> None:
    session = make_session(model)
    servicer = BareServicer(session, name or default_model_name(model))
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1 if reuse_port else 0),  # on: several of these share one port
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"bare_server: cannot bind {host}:{port}")
    await server.start()
    print(f"READY port={bound} model={servicer.name}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="path to the .onnx file")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port (0 = any free port)")
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    parser.add_argument("--name", default=None, help="model name (default: from the path)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    parser.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT: run several on one port")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"no such model file: {args.model}")
    coro = serve(args.model, args.port, args.host, args.name, args.reuse_port)
    if args.no_uvloop:
        asyncio.run(coro)
        return 0
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
