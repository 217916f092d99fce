"""A PyTorch model (model.py + safetensors) served by the real server, over gRPC and HTTP, batched."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tests.integration.server import RunningServer, run_server  # noqa: E402
from tests.unit.torch_net import create_model  # noqa: E402

CONFIG = """
name: "torchnet"
backend: "pytorch"
max_batch_size: 16
dynamic_batching { max_queue_delay_microseconds: 2000 }
input [
  { name: "x" data_type: TYPE_FP32 dims: [8] },
  { name: "y" data_type: TYPE_FP32 dims: [4] }
]
output [
  { name: "h" data_type: TYPE_FP32 dims: [4] },
  { name: "total" data_type: TYPE_FP32 dims: [1] }
]
"""


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, torch.nn.Module]]:
    repo = tmp_path_factory.mktemp("torch_repo")
    version = repo / "torchnet" / "1"
    version.mkdir(parents=True)
    (repo / "torchnet" / "config.pbtxt").write_text(CONFIG)
    shutil.copy(Path(__file__).parents[1] / "unit" / "torch_net.py", version / "model.py")
    torch.manual_seed(3)
    net = create_model().eval()
    save_file(net.state_dict(), str(version / "model.safetensors"))
    with run_server(repo, repo.parent / "torch_server.log") as srv:
        yield srv, net


def _expected(net: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        h, total = net(torch.from_numpy(x), torch.from_numpy(y))
    return h.numpy(), total.numpy()


def test_grpc_and_http_match_eager(torch_server: tuple[RunningServer, torch.nn.Module]) -> None:
    srv, net = torch_server
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    h, total = _expected(net, x, y)
    g = grpcclient.InferenceServerClient(srv.grpc_url)
    ins = [grpcclient.InferInput("x", [3, 8], "FP32"), grpcclient.InferInput("y", [3, 4], "FP32")]
    ins[0].set_data_from_numpy(x)
    ins[1].set_data_from_numpy(y)
    r = g.infer("torchnet", ins)
    np.testing.assert_allclose(r.as_numpy("h"), h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.as_numpy("total"), total, rtol=1e-5, atol=1e-6)
    assert g.get_model_metadata("torchnet").platform == "pytorch_libtorch"
    c = httpclient.InferenceServerClient(srv.http_url)
    hins = [httpclient.InferInput("x", [3, 8], "FP32"), httpclient.InferInput("y", [3, 4], "FP32")]
    hins[0].set_data_from_numpy(x, binary_data=False)
    hins[1].set_data_from_numpy(y, binary_data=True)
    hr = c.infer("torchnet", hins, outputs=[httpclient.InferRequestedOutput("total")])
    np.testing.assert_allclose(hr.as_numpy("total"), total, rtol=1e-5, atol=1e-6)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    torch_server: tuple[RunningServer, torch.nn.Module],
) -> None:
    srv, net = torch_server
    errors: list[str] = []

    def client(seed: int) -> None:
        g = grpcclient.InferenceServerClient(srv.grpc_url)
        rng = np.random.default_rng(seed)
        for _ in range(20):
            rows = int(rng.integers(1, 4))
            x, y = rng.standard_normal((rows, 8)).astype(np.float32), rng.standard_normal((rows, 4)).astype(np.float32)
            ins = [grpcclient.InferInput("x", [rows, 8], "FP32"), grpcclient.InferInput("y", [rows, 4], "FP32")]
            ins[0].set_data_from_numpy(x)
            ins[1].set_data_from_numpy(y)
            h, _ = _expected(net, x, y)
            got = g.infer("torchnet", ins).as_numpy("h")
            if not np.allclose(got, h, rtol=1e-5, atol=1e-6):
                errors.append(f"client {seed}: wrong answer")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    stats = grpcclient.InferenceServerClient(srv.grpc_url).get_inference_statistics("torchnet", as_json=True)
    model = stats["model_stats"][0]
    assert int(model["execution_count"]) < int(model["inference_count"])  # some requests shared a batch
