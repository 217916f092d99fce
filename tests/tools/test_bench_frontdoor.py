"""The front-door benchmark's own logic: its models and its CPU accounting (the servers it drives are real)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from load_tests.bench_frontdoor import write_models


def test_models_are_the_requests_it_describes(tmp_path: Path) -> None:
    write_models(tmp_path)
    assert (tmp_path / "simple" / "config.pbtxt").exists()
    session = ort.InferenceSession(str(tmp_path / "image_mean" / "1" / "model.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    assert x[:1].nbytes == 602_112  # the 602 KB request
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
