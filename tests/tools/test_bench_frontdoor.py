"""The front-door benchmark's own logic: its models and its CPU accounting (the servers it drives are real)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from load_tests.bench_frontdoor import group_cpu_seconds, write_models


def test_models_are_the_requests_it_describes(tmp_path: Path) -> None:
    write_models(tmp_path)
    assert (tmp_path / "simple" / "config.pbtxt").exists()
    session = ort.InferenceSession(str(tmp_path / "image_mean" / "1" / "model.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    assert x[:1].nbytes == 602_112  # the 602 KB request
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


def test_group_cpu_counts_every_process_of_the_group() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(30)"
    leader = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {burn!r}])\n{burn}"],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while group_cpu_seconds(leader.pid) < 1.1 and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu = group_cpu_seconds(leader.pid)
        assert 1.1 <= cpu < 5, cpu  # two processes burned 0.6 s each (plus start-up)
        assert group_cpu_seconds(os.getpgrp()) > 0  # ours: not theirs
        assert group_cpu_seconds(leader.pid) < cpu + 0.5  # both sleep now: it stops growing
    finally:
        os.killpg(leader.pid, 9)
        leader.wait()
