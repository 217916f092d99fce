"""``serve --frontends N``: several frontend processes on the same ports, one server to every client.

Each gRPC client below opens its own TCP connection (a local subchannel pool), so the kernel spreads
them over the frontends (SO_REUSEPORT); the tests then check that whatever frontend a client lands
on, statistics, metrics, readiness, the repository index and model control are the server's, that a
killed frontend is restarted while the others serve, and that SIGTERM stops every process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from dl_inference.examples import make_example_repository
from tests.integration.server import RunningServer, run_server

FRONTENDS = 3
X = np.arange(16, dtype=np.float32).reshape(1, 16)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    examples = tmp_path_factory.mktemp("examples")
    make_example_repository(examples)
    root = tmp_path_factory.mktemp("frontends_repo")
    for name in ("simple", "versioned"):
        shutil.copytree(examples / name, root / name)
    return root


@pytest.fixture(scope="module")
def srv(repo: Path) -> Iterator[RunningServer]:
    args = ("--frontends", str(FRONTENDS), "--model-control-mode", "explicit", "--load-model", "simple",
            "--load-model", "versioned")  # fmt: skip
    with run_server(repo, repo.parent / "frontends.log", *args) as server:
        wait_for(lambda: all(f["up"] for f in frontends(server)) and len(frontends(server)) == FRONTENDS, 30)
        yield server


def wait_for(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout} s")


def client(srv: RunningServer) -> grpcclient.InferenceServerClient:
    """A client on a connection of its own (gRPC would otherwise share one per process)."""
    return grpcclient.InferenceServerClient(srv.grpc_url, channel_args=[("grpc.use_local_subchannel_pool", 1)])


def infer(c: grpcclient.InferenceServerClient) -> None:
    i = grpcclient.InferInput("x", [1, 16], "FP32")
    i.set_data_from_numpy(X)
    assert c.infer("simple", [i]).as_numpy("y").shape == (1, 4)


def frontends(srv: RunningServer) -> list[dict]:
    with urllib.request.urlopen(f"http://{srv.http_url}/v2/endpoints", timeout=5) as r:
        return json.load(r)["frontends"]  # type: ignore[no-any-return]


def successes(c: grpcclient.InferenceServerClient, model: str = "simple") -> int:
    stats = c.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    return int(stats["success"].get("count", 0))  # JSON leaves a zero out


def test_connections_spread_and_every_frontend_answers_for_the_server(srv: RunningServer) -> None:
    before = successes(client(srv))
    clients = [client(srv) for _ in range(12)]
    for c in clients:
        for _ in range(5):
            infer(c)
    for _ in range(6):  # HTTP: a connection per client as well
        h = httpclient.InferenceServerClient(srv.http_url)
        i = httpclient.InferInput("x", [1, 16], "FP32")
        i.set_data_from_numpy(X)
        h.infer("simple", [i])
        h.close()
    sent = 66

    # Statistics, asked through many connections (so of several frontends): all the server's, all equal.
    counts = {successes(client(srv)) - before for _ in range(8)}
    assert counts == {sent}, counts
    rows = frontends(srv)
    assert len(rows) == FRONTENDS and all(r["up"] for r in rows), rows
    assert sum(1 for r in rows if r["requests"] > 0) >= 2, rows  # the kernel spread the connections
    assert len({r["pid"] for r in rows}) == FRONTENDS

    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    line = next(x for x in metrics.splitlines() if x.startswith('nv_inference_request_success{model="simple"'))
    assert int(line.split()[-1]) == before + sent
    assert metrics.count("dl_inference_frontend_up{") == FRONTENDS

    for c in clients[:6]:  # readiness and metadata are the same everywhere
        assert c.is_server_ready() and c.is_model_ready("simple") and c.is_model_ready("versioned", "2")
        meta = c.get_model_metadata("versioned", as_json=True)
        assert meta["versions"] == ["1", "2", "3"] and meta["inputs"][0]["name"] == "x"


def test_model_control_through_any_frontend_reaches_every_frontend(srv: RunningServer) -> None:
    # Read your writes: once load or unload has returned, every frontend already agrees (no waiting).
    clients = [client(srv) for _ in range(8)]
    clients[0].unload_model("versioned")
    assert not any(c.is_model_ready("versioned") for c in clients)
    for c in clients:
        index = {m["name"]: m for m in c.get_model_repository_index(as_json=True)["models"]}
        assert index["versioned"].get("state") == "UNAVAILABLE" and index["simple"]["state"] == "READY"
    four = grpcclient.InferInput("x", [1, 4], "FP32")
    four.set_data_from_numpy(X[:, :4])
    with pytest.raises(Exception, match="versioned"):
        clients[3].infer("versioned", [four])
    clients[5].load_model("versioned")
    assert all(c.is_model_ready("versioned", "3") for c in clients)
    for c in clients:  # the reloaded model's workers are reachable from every frontend
        assert c.infer("versioned", [four]).get_response().model_version == "3"


def test_shared_memory_registered_through_one_frontend_serves_through_every_one(srv: RunningServer) -> None:
    import uuid

    import tritonclient.utils.shared_memory as shm

    clients = [client(srv) for _ in range(8)]
    i = grpcclient.InferInput("x", [1, 16], "FP32")
    i.set_data_from_numpy(X)
    expected = clients[0].infer("simple", [i]).as_numpy("y")
    name, key = f"fe{uuid.uuid4().hex[:8]}", f"/dlinf_test_fe{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region(name, key, X.nbytes)
    shm.set_shared_memory_region(handle, [X])
    try:
        clients[0].register_system_shared_memory(name, key, X.nbytes)
        for c in clients:
            assert name in c.get_system_shared_memory_status().regions
            i = grpcclient.InferInput("x", [1, 16], "FP32")
            i.set_shared_memory(name, X.nbytes)
            np.testing.assert_array_equal(c.infer("simple", [i]).as_numpy("y"), expected)
        clients[1].unregister_system_shared_memory(name)
        assert not any(name in c.get_system_shared_memory_status().regions for c in clients)
    finally:
        shm.destroy_shared_memory_region(handle)


def test_a_killed_frontend_is_restarted_while_the_others_serve(srv: RunningServer) -> None:
    total = successes(client(srv))
    victim = next(r for r in frontends(srv) if r["frontend"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    # Once the process is gone its listening sockets have left the port, and new connections land on
    # the live frontends (connections the kernel had queued for the dead one are reset: clients retry).
    wait_for(lambda: not os.path.exists(f"/proc/{victim['pid']}") or _zombie(victim["pid"]), 10)
    resets = 0
    for _ in range(10):
        for attempt in range(3):  # as a client with a retry policy would
            try:
                infer(client(srv))
                break
            except InferenceServerException as exc:
                assert "UNAVAILABLE" in str(exc) and attempt < 2, exc
                resets += 1
    assert resets <= 2, resets
    wait_for(lambda: any(r["frontend"] == 1 and r["up"] and r["pid"] != victim["pid"] for r in frontends(srv)), 30)
    row = next(r for r in frontends(srv) if r["frontend"] == 1)
    assert row["starts"] == victim["starts"] + 1
    # Counters never go back: what the dead frontend had counted (as of the last collection) is kept.
    assert successes(client(srv)) == total + 10
    for _ in range(20):  # and the restarted one serves too
        infer(client(srv))
    assert successes(client(srv)) == total + 30


def test_a_restarted_worker_is_reached_from_every_frontend(srv: RunningServer) -> None:
    (old,) = srv.worker_pids("simple")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: len(srv.worker_pids("simple")) == 1 and srv.worker_pids("simple")[0] != old, 30)
    clients = [client(srv) for _ in range(12)]
    wait_for(lambda: all(c.is_model_ready("simple") for c in clients), 20)
    for c in clients:  # every frontend routes to the new worker (its socket and token came in the table)
        infer(c)


def test_sigterm_lets_every_frontend_finish_what_it_holds(tmp_path: Path) -> None:
    """Requests in flight on every frontend at SIGTERM are answered; then every process is gone."""
    import threading

    from tests.integration.models import slow_model

    repo = tmp_path / "repo"
    slow_model(repo / "slow", instances=2)
    x = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    records: list[tuple[float, str]] = []
    stop = threading.Event()
    # As a load balancer would: a second of draining (still served) after SIGTERM, so a request the client
    # sent just before it, still on its way, is not refused as "shutting down".
    config = tmp_path / "server.yaml"
    config.write_text("balancer:\n  drain_delay_s: 1.0\nstop_grace_s: 20\n")
    with run_server(repo, tmp_path / "server.log", "--frontends", "3", "--config", str(config)) as server:
        wait_for(lambda: all(f["up"] for f in frontends(server)) and len(frontends(server)) == 3, 30)

        def load() -> None:
            c = client(server)  # a connection per thread: the threads land on several frontends
            while not stop.is_set():
                start = time.monotonic()
                i = grpcclient.InferInput("x", [16, 512], "FP32")
                i.set_data_from_numpy(x)
                try:
                    c.infer("slow", [i], client_timeout=30)
                    records.append((start, "ok"))
                except InferenceServerException as exc:
                    records.append((start, str(exc)[:80]))

        threads = [threading.Thread(target=load) for _ in range(9)]
        for t in threads:
            t.start()
        wait_for(lambda: sum(1 for f in frontends(server) if f["requests"] > 0) >= 2, 10)
        pids = [f["pid"] for f in frontends(server)] + server.worker_pids()
        sent_term = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        stop.set()
        for t in threads:
            t.join(40)
    before = [outcome for start, outcome in records if start < sent_term]
    assert len(before) > 9 and set(before) == {"ok"}, sorted(set(before))
    for pid in pids:
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid), 10)


def test_sigterm_stops_every_process(repo: Path, tmp_path: Path) -> None:
    with run_server(repo, tmp_path / "server.log", "--frontends", "2") as server:
        wait_for(lambda: all(f["up"] for f in frontends(server)) and len(frontends(server)) == 2, 30)
        pids = [f["pid"] for f in frontends(server)] + server.worker_pids()
        infer(client(server))
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
    for pid in pids:
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid), 10)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True
