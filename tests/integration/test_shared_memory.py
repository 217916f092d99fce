"""Triton's system shared-memory extension with stock tritonclient, over gRPC and HTTP, end to end.

The server is real (gateway + worker processes), the regions are real /dev/shm objects made by
``tritonclient.utils.shared_memory``; the `add_sub` example (two instances) computes
OUTPUT0 = INPUT0 + INPUT1 and OUTPUT1 = INPUT0 - INPUT1 on FP32 [n, 16].
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.integration.server import RunningServer, run_node, run_server

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this machine")

ROW = 16 * 4  # bytes of one FP32 [1, 16] row


@pytest.fixture(scope="module")
def shm_server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("shm")
    config = tmp / "server.yaml"
    config.write_text("shared_memory_sweep_s: 0.5\n")
    with run_server(example_repo, tmp / "server.log", "--config", str(config)) as srv:
        yield srv


class Regions:
    """Regions this test created and registered; destroyed and unregistered at the end."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.handles: list[Any] = []

    def make(self, byte_size: int, register: bool = True) -> tuple[str, str, Any]:
        name = f"r{uuid.uuid4().hex[:10]}"
        key = f"/dlinf_test_{name}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        self.handles.append(handle)
        if register:
            self.client.register_system_shared_memory(name, key, byte_size)
        return name, key, handle

    def close(self) -> None:
        for handle in self.handles:
            try:
                self.client.unregister_system_shared_memory(handle._triton_shm_name)
            except InferenceServerException:
                pass
            shm.destroy_shared_memory_region(handle)


@pytest.fixture(params=["grpc", "http"])
def client(request: pytest.FixtureRequest, shm_server: RunningServer) -> Iterator[tuple[str, Any, Any]]:
    module: Any = grpcclient if request.param == "grpc" else httpclient
    url = shm_server.grpc_url if request.param == "grpc" else shm_server.http_url
    c = module.InferenceServerClient(url)
    regions = Regions(c)
    yield module, c, regions
    regions.close()
    c.close()


def _data(rows: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 16)).astype(np.float32), rng.standard_normal((rows, 16)).astype(np.float32)


