"""CUDA shared memory end to end on a GPU machine: a real server, a real client process, real IPC handles.

Run from the repository root on the GPU machine (cuda-python, grpcio, onnxruntime there)::

    python3 scripts/gpu_check_cuda_shm.py

It writes the example models, starts ``dl-inference serve`` on free ports, and as a client (this
process) allocates device memory with ``cudaMalloc``, exports it with ``cudaIpcGetMemHandle`` and
registers it (``CudaSharedMemoryRegister``); then ``add_sub`` (ONNX Runtime on the CPU: host copies)
runs with both inputs and both outputs in CUDA regions (the worker, another process, opens the
handles), and ``twice`` (PyTorch on the GPU: inputs read in place) with 48 concurrent requests, CUDA
and inline inputs batched together; outputs are copied back and compared with numpy.
Also checked: status, a too-small output region, a bad handle, unregister.
Prints one line per check and ``ALL OK`` / ``FAILED``; exit status 0 only when every check passed.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load_tests.shm_client import SERVICE, _CudaRegion


def _read(region: _CudaRegion, offset: int, nbytes: int) -> np.ndarray:
    out = np.empty(nbytes, np.uint8)
    kind = region.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    region._check(region.rt.cudaMemcpy(out.ctypes.data, region.ptr + offset, nbytes, kind))
    return out


async def checks(grpc_port: int) -> list[tuple[str, bool, str]]:
    import grpc

    from dl_inference.protocol.generated import grpc_service_pb2 as pb

    results: list[tuple[str, bool, str]] = []
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")

    def rpc(name: str, resp: Any) -> Any:
        return channel.unary_unary(
            SERVICE + name, request_serializer=lambda m: m.SerializeToString(), response_deserializer=resp.FromString
        )

    register = rpc("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterResponse)
    status = rpc("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusResponse)
    unregister = rpc("CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterResponse)
    infer = rpc("ModelInfer", pb.ModelInferResponse)

    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 16)).astype(np.float32)
    b = rng.standard_normal((4, 16)).astype(np.float32)
    inp, out = _CudaRegion(a.nbytes * 2), _CudaRegion(a.nbytes * 2)
    inp.write(0, a.tobytes())
    inp.write(a.nbytes, b.tobytes())
    await register(
        pb.CudaSharedMemoryRegisterRequest(name="in", raw_handle=inp.handle, device_id=0, byte_size=a.nbytes * 2)
    )
    await register(
        pb.CudaSharedMemoryRegisterRequest(name="out", raw_handle=out.handle, device_id=0, byte_size=a.nbytes * 2)
    )
    st = await status(pb.CudaSharedMemoryStatusRequest())
    ok = sorted(st.regions) == ["in", "out"] and st.regions["in"].byte_size == a.nbytes * 2
    results.append(("status lists both regions", ok, str(dict(st.regions))))

    def request(out_size: int) -> Any:
        req = pb.ModelInferRequest(model_name="add_sub")
        for i, name in enumerate(("INPUT0", "INPUT1")):
            t = req.inputs.add(name=name, datatype="FP32", shape=[4, 16])
            t.parameters["shared_memory_region"].string_param = "in"
            t.parameters["shared_memory_byte_size"].int64_param = a.nbytes
            t.parameters["shared_memory_offset"].int64_param = i * a.nbytes
        for i, name in enumerate(("OUTPUT0", "OUTPUT1")):
            o = req.outputs.add(name=name)
            o.parameters["shared_memory_region"].string_param = "out"
            o.parameters["shared_memory_byte_size"].int64_param = out_size
            o.parameters["shared_memory_offset"].int64_param = i * a.nbytes
        return req

    t0 = time.perf_counter()
    reply = await infer(request(a.nbytes))
    took = (time.perf_counter() - t0) * 1e3
    got0 = _read(out, 0, a.nbytes).view(np.float32).reshape(4, 16)
    got1 = _read(out, a.nbytes, a.nbytes).view(np.float32).reshape(4, 16)
    ok = np.allclose(got0, a + b, rtol=1e-6) and np.allclose(got1, a - b, rtol=1e-6)
    results.append(
        ("inputs and outputs in CUDA regions: OUTPUT0 = a+b, OUTPUT1 = a-b", ok, f"first call {took:.1f} ms")
    )
    shapes = [list(t.shape) for t in reply.outputs]
    empty = [len(r) for r in reply.raw_output_contents]
    results.append(
        ("response carries shapes, no bytes", shapes == [[4, 16], [4, 16]] and empty == [0, 0], f"{shapes} {empty}")
    )
    t0 = time.perf_counter()
    for _ in range(200):
        await infer(request(a.nbytes))
    results.append(("200 more requests", True, f"{(time.perf_counter() - t0) / 200 * 1e3:.2f} ms each, sequential"))

    for what, call, fragment in (
        ("too-small output region refused", infer(request(8)), "too small"),
        (
            "bad IPC handle refused at first use",
            _bad_handle(register, infer, pb, a.nbytes),
            "cannot be opened",
        ),
    ):
        try:
            await call
            results.append((what, False, "no error"))
        except grpc.aio.AioRpcError as exc:
            results.append((what, fragment in (exc.details() or ""), f"{exc.code().name}: {exc.details()}"))
    results += await _torch_on_gpu(register, infer, pb)
    await unregister(pb.CudaSharedMemoryUnregisterRequest(name=""))
    st = await status(pb.CudaSharedMemoryStatusRequest())
    results.append(("unregister all", len(st.regions) == 0, str(dict(st.regions))))
    inp.close()
    out.close()
    await channel.close()
    return results


async def _torch_on_gpu(register: Any, infer: Any, pb: Any) -> list[tuple[str, bool, str]]:
    """`twice` (PyTorch on the GPU, y = 2x + 1): CUDA inputs reach the model in place, alone and batched
    with other requests, some of them inline."""
    results: list[tuple[str, bool, str]] = []
    rng = np.random.default_rng(1)
    jobs = []
    for i in range(48):
        rows = 1 + i % 4
        x = rng.standard_normal((rows, 16)).astype(np.float32)
        inline = i % 3 == 0
        out = _CudaRegion(x.nbytes)
        await register(
            pb.CudaSharedMemoryRegisterRequest(name=f"t_out{i}", raw_handle=out.handle, device_id=0, byte_size=x.nbytes)
        )
        req = pb.ModelInferRequest(model_name="twice")
        t = req.inputs.add(name="x", datatype="FP32", shape=[rows, 16])
        keep = [out]
        if inline:
            req.raw_input_contents.append(x.tobytes())
        else:
            inp = _CudaRegion(x.nbytes)
            inp.write(0, x.tobytes())
            await register(
                pb.CudaSharedMemoryRegisterRequest(
                    name=f"t_in{i}", raw_handle=inp.handle, device_id=0, byte_size=x.nbytes
                )
            )
            t.parameters["shared_memory_region"].string_param = f"t_in{i}"
            t.parameters["shared_memory_byte_size"].int64_param = x.nbytes
            keep.append(inp)
        o = req.outputs.add(name="y")
        o.parameters["shared_memory_region"].string_param = f"t_out{i}"
        o.parameters["shared_memory_byte_size"].int64_param = x.nbytes
        jobs.append((req, x, out, keep))
    t0 = time.perf_counter()
    for _ in range(3):
        await asyncio.gather(*(infer(req) for req, *_ in jobs))
    took = (time.perf_counter() - t0) / (3 * len(jobs)) * 1e3
    bad = 0
    for _, x, out, _ in jobs:
        got = _read(out, 0, x.nbytes).view(np.float32).reshape(x.shape)
        bad += not np.allclose(got, 2 * x + 1, rtol=1e-6)
    results.append(
        (
            "PyTorch on the GPU: 48 concurrent requests, CUDA and inline inputs batched",
            bad == 0,
            f"{bad} wrong, {took:.2f} ms/request",
        )
    )
    for _, _, _, keep in jobs:
        for region in keep:
            region.close()
    return results


TWICE_MODEL = """
import torch
from torch import nn


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + 1


