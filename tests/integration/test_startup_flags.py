"""Triton's start-up conventions with Triton's defaults, on the real server: a model that fails to load at
start stops the server (``--exit-on-error``), readiness waits for every model (``--strict-readiness``), and
``--disable-auto-complete-config`` takes configs as written."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from dl_inference.examples import make_example_repository
from tests.integration.server import RunningServer, run_server


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    make_example_repository(root)
    return root


def repo_with_broken(tmp_path: Path, examples: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(examples / "simple", repo / "simple")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    (repo / "broken" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    return repo


def status(srv: RunningServer, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{srv.http_url}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def wait_live(srv: RunningServer, timeout: float = 60) -> None:
    """Until models have been tried: the log says which one failed, or the server exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.process.poll() is not None or "failed to load" in srv.log():
            time.sleep(1.0)  # the rest of start-up
            return
        time.sleep(0.2)
    raise AssertionError(f"no model failed within {timeout} s:\n{srv.log()[-3000:]}")


def infer_simple(srv: RunningServer) -> np.ndarray:
    c = httpclient.InferenceServerClient(srv.http_url)
    x = httpclient.InferInput("x", [1, 16], "FP32")
    x.set_data_from_numpy(np.ones((1, 16), np.float32))
    return c.infer("simple", [x]).as_numpy("y")  # type: ignore[no-any-return]


def test_a_model_failing_at_start_stops_the_server_by_default(tmp_path: Path, examples: Path) -> None:
    repo = repo_with_broken(tmp_path, examples)
    with run_server(repo, tmp_path / "server.log", wait=False) as srv:
        code = srv.process.wait(timeout=90)
        log = srv.log()
    assert code == 1, log[-3000:]
    assert "model(s) broken failed to load at start; exiting" in log and "--exit-on-error=false" in log
    assert not srv.worker_pids()  # no worker left behind


def test_exit_on_error_false_serves_the_rest_not_ready_while_strict(tmp_path: Path, examples: Path) -> None:
    repo = repo_with_broken(tmp_path, examples)
    with run_server(repo, tmp_path / "strict.log", "--exit-on-error=false", wait=False) as srv:
        wait_live(srv)
        assert srv.process.poll() is None
        assert status(srv, "/v2/health/live") == 200
        assert status(srv, "/v2/health/ready") == 400  # strict: a model failed
        assert status(srv, "/v2/models/simple/ready") == 200 and status(srv, "/v2/models/broken/ready") == 400
        assert infer_simple(srv).shape == (1, 4)
    with run_server(
        repo, tmp_path / "lenient.log", "--exit-on-error", "false", "--strict-readiness=false", wait=False
    ) as srv:
        wait_live(srv)
        assert status(srv, "/v2/health/ready") == 200  # not strict: ready once started


def test_disable_auto_complete_config_takes_configs_as_written(tmp_path: Path, examples: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(examples / "simple", repo / "simple")  # its config lists everything: fine
    (repo / "bare" / "1").mkdir(parents=True)  # the same file with no config at all
    shutil.copy(examples / "simple" / "1" / "model.onnx", repo / "bare" / "1" / "model.onnx")
    (repo / "nobatch" / "1").mkdir(parents=True)  # lists its tensors but not the max_batch_size its file allows
    shutil.copy(examples / "simple" / "1" / "model.onnx", repo / "nobatch" / "1" / "model.onnx")
    text = (examples / "simple" / "config.pbtxt").read_text().replace("max_batch_size: 8", "max_batch_size: 0")
    (repo / "nobatch" / "config.pbtxt").write_text(text.replace('name: "simple"', 'name: "nobatch"'))
    args = ("--exit-on-error=false", "--disable-auto-complete-config")
    with run_server(repo, tmp_path / "server.log", *args, wait=False) as srv:
        wait_live(srv)
        index = {m["name"]: m for m in httpclient.InferenceServerClient(srv.http_url).get_model_repository_index()}
        assert index["simple"]["state"] == "READY"
        assert infer_simple(srv).shape == (1, 4)
        assert index["bare"]["state"] == "UNAVAILABLE"
        assert "lists no inputs and outputs" in index["bare"]["reason"]
        assert "--disable-auto-complete-config" in index["bare"]["reason"]
        assert index["nobatch"]["state"] == "UNAVAILABLE" and "says max_batch_size 0" in index["nobatch"]["reason"]
    # Without the flag the same repository loads all three (the server completes their configs).
    with run_server(repo, tmp_path / "auto.log") as srv:
        assert status(srv, "/v2/models/bare/ready") == 200 and status(srv, "/v2/models/nobatch/ready") == 200


def test_json_logs_from_every_process(tmp_path: Path, examples: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(examples / "simple", repo / "simple")
    with run_server(repo, tmp_path / "server.log", "--log-format", "json", "--frontends", "2") as srv:
        assert infer_simple(srv).shape == (1, 4)
        time.sleep(0.5)
        log = srv.log()
    ours = [line for line in log.splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in ours]
    assert all({"time", "level", "process", "logger", "message"} <= set(e) for e in entries)
    processes = {e["process"] for e in entries}
    assert {"gateway", "frontend 1", "worker simple:1#0"} <= processes, processes
    assert not [line for line in log.splitlines() if " INFO [" in line]  # no process kept the text format
