"""resnet50_jpeg end to end on the CPU: real JPEGs through the real server (gRPC and HTTP), the handler
decoding with Pillow, the PyTorch backend running the benchmark's ResNet-50, top-k back."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from PIL import Image  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from dl_inference.example_handlers import resnet50_jpeg as handler  # noqa: E402
from load_tests import bench_pytorch_gpu as bench  # noqa: E402
from load_tests.resnet50_torch import ResNet50, random_state_dict  # noqa: E402
from load_tests.synthetic_jpeg import encode_jpeg, photo_like, synthetic_jpegs  # noqa: E402
from tests.integration.server import RunningServer, run_server  # noqa: E402

MODEL = bench.JPEG
SIZE = 64  # the network takes any size >= 32: small keeps a 2-core machine quick


@pytest.fixture(scope="module")
def jpeg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("jpeg_repo")
    bench.write_repository(repo, [MODEL], image=SIZE, max_batch_size=4, device="cpu", compile_mode="off")
    config = repo / MODEL / "config.pbtxt"
    text = config.read_text()
    assert 'key: "decode" value { string_value: "cpu" }' in text  # KIND_CPU: Pillow
    # fp32 so that the answers can be checked against the network run here; the bench serves fp16
    config.write_text(text.replace('string_value: "fp16"', 'string_value: "fp32"'))
    with run_server(repo, repo.parent / "jpeg_server.log") as srv:
        yield srv


def expected(images: list[bytes], k: int) -> tuple[np.ndarray, np.ndarray]:
    """What the server should answer: the handler's CPU preprocessing, the same weights, in process."""
    net = ResNet50().eval()
    net.load_state_dict(random_state_dict(0))
    with torch.inference_mode():
        logits = net(torch.from_numpy(handler.preprocess_cpu(images, SIZE))).numpy()
    return handler.top_k(logits, k)


def grpc_infer(url: str, images: list[bytes], outputs: list[str], **params: object) -> grpcclient.InferResult:
    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("image", [len(images), 1], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1))
    wanted = [grpcclient.InferRequestedOutput(name) for name in outputs]
    return client.infer(MODEL, [inp], outputs=wanted, parameters=params or None)


def test_jpeg_bytes_in_top_k_out(jpeg_server: RunningServer) -> None:
    rng = np.random.default_rng(5)
    grey = io.BytesIO()
    Image.fromarray(photo_like(rng, 50, 80)[..., 0], "L").save(grey, "JPEG", quality=90)  # one channel: to RGB
    images = [*synthetic_jpegs(2, SIZE, seed=9), encode_jpeg(photo_like(rng, 120, 90)), grey.getvalue()]
    result = grpc_infer(jpeg_server.grpc_url, images, ["labels", "indices", "scores"])
    want_idx, want_scores = expected(images, 5)
    indices, scores, labels = result.as_numpy("indices"), result.as_numpy("scores"), result.as_numpy("labels")
    assert indices.dtype == np.int64 and scores.dtype == np.float32 and labels.shape == (4, 5)
    np.testing.assert_array_equal(indices, want_idx)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-3, atol=1e-5)
    for row in range(4):
        assert [item.decode().split(":")[1:] for item in labels[row]] == [[str(i), f"class_{i}"] for i in indices[row]]
        assert float(labels[row, 0].decode().split(":")[0]) == pytest.approx(float(scores[row, 0]), abs=1e-6)

    one = grpc_infer(jpeg_server.grpc_url, images[:1], ["indices"], top_k=2).as_numpy("indices")
    np.testing.assert_array_equal(one, want_idx[:1, :2])

    http = httpclient.InferenceServerClient(jpeg_server.http_url)
    inp = httpclient.InferInput("image", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array(images[2:3], dtype=object).reshape(-1, 1), binary_data=True)
    got = http.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("indices")]).as_numpy("indices")
    np.testing.assert_array_equal(got, want_idx[2:3])


def test_metadata_shows_the_client_tensors(jpeg_server: RunningServer) -> None:
    meta = grpcclient.InferenceServerClient(jpeg_server.grpc_url).get_model_metadata(MODEL, as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("image", "BYTES", ["-1", "1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("labels", "BYTES", ["-1", "-1"]),
        ("indices", "INT64", ["-1", "-1"]),
        ("scores", "FP32", ["-1", "-1"]),
    ]


def test_a_row_that_is_not_a_jpeg_is_invalid_argument_naming_it(jpeg_server: RunningServer) -> None:
    (pid,) = jpeg_server.worker_pids(MODEL)
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 128, 0)).save(png, "PNG")
    good = synthetic_jpegs(1, SIZE, seed=1)[0]
    with pytest.raises(InferenceServerException) as err:
        grpc_infer(jpeg_server.grpc_url, [good, png.getvalue()], ["indices"])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.value.message() == (
        f"model '{MODEL}': handler preprocess failed: ValueError: "
        f"input 'image' row 1: {len(png.getvalue())} bytes that are not a JPEG image"
    )
    with pytest.raises(InferenceServerException, match="input 'image' row 0: cannot decode the JPEG"):
        grpc_infer(jpeg_server.grpc_url, [good[:200]], ["indices"])
    assert grpc_infer(jpeg_server.grpc_url, [good], ["indices"]).as_numpy("indices").shape == (1, 5)
    assert jpeg_server.worker_pids(MODEL) == [pid]
