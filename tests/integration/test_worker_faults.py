"""Workers really killed (SIGKILL) under traffic: nothing hangs, models come back by themselves."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.integration.models import slow_model
from tests.integration.server import RunningServer, run_server
from tests.integration.traffic import Traffic, wait_for

CLIENT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("fault_repo")
    slow_model(repo / "pair", instances=2)
    slow_model(repo / "single", instances=1)
    with run_server(repo, repo.parent / "fault_server.log") as srv:
        yield srv


def slow_traffic(url: str, model: str, threads: int) -> Traffic:
    x = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    return Traffic(url, model, threads, x, client_timeout=CLIENT_TIMEOUT_S)


def test_killing_one_of_two_instances_loses_nothing(fault_server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(fault_server.grpc_url)
    pids = fault_server.worker_pids("pair")
    assert len(pids) == 2
    with slow_traffic(fault_server.grpc_url, "pair", threads=6) as traffic:
        time.sleep(1.0)
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(1.0)
        wait_for(lambda: len(set(fault_server.worker_pids("pair")) - set(pids)) == 1, 60)
        time.sleep(0.5)
    # Requests the dead worker held were re-sent to the other instance.
    assert traffic.outcomes["ok"] > 10
    assert set(traffic.outcomes) == {"ok"}, (traffic.outcomes, traffic.messages[:3])
    assert traffic.longest < CLIENT_TIMEOUT_S
    assert client.is_model_ready("pair")
    log = fault_server.log()
    assert "worker pair:1#0" in log and "died" in log
    assert "re-sending a request of model 'pair'" in log  # the in-flight ones really were re-sent


def test_killing_the_only_instance_fails_fast_and_recovers(fault_server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(fault_server.grpc_url)
    (pid,) = fault_server.worker_pids("single")
    with slow_traffic(fault_server.grpc_url, "single", threads=4) as traffic:
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        noticed = wait_for(lambda: not client.is_model_ready("single"), 5)
        back = wait_for(lambda: client.is_model_ready("single"), 60)
        time.sleep(1.0)
    assert noticed < 1.0, f"death noticed after {noticed:.2f} s"
    assert back > 0
    # Nothing hung: every request ended well before the client's own timeout, with ok or UNAVAILABLE.
    assert traffic.longest < CLIENT_TIMEOUT_S / 2
    assert set(traffic.outcomes) <= {"ok", "StatusCode.UNAVAILABLE"}, traffic.outcomes
    assert traffic.outcomes["StatusCode.UNAVAILABLE"] >= 1
    assert all("single" in m for m in traffic.messages), traffic.messages[:3]
    assert traffic.outcomes["ok"] >= 1
    (new_pid,) = fault_server.worker_pids("single")
    assert new_pid != pid
    x = grpcclient.InferInput("x", [1, 512], "FP32")
    x.set_data_from_numpy(np.zeros((1, 512), np.float32))
    assert client.infer("single", [x]).as_numpy("y").shape == (1, 512)


def test_two_deaths_at_once_are_both_handled(fault_server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(fault_server.grpc_url)
    wait_for(lambda: client.is_model_ready("pair") and client.is_model_ready("single"), 60)
    victims = fault_server.worker_pids()
    assert len(victims) == 3
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(set(fault_server.worker_pids()) - set(victims)) == 3, 90)
    wait_for(lambda: client.is_server_ready(), 60)
    assert client.is_model_ready("pair") and client.is_model_ready("single")
