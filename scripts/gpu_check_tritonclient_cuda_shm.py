"""Stock ``tritonclient`` CUDA shared memory against dl_inference, on a GPU machine.

``tritonclient.utils.cuda_shared_memory`` makes the regions (cudaMalloc + cudaIpcGetMemHandle),
``tritonclient.grpc`` registers them and infers, exactly as a Triton user would; the HTTP register call is
made with the body ``tritonclient.http`` sends (``{"raw_handle": {"b64": ...}, "device_id", "byte_size"}``).
Models: ``add_sub`` (ONNX Runtime on the CPU) and ``twice`` (PyTorch on the GPU, see
``gpu_check_cuda_shm.py``). Needs tritonclient and python-rapidjson (carried as wheels to the GPU machine).
Prints one line per check and ``ALL OK`` / ``FAILED``.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_cuda_shm import run_checks


def checks(grpc_port: int, http_port: int) -> list[tuple[str, bool, str]]:
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.cuda_shared_memory as cudashm

    results: list[tuple[str, bool, str]] = []
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.ones((2, 16), np.float32)
    inp = cudashm.create_shared_memory_region("in", 2 * a.nbytes, 0)
    out = cudashm.create_shared_memory_region("out", 2 * a.nbytes, 0)
    cudashm.set_shared_memory_region(inp, [a, b])
    client.register_cuda_shared_memory("in", cudashm.get_raw_handle(inp), 0, 2 * a.nbytes)
    # the HTTP body tritonclient.http sends for register_cuda_shared_memory
    body = {"raw_handle": {"b64": cudashm.get_raw_handle(out).decode()}, "device_id": 0, "byte_size": 2 * a.nbytes}
    req = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v2/cudasharedmemory/region/out/register", data=json.dumps(body).encode()
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        results.append(("HTTP register (tritonclient.http's body)", r.status == 200, f"HTTP {r.status}"))
    status = client.get_cuda_shared_memory_status()
    results.append(("status", sorted(status.regions) == ["in", "out"], str(sorted(status.regions))))

    x0, x1 = grpcclient.InferInput("INPUT0", [2, 16], "FP32"), grpcclient.InferInput("INPUT1", [2, 16], "FP32")
    x0.set_shared_memory("in", a.nbytes)
    x1.set_shared_memory("in", b.nbytes, offset=a.nbytes)
    o0, o1 = grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")
    o0.set_shared_memory("out", a.nbytes)
    o1.set_shared_memory("out", a.nbytes, offset=a.nbytes)
    result = client.infer("add_sub", [x0, x1], outputs=[o0, o1])
    both = cudashm.get_contents_as_numpy(out, np.float32, [4, 16])
    got0, got1 = both[:2], both[2:]
    ok = np.allclose(got0, a + b) and np.allclose(got1, a - b) and list(result.get_output("OUTPUT0").shape) == [2, 16]
    results.append(("add_sub (ONNX Runtime, CPU): inputs and outputs in CUDA regions", ok, ""))

    x = grpcclient.InferInput("x", [2, 16], "FP32")
    x.set_shared_memory("in", a.nbytes)
    y = grpcclient.InferRequestedOutput("y")
    y.set_shared_memory("out", a.nbytes)
    client.infer("twice", [x], outputs=[y])
    got = cudashm.get_contents_as_numpy(out, np.float32, [2, 16])
    results.append(("twice (PyTorch, GPU): input read in place", bool(np.allclose(got, 2 * a + 1)), ""))

    client.unregister_cuda_shared_memory()
    results.append(("unregister all", len(client.get_cuda_shared_memory_status().regions) == 0, ""))
    cudashm.destroy_shared_memory_region(inp)
    cudashm.destroy_shared_memory_region(out)
    client.close()
    return results


def main() -> int:
    return run_checks("gpu_check_tritonclient_", lambda srv: checks(srv.grpc_port, srv.http_port))


if __name__ == "__main__":
    raise SystemExit(main())
