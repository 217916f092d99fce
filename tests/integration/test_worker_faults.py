"""Workers really killed (SIGKILL) under traffic: nothing hangs, models come back by themselves."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.integration.models import slow_model
from tests.integration.server import RunningServer, run_server

CLIENT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("fault_repo")
    slow_model(repo / "pair", instances=2)
    slow_model(repo / "single", instances=1)
    with run_server(repo, repo.parent / "fault_server.log") as srv:
        yield srv


class Traffic:
    """Client threads sending requests in a loop; records how each request ended and how long it took."""

    def __init__(self, url: str, model: str, threads: int) -> None:
        self.url, self.model = url, model
        self.outcomes: Counter[str] = Counter()
        self.messages: list[str] = []
        self.longest = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        x = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                r = client.infer(self.model, [inp], client_timeout=CLIENT_TIMEOUT_S)
                assert r.as_numpy("y").shape == (16, 512)
                outcome, message = "ok", ""
            except InferenceServerException as exc:
                outcome, message = str(exc.status()), str(exc.message())
                time.sleep(0.05)
            with self._lock:
                self.longest = max(self.longest, time.monotonic() - start)
                self.outcomes[outcome] += 1
                if message:
                    self.messages.append(message)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT_S + 5)
        assert not any(t.is_alive() for t in self._threads), "a client thread is stuck"


def _wait(predicate: object, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")


def test_killing_one_of_two_instances_loses_nothing(fault_server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(fault_server.grpc_url)
    pids = fault_server.worker_pids("pair")
    assert len(pids) == 2
    with Traffic(fault_server.grpc_url, "pair", threads=6) as traffic:
        time.sleep(1.0)
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(1.0)
        _wait(lambda: len(set(fault_server.worker_pids("pair")) - set(pids)) == 1, 60)
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
    with Traffic(fault_server.grpc_url, "single", threads=4) as traffic:
        time.sleep(1.0)
        os.kill(pid, signal.SIGKILL)
        noticed = _wait(lambda: not client.is_model_ready("single"), 5)
        back = _wait(lambda: client.is_model_ready("single"), 60)
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
    _wait(lambda: client.is_model_ready("pair") and client.is_model_ready("single"), 60)
    victims = fault_server.worker_pids()
    assert len(victims) == 3
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: len(set(fault_server.worker_pids()) - set(victims)) == 3, 90)
    _wait(lambda: client.is_server_ready(), 60)
    assert client.is_model_ready("pair") and client.is_model_ready("single")
