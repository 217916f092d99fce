"""handler.py end to end: the example image classifier through the real server, over gRPC and HTTP."""

from __future__ import annotations

import io
import random
import shutil
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from dl_inference.examples import COLOURS
from tests.integration.server import RunningServer, run_server

MODEL = "image_classifier"
LABELS = list(COLOURS)


def encoded(rgb: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, fmt)
    return buf.getvalue()


def colour_image(label: str, fmt: str, rng: random.Random) -> bytes:
    """An image of the named reference colour, slightly off, at a random size."""
    rgb = tuple(min(255, max(0, int(c * 255) + rng.randint(-25, 25))) for c in COLOURS[label])
    return encoded(rgb, fmt, (rng.randint(8, 120), rng.randint(8, 120)))  # type: ignore[arg-type]


def parse(labels: np.ndarray) -> list[list[tuple[float, int, str]]]:
    rows = []
    for row in labels:
        parsed = []
        for item in row:
            score, index, name = item.decode().split(":")
            parsed.append((float(score), int(index), name))
        rows.append(parsed)
    return rows


def grpc_classify(url: str, images: list[bytes], **params: object) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("image", [len(images), 1], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1))
    result = client.infer(MODEL, [inp], parameters=params or None)
    return result.as_numpy("labels")


def http_classify(url: str, images: list[bytes], **params: object) -> np.ndarray:
    client = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("image", [len(images), 1], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1), binary_data=True)
    result = client.infer(MODEL, [inp], parameters=params or None)
    return result.as_numpy("labels")


@pytest.mark.parametrize("classify", [grpc_classify, http_classify], ids=["grpc", "http"])
def test_image_bytes_in_top_k_labels_out(server: RunningServer, classify: object) -> None:
    url = server.grpc_url if classify is grpc_classify else server.http_url
    images = [encoded((220, 30, 30), "JPEG"), encoded((30, 200, 200), "PNG", (7, 300))]
    labels = classify(url, images)  # type: ignore[operator]
    assert labels.shape == (2, 3)  # the config's default top_k
    rows = parse(labels)
    assert [r[0][2] for r in rows] == ["red", "cyan"]
    for row in rows:
        scores = [s for s, _, _ in row]
        assert scores == sorted(scores, reverse=True) and 0.5 < scores[0] <= 1
        assert all(LABELS[i] == name for _, i, name in row)
    one = parse(classify(url, images, top_k=1))  # type: ignore[operator]
    assert [[name for _, _, name in r] for r in one] == [["red"], ["cyan"]]


def test_metadata_shows_the_client_tensors(server: RunningServer) -> None:
    meta = grpcclient.InferenceServerClient(server.grpc_url).get_model_metadata(MODEL, as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("image", "BYTES", ["-1", "1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [("labels", "BYTES", ["-1", "-1"])]


def test_a_corrupt_image_is_a_clear_400_and_the_worker_keeps_serving(server: RunningServer) -> None:
    (pid,) = server.worker_pids(MODEL)
    with pytest.raises(InferenceServerException) as grpc_err:
        grpc_classify(server.grpc_url, [encoded((0, 0, 0)), b"\x89PNG but not really"])
    assert grpc_err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert grpc_err.value.message() == (
        "model 'image_classifier': handler preprocess failed: ValueError: "
        "input 'image' row 1: 19 bytes that are not a JPEG or PNG image"
    )
    truncated = encoded((10, 200, 10), "JPEG", (300, 300))[:400]
    with pytest.raises(InferenceServerException) as http_err:
        http_classify(server.http_url, [truncated])
    assert http_err.value.status() == "400"
    assert "handler preprocess failed: ValueError: input 'image' row 0: cannot decode the image" in str(
        http_err.value.message()
    )
    with pytest.raises(InferenceServerException, match=r"parameter 'top_k' must be in 1\.\.8, got 0"):
        grpc_classify(server.grpc_url, [encoded((0, 0, 0))], top_k=0)
    assert parse(grpc_classify(server.grpc_url, [encoded((0, 0, 0))]))[0][0][2] == "black"
    assert server.worker_pids(MODEL) == [pid]


def test_concurrent_clients_each_get_their_own_answer(server: RunningServer) -> None:
    stats_client = grpcclient.InferenceServerClient(server.grpc_url)
    before = stats_client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    failures: list[str] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(15):
            names = [rng.choice(LABELS) for _ in range(rng.randint(1, 3))]
            images = [colour_image(n, rng.choice(["PNG", "JPEG"]), rng) for n in names]
            k = rng.randint(1, 4)
            try:
                classify = grpc_classify if seed % 2 else http_classify
                url = server.grpc_url if seed % 2 else server.http_url
                rows = parse(classify(url, images, top_k=k))
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            got = [[name for _, _, name in row] for row in rows]
            if len(got) != len(names) or any(len(r) != k or r[0] != n for r, n in zip(got, names)):
                failures.append(f"sent {names} top_k={k}, got {got}")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    after = stats_client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    requests = int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"])
    assert requests == 8 * 15


POSTPROCESS_FAILS = """
import numpy as np

def postprocess(outputs, parameters):
    if parameters.get("explode"):
        raise ZeroDivisionError("the handler divided by zero")
    return {"total": outputs["y"].sum(axis=1, keepdims=True)}
"""


@pytest.fixture(scope="module")
def handler_server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("handler_repo")
    shutil.copytree(example_repo / "simple", repo / "summed")
    (repo / "summed" / "config.pbtxt").write_text(
        'name: "summed"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
        'input { name: "x" data_type: TYPE_FP32 dims: [16] }\n'
        'output { name: "total" data_type: TYPE_FP32 dims: [1] }\n'
    )
    (repo / "summed" / "handler.py").write_text(textwrap.dedent(POSTPROCESS_FAILS))
    with run_server(repo, repo.parent / "handler_server.log") as srv:
        yield srv


def test_a_postprocess_exception_is_a_500_and_the_worker_lives(handler_server: RunningServer) -> None:
    (pid,) = handler_server.worker_pids("summed")
    client = httpclient.InferenceServerClient(handler_server.http_url)
    x = np.ones((2, 16), dtype=np.float32)
    inp = httpclient.InferInput("x", [2, 16], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as err:
        client.infer("summed", [inp], parameters={"explode": True})
    assert err.value.status() == "500"
    assert err.value.message() == (
        "model 'summed': handler postprocess failed: ZeroDivisionError: the handler divided by zero"
    )
    ok = client.infer("summed", [inp]).as_numpy("total")
    assert ok.shape == (2, 1) and np.all(ok >= 0)  # simple ends in a Relu
    assert handler_server.worker_pids("summed") == [pid]
    assert "handler postprocess failed" in handler_server.log()
