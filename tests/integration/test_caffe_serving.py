"""Caffe models dropped into a repository are converted (cached) and served; outputs match real Caffe."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.integration.server import run_server
from tests.samples import CAFFE_SAMPLES, CAFFE_SKIP_REASON

SHARED = CAFFE_SAMPLES
LENET = SHARED / "lenet"

pytestmark = pytest.mark.skipif(not LENET.is_dir(), reason=CAFFE_SKIP_REASON)


def _golden() -> tuple[np.ndarray, np.ndarray]:
    x = np.load(LENET / "lenet_iter_10000.caffemodel.cv2_input_seed0.npy").astype(np.float32)
    prob = np.load(LENET / "lenet_iter_10000.caffemodel.caffe_prob_seed0.npy")
    return x, prob


def _infer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    meta = client.get_model_metadata(model)
    inp = grpcclient.InferInput(meta.inputs[0].name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp])
    return result.as_numpy(meta.outputs[0].name)


def test_caffe_model_is_converted_cached_and_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DL_INFERENCE_CACHE_DIR", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    (repo / "lenet" / "1").mkdir(parents=True)
    for name in ("lenet.prototxt", "lenet_iter_10000.caffemodel"):
        shutil.copy(LENET / name, repo / "lenet" / "1" / name)
    # The same net with its pre-processing in the config: (x - 0.5) * 2 over the raw input.
    shutil.copytree(repo / "lenet", repo / "lenet_pre")
    (repo / "lenet_pre" / "config.pbtxt").write_text(
        'parameters { key: "caffe_mean" value: { string_value: "0.5" } }\n'
        'parameters { key: "caffe_scale" value: { string_value: "2" } }\n'
    )
    x, golden = _golden()
    tolerance = 1e-4 * max(1.0, float(np.abs(golden).max()))
    with run_server(repo, tmp_path / "log1") as srv:
        got = _infer(srv.grpc_url, "lenet", x)
        assert np.abs(got.reshape(golden.shape) - golden).max() <= tolerance
        got = _infer(srv.grpc_url, "lenet_pre", x / 2 + 0.5)
        assert np.abs(got.reshape(golden.shape) - golden).max() <= tolerance
        assert "converting Caffe model lenet.prototxt" in srv.log()
        config = grpcclient.InferenceServerClient(srv.grpc_url).get_model_config("lenet").config
        assert config.backend == "caffe"
    cached = sorted((tmp_path / "cache" / "caffe").glob("*.onnx"))
    assert len(cached) == 2  # one per pre-processing setting
    with run_server(repo, tmp_path / "log2") as srv:
        assert "using cached conversion" in srv.log()
        assert "converting Caffe model" not in srv.log()
        got = _infer(srv.grpc_url, "lenet", x)
        assert np.abs(got.reshape(golden.shape) - golden).max() <= tolerance
