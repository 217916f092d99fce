"""TensorFlow SavedModels served by the real server over gRPC and HTTP with stock tritonclient:
exact answers, a string model, dynamic batching under concurrency, bad input answered without
harming the worker."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from dl_inference.examples_tensorflow import LINEAR_B, LINEAR_W, make_tensorflow_examples
from tests.integration.server import RunningServer, run_server


@pytest.fixture(scope="module")
def tf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("tf_repo")
    make_tensorflow_examples(repo)
    with run_server(repo, repo.parent / "tf_server.log", ready_timeout=120) as srv:
        yield srv


def _linear_input(module, x: np.ndarray, **kw):  # type: ignore[no-untyped-def]
    inp = module.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, **kw)
    return inp


def test_linear_over_grpc_and_http(tf_server: RunningServer) -> None:
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    expected = x @ LINEAR_W + LINEAR_B
    g = grpcclient.InferenceServerClient(tf_server.grpc_url)
    np.testing.assert_allclose(g.infer("tf_linear", [_linear_input(grpcclient, x)]).as_numpy("y"), expected, rtol=1e-6)
    meta = g.get_model_metadata("tf_linear")
    assert meta.platform == "tensorflow_savedmodel"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    h = httpclient.InferenceServerClient(tf_server.http_url)
    for binary in (False, True):
        r = h.infer("tf_linear", [_linear_input(httpclient, x, binary_data=binary)])
        np.testing.assert_allclose(r.as_numpy("y"), expected, rtol=1e-6)
    config = h.get_model_config("tf_linear")
    assert config["max_batch_size"] == 16 and config["backend"] == "tensorflow"
    assert config["parameters"]["tensorflow_runtime"]["string_value"].startswith("TensorFlow ")


def test_string_model(tf_server: RunningServer) -> None:
    words = np.array([["hello"], ["Gr\u00fc\u00dfe"], [""]], dtype=object)
    inp = grpcclient.InferInput("text", [3, 1], "BYTES")
    inp.set_data_from_numpy(words)
    r = grpcclient.InferenceServerClient(tf_server.grpc_url).infer("tf_text", [inp])
    assert r.as_numpy("upper")[:, 0].tolist() == [b"HELLO", "GR\u00dcSSE".encode(), b""]
    assert r.as_numpy("length")[:, 0].tolist() == [5, 7, 0]


def test_concurrent_requests_batched_each_gets_its_own_answer(tf_server: RunningServer) -> None:
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        g = grpcclient.InferenceServerClient(tf_server.grpc_url)
        rng = np.random.default_rng(seed)
        try:
            for _ in range(15):
                x = rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32)
                y = g.infer("tf_linear", [_linear_input(grpcclient, x)]).as_numpy("y")
                np.testing.assert_allclose(y, x @ LINEAR_W + LINEAR_B, rtol=1e-5, atol=1e-6)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    stats = grpcclient.InferenceServerClient(tf_server.grpc_url).get_inference_statistics("tf_linear")
    model_stats = stats.model_stats[0]
    assert model_stats.inference_count >= 120
    assert model_stats.execution_count < model_stats.inference_count  # some requests shared a batch


def test_bad_input_is_a_clear_400_and_the_worker_lives(tf_server: RunningServer) -> None:
    pids = tf_server.worker_pids("tf_linear")
    h = httpclient.InferenceServerClient(tf_server.http_url)
    bad = httpclient.InferInput("x", [1, 5], "FP32")
    bad.set_data_from_numpy(np.ones((1, 5), np.float32))
    with pytest.raises(InferenceServerException, match=r"input 'x'.*expected shape \[-1,4\], got \[1,5\]") as info:
        h.infer("tf_linear", [bad])
    assert info.value.status() == "400"
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(
        h.infer("tf_linear", [_linear_input(httpclient, x)]).as_numpy("y"), x @ LINEAR_W + LINEAR_B
    )
    assert tf_server.worker_pids("tf_linear") == pids