def test_inputs_and_outputs_in_system_shared_memory(client: tuple[str, Any, Any]) -> None:
    module, c, regions = client
    a, b = _data(2)
    in_name, _, in_handle = regions.make(2 * a.nbytes)
    out_name, _, out_handle = regions.make(2 * a.nbytes)
    shm.set_shared_memory_region(in_handle, [a, b])
    inputs = [module.InferInput("INPUT0", [2, 16], "FP32"), module.InferInput("INPUT1", [2, 16], "FP32")]
    inputs[0].set_shared_memory(in_name, a.nbytes)
    inputs[1].set_shared_memory(in_name, b.nbytes, offset=a.nbytes)
    outputs = [module.InferRequestedOutput("OUTPUT0"), module.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory(out_name, a.nbytes)
    outputs[1].set_shared_memory(out_name, a.nbytes, offset=a.nbytes)
    result = c.infer("add_sub", inputs, outputs=outputs)
    out0 = result.get_output("OUTPUT0")
    shape = list(out0.shape if module is grpcclient else out0["shape"])
    assert shape == [2, 16]
    got0 = shm.get_contents_as_numpy(out_handle, np.float32, [2, 16])
    got1 = shm.get_contents_as_numpy(out_handle, np.float32, [2, 16], offset=a.nbytes)
    np.testing.assert_allclose(got0, a + b, rtol=1e-6)
    np.testing.assert_allclose(got1, a - b, rtol=1e-6)


def test_mixed_with_inline_tensors(client: tuple[str, Any, Any]) -> None:
    module, c, regions = client
    a, b = _data(1, seed=3)
    in_name, _, in_handle = regions.make(a.nbytes)
    out_name, _, out_handle = regions.make(a.nbytes)
    shm.set_shared_memory_region(in_handle, [a])
    in0 = module.InferInput("INPUT0", [1, 16], "FP32")
    in0.set_shared_memory(in_name, a.nbytes)
    in1 = module.InferInput("INPUT1", [1, 16], "FP32")
    in1.set_data_from_numpy(b)
    out0 = module.InferRequestedOutput("OUTPUT0")
    out0.set_shared_memory(out_name, a.nbytes)
    out1 = module.InferRequestedOutput("OUTPUT1")  # inline: comes back in the response
    result = c.infer("add_sub", [in1, in0], outputs=[out0, out1])
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    np.testing.assert_allclose(shm.get_contents_as_numpy(out_handle, np.float32, [1, 16]), a + b, rtol=1e-6)


def test_status_and_unregister(client: tuple[str, Any, Any]) -> None:
    module, c, regions = client
    name, key, _ = regions.make(256)
    status = c.get_system_shared_memory_status(name)
    if module is grpcclient:
        region = status.regions[name]
        assert (region.name, region.key, region.offset, region.byte_size) == (name, key, 0, 256)
    else:
        assert status == [{"name": name, "key": key, "offset": 0, "byte_size": 256}]
    c.unregister_system_shared_memory(name)
    with pytest.raises(InferenceServerException, match="no system shared-memory region"):
        c.get_system_shared_memory_status(name)
    c.unregister_system_shared_memory(name)  # unknown names are fine, as in Triton


def test_metadata_advertises_the_extensions(client: tuple[str, Any, Any]) -> None:
    module, c, _ = client
    meta = c.get_server_metadata()
    extensions = meta.extensions if module is grpcclient else meta["extensions"]
    assert "system_shared_memory" in extensions and "cuda_shared_memory" in extensions


def _infer_error(module: Any, c: Any, inputs: list[Any], outputs: list[Any] | None = None) -> str:
    with pytest.raises(InferenceServerException) as info:
        c.infer("add_sub", inputs, outputs=outputs)
    return str(info.value)


def _shm_inputs(module: Any, region: str, size: int = ROW, offset: int = 0) -> list[Any]:
    inputs = [module.InferInput("INPUT0", [1, 16], "FP32"), module.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_shared_memory(region, size, offset=offset)
    inputs[1].set_data_from_numpy(np.ones((1, 16), np.float32))
    return inputs


def test_refusals_name_what_is_wrong(client: tuple[str, Any, Any]) -> None:
    module, c, regions = client
    name, key, handle = regions.make(ROW)
    shm.set_shared_memory_region(handle, [np.ones((1, 16), np.float32)])
    # a region nobody registered
    msg = _infer_error(module, c, _shm_inputs(module, "never_registered"))
    assert "input 'INPUT0'" in msg and "'never_registered' is not registered" in msg
    # offset + size beyond the region
    msg = _infer_error(module, c, _shm_inputs(module, name, ROW, offset=4))
    assert "exceeds the 64 bytes of region" in msg and "INPUT0" in msg
    # an output region too small for the output
    small, _, _ = regions.make(8)
    out = module.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory(small, 8)
    msg = _infer_error(module, c, _shm_inputs(module, name), [out])
    assert "output 'OUTPUT0'" in msg and "too small" in msg and "64 bytes" in msg
    # the size of an input that does not match its shape
    msg = _infer_error(module, c, _shm_inputs(module, name, ROW - 4))
    assert "input 'INPUT0'" in msg and "expected 64 bytes" in msg
    # keys: no paths, no '..', must exist; names: no duplicates
    for bad_key in ("/../etc/passwd", "/a/b", "..", "/.hidden"):
        with pytest.raises(InferenceServerException, match="is not a /dev/shm name"):
            c.register_system_shared_memory("bad", bad_key, 8)
    with pytest.raises(InferenceServerException, match="no shared-memory object"):
        c.register_system_shared_memory("bad", "/dlinf_test_does_not_exist", 8)
    with pytest.raises(InferenceServerException, match="exceeds the 64 bytes"):
        c.register_system_shared_memory("bad", key, 64, offset=8)
    with pytest.raises(InferenceServerException, match="already registered"):
        c.register_system_shared_memory(name, key, ROW)
    # the server's own parameter, sent by a client
    inputs = _shm_inputs(module, name)
    with pytest.raises(InferenceServerException, match="reserved for the server"):
        c.infer("add_sub", inputs, parameters={"dl_inference_shm_locations": "{}"})


def test_batched_requests_each_with_their_own_regions(shm_server: RunningServer) -> None:
    """image_classifier-style dynamic batching on `simple`... here: many concurrent add_sub requests
    over both instances, each reading and writing its own regions; every answer must be its own."""
    c = grpcclient.InferenceServerClient(shm_server.grpc_url)
    regions = Regions(c)
    try:
        jobs = []
        for k in range(24):
            a, b = _data(1 + k % 3, seed=100 + k)
            in_name, _, in_handle = regions.make(a.nbytes + b.nbytes)
            out_name, _, out_handle = regions.make(a.nbytes)
            shm.set_shared_memory_region(in_handle, [a, b])
            jobs.append((a, b, in_name, out_name, out_handle))

        def run(job: tuple[Any, ...]) -> None:
            a, b, in_name, out_name, out_handle = job
            inputs = [
                grpcclient.InferInput("INPUT0", list(a.shape), "FP32"),
                grpcclient.InferInput("INPUT1", list(b.shape), "FP32"),
            ]
            inputs[0].set_shared_memory(in_name, a.nbytes)
            inputs[1].set_shared_memory(in_name, b.nbytes, offset=a.nbytes)
            out0 = grpcclient.InferRequestedOutput("OUTPUT0")
            out0.set_shared_memory(out_name, a.nbytes)
            result = c.infer("add_sub", inputs, outputs=[out0, grpcclient.InferRequestedOutput("OUTPUT1")])
            np.testing.assert_allclose(shm.get_contents_as_numpy(out_handle, np.float32, a.shape), a + b, rtol=1e-6)
            np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)

        with ThreadPoolExecutor(8) as pool:
            for _ in range(3):
                list(pool.map(run, jobs))
    finally:
        regions.close()
        c.close()


@pytest.fixture(scope="module")
def batching_server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """add_sub with one instance and dynamic batching that waits 50 ms: concurrent requests share batches."""
    root = tmp_path_factory.mktemp("shm_batching")
    shutil.copytree(example_repo / "add_sub", root / "repo" / "add_sub")
    (root / "repo" / "add_sub" / "config.yaml").write_text(
        "name: add_sub\nbackend: onnxruntime\nmax_batch_size: 8\n"
        "instance_group: [{count: 1, kind: KIND_CPU}]\n"
        "dynamic_batching: {max_queue_delay_microseconds: 50000}\n"
    )
    with run_server(root / "repo", root / "server.log") as srv:
        yield srv


def test_requests_reading_and_writing_regions_batch_together(batching_server: RunningServer) -> None:
    c = grpcclient.InferenceServerClient(batching_server.grpc_url)
    regions = Regions(c)
    try:
        jobs = []
        for k in range(8):
            a, b = _data(1, seed=200 + k)
            in_name, _, in_handle = regions.make(a.nbytes + b.nbytes)
            out_name, _, out_handle = regions.make(2 * a.nbytes)
            shm.set_shared_memory_region(in_handle, [a, b])
            jobs.append((a, b, in_name, out_name, out_handle))

        def run(job: tuple[Any, ...]) -> None:
            a, b, in_name, out_name, out_handle = job
            inputs = [
                grpcclient.InferInput("INPUT0", [1, 16], "FP32"),
                grpcclient.InferInput("INPUT1", [1, 16], "FP32"),
            ]
            inputs[0].set_shared_memory(in_name, a.nbytes)
            if b[0, 0] > 0:  # some requests send INPUT1 inline: they batch with the others all the same
                inputs[1].set_data_from_numpy(b)
            else:
                inputs[1].set_shared_memory(in_name, b.nbytes, offset=a.nbytes)
            outputs = [grpcclient.InferRequestedOutput("OUTPUT0"), grpcclient.InferRequestedOutput("OUTPUT1")]
            outputs[0].set_shared_memory(out_name, a.nbytes)
            outputs[1].set_shared_memory(out_name, a.nbytes, offset=a.nbytes)
            c.infer("add_sub", inputs, outputs=outputs)
            got = shm.get_contents_as_numpy(out_handle, np.float32, [2, 16])
            np.testing.assert_allclose(got[0], (a + b)[0], rtol=1e-6)
            np.testing.assert_allclose(got[1], (a - b)[0], rtol=1e-6)

        before = c.get_inference_statistics("add_sub").model_stats[0]
        with ThreadPoolExecutor(8) as pool:
            for _ in range(3):
                list(pool.map(run, jobs))
        after = c.get_inference_statistics("add_sub").model_stats[0]
        inferences = after.inference_count - before.inference_count
        executions = after.execution_count - before.execution_count
        assert inferences == 24 and executions < inferences, (inferences, executions)  # they did share batches
    finally:
        regions.close()
        c.close()


CLIENT = textwrap.dedent(
    """
    import sys, time
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm
    url, name, key, unlink = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    handle = shm.create_shared_memory_region(name, key, 64)
    grpcclient.InferenceServerClient(url).register_system_shared_memory(name, key, 64)
    if unlink:
        shm.destroy_shared_memory_region(handle)  # gone without unregistering
    print("registered", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("how", ["killed", "unlinked"])
def test_regions_of_a_client_that_went_away_are_forgotten(shm_server: RunningServer, how: str) -> None:
    name = f"gone_{how}_{uuid.uuid4().hex[:6]}"
    key = f"/dlinf_test_{name}"
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, shm_server.grpc_url, name, key, "1" if how == "unlinked" else "0"],
        stdout=subprocess.PIPE,
    )
    c = grpcclient.InferenceServerClient(shm_server.grpc_url)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"registered"
        assert name in c.get_system_shared_memory_status().regions
        time.sleep(2)  # several sweeps: a live client keeps its region
        if how == "killed":
            assert name in c.get_system_shared_memory_status().regions
            os.kill(proc.pid, signal.SIGKILL)  # no cleanup: the /dev/shm object stays, nobody maps it
            proc.wait()
        deadline = time.monotonic() + 10
        while name in c.get_system_shared_memory_status().regions:
            assert time.monotonic() < deadline, f"region {name} ({how} client) still registered after 10 s"
            time.sleep(0.2)
        assert f"forgetting shared-memory region '{name}': its client is gone" in shm_server.log()
    finally:
        proc.kill()
        proc.wait()
        c.close()
        Path("/dev/shm", key.lstrip("/")).unlink(missing_ok=True)


def test_a_standalone_worker_refuses_shared_memory(example_repo: Path, tmp_path: Path) -> None:
    """A worker's own gRPC port keeps no regions: shared-memory requests and registrations are refused
    with a clear error, never run as if the tensor had no data."""
    with run_node(example_repo, "add_sub", tmp_path / "node.log") as node:
        c = grpcclient.InferenceServerClient(node.address)
        with pytest.raises(InferenceServerException, match="does not serve shared memory"):
            c.register_system_shared_memory("r", "/k", 8)
        msg = _infer_error(grpcclient, c, _shm_inputs(grpcclient, "r"))
        assert "shared-memory tensors are not served by this endpoint" in msg
        a, b = _data(1)
        plain = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"), grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
        plain[0].set_data_from_numpy(a)
        plain[1].set_data_from_numpy(b)
        np.testing.assert_allclose(c.infer("add_sub", plain).as_numpy("OUTPUT0"), a + b, rtol=1e-6)
        c.close()