def create_model() -> nn.Module:
    return Twice()
"""

TWICE_CONFIG = """
name: "twice"
backend: "pytorch"
max_batch_size: 64
dynamic_batching { max_queue_delay_microseconds: 3000 }
instance_group [{ kind: KIND_GPU count: 1 }]
input [{ name: "x" data_type: TYPE_FP32 dims: [16] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [16] }]
"""


def write_twice(repo: Path) -> None:
    import torch
    from safetensors.torch import save_file

    version = repo / "twice" / "1"
    version.mkdir(parents=True)
    (repo / "twice" / "config.pbtxt").write_text(TWICE_CONFIG)
    (version / "model.py").write_text(TWICE_MODEL)
    save_file({"scale": torch.tensor(2.0)}, str(version / "model.safetensors"))


async def _bad_handle(register: Any, infer: Any, pb: Any, nbytes: int) -> None:
    await register(pb.CudaSharedMemoryRegisterRequest(name="bad", raw_handle=bytes(64), device_id=0, byte_size=nbytes))
    req = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        t = req.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        t.parameters["shared_memory_region"].string_param = "bad"
        t.parameters["shared_memory_byte_size"].int64_param = 64
    await infer(req)


Results = list[tuple[str, bool, str]]


def run_checks(prefix: str, checks_on: Callable[[Any], Results]) -> int:
    """Serve the examples plus `twice` (add_sub and twice loaded) on free ports, run ``checks_on(server)``,
    print one line per check and ALL OK / FAILED (with the server log's end); the exit status."""
    try:
        import cuda.bindings.runtime  # noqa: F401
    except ImportError:
        print("MISSING: cuda-python (cuda.bindings); run this on a GPU machine")
        return 2
    from dl_inference.examples import make_example_repository
    from tests.integration.server import run_server

    work = Path(tempfile.mkdtemp(prefix=prefix))
    make_example_repository(work / "repo")
    write_twice(work / "repo")
    models = ("--model-control-mode", "explicit", "--load-model", "add_sub", "--load-model", "twice")
    try:
        with run_server(work / "repo", work / "server.log", *models, ready_timeout=120) as srv:
            results = checks_on(srv)
    except RuntimeError as exc:  # the server did not become ready: its log is in the message
        print(f"FAILED: {exc}")
        return 1
    for what, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")
    failed = [r for r in results if not r[1]]
    print("ALL OK" if not failed else f"FAILED: {len(failed)} of {len(results)}")
    if failed:
        print((work / "server.log").read_text()[-3000:])
    return 1 if failed else 0


def main() -> int:
    return run_checks("gpu_check_cuda_shm_", lambda srv: asyncio.run(checks(srv.grpc_port)))


if __name__ == "__main__":
    raise SystemExit(main())
