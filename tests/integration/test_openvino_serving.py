"""OpenVINO models served by the real server to stock tritonclient over gRPC and HTTP: the same answers as
ONNX Runtime serving the same file, dynamic batching under concurrency, an IR model found by its file,
and bad requests answered with the tensor named while the worker keeps serving."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

ov = pytest.importorskip("openvino")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from dl_inference.examples import make_example_repository  # noqa: E402
from tests.integration.server import RunningServer, run_server  # noqa: E402

OV_CONFIG = """name: "simple_ov"
backend: "openvino"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group { count: 1 kind: KIND_CPU }
parameters { key: "num_threads" value { string_value: "1" } }
"""


@pytest.fixture(scope="module")
def ov_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("ov")
    examples = root / "examples"
    make_example_repository(examples)
    repo = root / "repo"
    shutil.copytree(examples / "simple", repo / "simple")  # onnxruntime: the reference
    (repo / "simple_ov" / "1").mkdir(parents=True)
    shutil.copy(examples / "simple" / "1" / "model.onnx", repo / "simple_ov" / "1" / "model.onnx")
    (repo / "simple_ov" / "config.pbtxt").write_text(OV_CONFIG)
    ir = repo / "simple_ir" / "1"  # no config at all: model.xml says openvino, the model says the rest
    ir.mkdir(parents=True)
    model = ov.Core().read_model(str(examples / "simple" / "1" / "model.onnx"))
    ov.save_model(model, str(ir / "model.xml"), compress_to_fp16=False)
    env_cache = root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DL_INFERENCE_CACHE_DIR", str(env_cache))
        with run_server(repo, root / "server.log", ready_timeout=120) as srv:
            yield srv


def _x(module, x: np.ndarray, **kw):  # type: ignore[no-untyped-def]
    inp = module.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, **kw)
    return inp


def test_answers_match_onnxruntime_over_grpc_and_http(ov_server: RunningServer) -> None:
    g = grpcclient.InferenceServerClient(ov_server.grpc_url)
    h = httpclient.InferenceServerClient(ov_server.http_url)
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    expected = g.infer("simple", [_x(grpcclient, x)]).as_numpy("y")
    for model in ("simple_ov", "simple_ir"):
        np.testing.assert_allclose(g.infer(model, [_x(grpcclient, x)]).as_numpy("y"), expected, rtol=1e-5, atol=1e-6)
        for binary in (False, True):
            r = h.infer(model, [_x(httpclient, x, binary_data=binary)])
            np.testing.assert_allclose(r.as_numpy("y"), expected, rtol=1e-5, atol=1e-6)
    config = h.get_model_config("simple_ir")
    assert config["backend"] == "openvino" and config["max_batch_size"] == 8
    assert config["parameters"]["openvino_runtime"]["string_value"].startswith("OpenVINO ")
    meta = g.get_model_metadata("simple_ov", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("x", "FP32", ["-1", "16"])]


def test_dynamic_batching_under_concurrency(ov_server: RunningServer) -> None:
    def one(i: int) -> np.ndarray:
        c = grpcclient.InferenceServerClient(ov_server.grpc_url)
        x = np.full((1, 16), float(i), np.float32)
        return c.infer("simple_ov", [_x(grpcclient, x)]).as_numpy("y")

    reference = grpcclient.InferenceServerClient(ov_server.grpc_url)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    for i, y in enumerate(results):  # each answer is its own request's, whatever batch it rode in
        x = np.full((1, 16), float(i), np.float32)
        expected = reference.infer("simple", [_x(grpcclient, x)]).as_numpy("y")
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    stats = reference.get_inference_statistics("simple_ov", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 64
    assert int(stats["execution_count"]) < int(stats["inference_count"])  # some requests were batched


def test_bad_requests_name_the_tensor_and_the_worker_keeps_serving(ov_server: RunningServer) -> None:
    g = grpcclient.InferenceServerClient(ov_server.grpc_url)
    with pytest.raises(InferenceServerException, match=r"input 'x'.*shape"):
        g.infer("simple_ov", [_x(grpcclient, np.ones((1, 5), np.float32))])
    wrong = grpcclient.InferInput("x", [1, 16], "INT32")
    wrong.set_data_from_numpy(np.ones((1, 16), np.int32))
    with pytest.raises(InferenceServerException, match=r"'x'.*FP32"):
        g.infer("simple_ov", [wrong])
    y = g.infer("simple_ov", [_x(grpcclient, np.ones((1, 16), np.float32))]).as_numpy("y")
    assert y.shape == (1, 4)
