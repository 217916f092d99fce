"""Model warmup on a real server: a model is ready only after its warmup ran, and a bad warmup fails
the load."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from tests.integration.models import scale_model
from tests.integration.server import run_server

GOOD = """max_batch_size: 8
model_warmup [
  { name: "zeros" batch_size: 8 count: 3
    inputs { key: "x" value: { data_type: TYPE_FP32 dims: [4] zero_data: true } } },
  { name: "from_file"
    inputs { key: "x" value: { data_type: TYPE_FP32 dims: [4] input_data_file: "x.bin" } } }
]
"""

BAD = """max_batch_size: 8
model_warmup [
  { name: "wrong_name" batch_size: 2 count: 3
    inputs { key: "input__0" value: { data_type: TYPE_FP32 dims: [4] random_data: true } } }
]
"""


def test_warmup_gates_readiness_and_a_bad_sample_fails_the_load(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    scale_model(repo / "warm", 2.0)
    (repo / "warm" / "config.pbtxt").write_text(GOOD)
    (repo / "warm" / "warmup").mkdir()
    (repo / "warm" / "warmup" / "x.bin").write_bytes(np.arange(4, dtype="<f4").tobytes())
    scale_model(repo / "cold", 2.0)
    (repo / "cold" / "config.pbtxt").write_text(BAD)

    log_path = tmp_path / "server.log"
    # 'cold' fails on purpose: the server goes on serving 'warm', ready as soon as it has started
    with run_server(repo, log_path, "--exit-on-error=false", "--strict-readiness=false") as srv:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        assert client.is_model_ready("warm")
        assert not client.is_model_ready("cold")
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        np.testing.assert_allclose(client.infer("warm", [x]).as_numpy("y"), [[2, 2, 2, 2]])
        index = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
        log = srv.log()

    # the good model warmed up (one line per sample, with its timing) before it was loaded and ready
    zeros = re.search(r"model 'warm' warmup 'zeros': 3 run\(s\) in [\d.]+ ms .*x \[8,4\]", log)
    from_file = re.search(r"model 'warm' warmup 'from_file': 1 run\(s\) in [\d.]+ ms .*x \[1,4\]", log)
    assert zeros and from_file, log
    ready = log.index("model 'warm' version(s) 1 ready")
    assert zeros.start() < ready and from_file.start() < ready

    # the bad one failed to load with the warmup's message, naming the sample and the inputs
    assert index["warm"] == ("READY", "")
    assert index["cold"][0] == "UNAVAILABLE"
    assert "warmup 'wrong_name' failed: " in index["cold"][1]
    failed = [line for line in log.splitlines() if "model 'cold' failed to load" in line]
    assert failed, log
    assert any(
        "warmup 'wrong_name' failed: model 'cold' warmup sample 'wrong_name' has no data for input 'x'" in line
        and "input__0" in line
        for line in failed
    ), failed
    assert "model 'cold' version(s) 1 ready" not in log
