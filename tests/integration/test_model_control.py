"""Model control modes (explicit, poll), config formats and the standalone worker, on real servers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.integration.models import scale_model
from tests.integration.server import free_port, run_server


def _x() -> tuple[grpcclient.InferInput, np.ndarray]:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    inp = grpcclient.InferInput("x", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    return inp, x


def _wait(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout} s")


def test_explicit_load_and_unload(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    scale_model(repo / "double", 2.0)
    scale_model(repo / "triple", 3.0)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with run_server(repo, tmp_path / "log", "--model-control-mode", "explicit", "--load-model", "double") as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        assert c.is_model_ready("double") and not c.is_model_ready("triple")
        index = {m.name: m.state for m in c.get_model_repository_index().models}
        assert index == {"double": "READY", "triple": "", "broken": ""}
        inp, x = _x()
        c.load_model("triple")
        np.testing.assert_allclose(c.infer("triple", [inp]).as_numpy("y"), x * 3)
        c.unload_model("double")
        assert not c.is_model_ready("double")
        with pytest.raises(InferenceServerException) as err:
            c.infer("double", [inp])
        assert err.value.status() == "StatusCode.NOT_FOUND"
        assert not srv.worker_pids("double")
        with pytest.raises(InferenceServerException) as err:
            c.load_model("broken")
        assert "broken" in err.value.message()
        index = {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}
        assert index["broken"][0] == "UNAVAILABLE" and index["broken"][1]
        assert index["double"] == ("UNAVAILABLE", "unloaded")
        with pytest.raises(InferenceServerException) as err:
            c.load_model("../etc")
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        with pytest.raises(InferenceServerException) as err:
            c.load_model("double", config='{"max_batch_size": 2}')
        assert err.value.status() == "StatusCode.UNIMPLEMENTED" and "config" in err.value.message()
        c.load_model("double")
        np.testing.assert_allclose(c.infer("double", [inp]).as_numpy("y"), x * 2)
        assert c.is_server_ready()


def test_poll_mode_reloads_and_keeps_old_version_when_new_one_is_broken(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    scale_model(repo / "m", 2.0, version=1)
    args = ("--model-control-mode", "poll", "--repository-poll-secs", "0.5")
    with run_server(repo, tmp_path / "log", *args) as srv:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        inp, x = _x()
        np.testing.assert_allclose(c.infer("m", [inp]).as_numpy("y"), x * 2)
        # A good new version replaces the old one (latest 1 by default).
        scale_model(repo / "m", 5.0, version=2)
        _wait(lambda: c.infer("m", [inp]).get_response().model_version == "2", 30)
        np.testing.assert_allclose(c.infer("m", [inp]).as_numpy("y"), x * 5)
        # A broken newer version leaves version 2 serving.
        (repo / "m" / "3").mkdir()
        (repo / "m" / "3" / "model.onnx").write_bytes(b"garbage")
        _wait(lambda: "failed to load" in srv.log(), 30)
        for _ in range(5):
            r = c.infer("m", [inp])
            assert r.get_response().model_version == "2"
        assert c.is_model_ready("m") and c.is_server_ready()
        # A new model appears; a removed one goes away.
        scale_model(repo / "n", 7.0)
        _wait(lambda: c.is_model_ready("n"), 30)
        shutil.rmtree(repo / "n")
        _wait(lambda: not c.is_model_ready("n"), 30)


def test_yaml_config_and_instance_count(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    scale_model(repo / "y", 4.0)
    (repo / "y" / "config.yaml").write_text("max_batch_size: 4\ninstance_group:\n  - count: 3\n    kind: KIND_CPU\n")
    with run_server(repo, tmp_path / "log") as srv:
        assert len(srv.worker_pids("y")) == 3
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        assert c.get_model_config("y").config.max_batch_size == 4
        inp, x = _x()
        np.testing.assert_allclose(c.infer("y", [inp]).as_numpy("y"), x * 4)


def test_standalone_worker_serves_v2_grpc(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    scale_model(repo / "w", 6.0)
    port = free_port()
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dl_inference", "worker", "--model-repository", str(repo), "--model", "w",
         "--host", "127.0.0.1", "--grpc-port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        c = grpcclient.InferenceServerClient(f"localhost:{port}")

        def up() -> bool:
            try:
                return bool(c.is_model_ready("w"))
            except InferenceServerException:
                return False

        _wait(up, 60)
        inp, x = _x()
        np.testing.assert_allclose(c.infer("w", [inp]).as_numpy("y"), x * 6)
        stats = c.get_inference_statistics("w").model_stats[0]
        assert stats.inference_stats.success.count == 1 and stats.inference_count == 2
        with pytest.raises(InferenceServerException) as err:
            c.infer("other", [inp])
        assert err.value.status() == "StatusCode.NOT_FOUND"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_gpu_instance_group_spawns_one_worker_per_gpu_and_spreads_load(tmp_path: Path) -> None:
    import concurrent.futures

    from tests.integration.models import looping_model

    repo = tmp_path / "repo"
    looping_model(
        repo / "g",
        'name: "g"\nmax_batch_size: 8\ninstance_group [{ count: 1, kind: KIND_GPU, gpus: [0, 1] }]\n',
        iterations=300,
    )
    with run_server(repo, tmp_path / "log") as srv:
        pids = srv.worker_pids("g")
        assert len(pids) == 2
        cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") for p in pids]
        devices = sorted(cmd[cmd.index(b"--device-id") + 1] for cmd in cmdlines)
        assert devices == [b"0", b"1"] and all(b"gpu" in cmd for cmd in cmdlines)
        before = {p: _cpu_seconds(p) for p in pids}
        x = np.ones((4, 512), np.float32)

        def call(_: int) -> None:
            c = grpcclient.InferenceServerClient(srv.grpc_url)
            i = grpcclient.InferInput("x", [4, 512], "FP32")
            i.set_data_from_numpy(x)
            assert c.infer("g", [i]).as_numpy("y").shape == (4, 512)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(call, range(64)))
        used = {p: _cpu_seconds(p) - before[p] for p in pids}
        total = sum(used.values())
        assert total > 0.1 and all(u > 0.2 * total for u in used.values()), used  # both did real work
