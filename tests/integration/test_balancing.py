"""The balancer with real processes: standalone worker nodes, a delay proxy, a gateway, tritonclient.

Nodes are real ``dl-inference worker --grpc-port`` processes on loopback ports; they are really
SIGSTOPped; the slow node is a real gRPC proxy that delays each request. Traffic shares are read
from the nodes' own statistics, not only from the gateway's bookkeeping.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from tests.integration.models import scale_model, slow_model
from tests.integration.server import Process, RunningServer, run_delay_proxy, run_node, run_server
from tests.integration.traffic import Traffic, wait_for

X = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nodes_repo")
    scale_model(root / "scale", 2.0)
    return root


@pytest.fixture(scope="module")
def nodes(repo: Path) -> Iterator[list[Process]]:
    with ExitStack() as stack:
        yield [stack.enter_context(run_node(repo, "scale", repo.parent / f"node{i}.log")) for i in range(3)]


def gateway(tmp: Path, config: dict[str, Any], repository: Path | None = None) -> Any:
    (tmp / "gw_config.yaml").write_text(yaml.safe_dump(config))
    empty = tmp / "empty_repo"
    empty.mkdir(exist_ok=True)
    return run_server(repository or empty, tmp / "gateway.log", "--config", str(tmp / "gw_config.yaml"))


def endpoint_table(srv: RunningServer) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{srv.http_url}/v2/endpoints", timeout=5) as r:
        data: dict[str, Any] = json.load(r)
    return data


def endpoints(srv: RunningServer) -> dict[str, dict[str, Any]]:
    return {e["endpoint"]: e for e in endpoint_table(srv)["endpoints"]}


def node_successes(node: Process) -> int:
    stats = grpcclient.InferenceServerClient(node.address).get_inference_statistics("scale", as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


FAST_CHECKS = {"health_interval_s": 0.2, "health_timeout_s": 0.5, "unhealthy_threshold": 2, "healthy_threshold": 2}


def test_weights_1_2_3_get_traffic_in_that_proportion(nodes: list[Process], tmp_path: Path) -> None:
    config = {
        "nodes": [{"address": n.address, "weight": w} for n, w in zip(nodes, (1, 2, 3))],
        "balancer": {"policy": "weighted_round_robin"},
    }
    before = [node_successes(n) for n in nodes]
    with gateway(tmp_path, config) as srv:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        assert client.is_model_ready("scale")
        assert client.get_model_metadata("scale").name == "scale"  # learned from the nodes
        with Traffic(srv.grpc_url, "scale", threads=4, x=X, limit=3000) as traffic:
            traffic.done.wait(120)
        assert set(traffic.outcomes) == {"ok"}, (traffic.outcomes, traffic.messages[:3])
        table = endpoints(srv)
    served = [node_successes(n) - b for n, b in zip(nodes, before)]
    total = sum(served)
    assert total == sum(table[n.address]["requests"] for n in nodes) >= 3000
    for count, weight in zip(served, (1, 2, 3)):
        expected = weight / 6
        assert abs(count / total - expected) <= 0.05 * expected, (served, total)


def test_a_stopped_node_is_ejected_and_requests_still_meet_their_deadline(nodes: list[Process], tmp_path: Path) -> None:
    config = {"nodes": [n.address for n in nodes], "balancer": {"policy": "least_request", **FAST_CHECKS}}
    victim = nodes[1]
    deadline_s = 3.0
    with gateway(tmp_path, config) as srv:
        with Traffic(srv.grpc_url, "scale", threads=6, x=X, client_timeout=deadline_s) as traffic:
            time.sleep(1.0)
            assert endpoints(srv)[victim.address]["requests"] > 0
            os.kill(victim.process.pid, signal.SIGSTOP)
            try:
                ejected_after = wait_for(lambda: endpoints(srv)[victim.address]["state"] != "healthy", 10)
                time.sleep(deadline_s + 1)  # stopped for longer than any request may take
                during = traffic.total()
            finally:
                os.kill(victim.process.pid, signal.SIGCONT)
            back_after = wait_for(lambda: endpoints(srv)[victim.address]["state"] == "healthy", 10)
            time.sleep(0.5)
        row = endpoints(srv)[victim.address]
    assert ejected_after < 2.0, f"stopped node taken out after {ejected_after:.2f} s"
    assert set(traffic.outcomes) == {"ok"}, (traffic.outcomes, traffic.messages[:3])
    assert traffic.longest < deadline_s, traffic.longest
    assert during > 100
    assert back_after < 5.0
    assert row["requests"] > 0 and f"node {victim.address} is unhealthy" in srv.log()
    assert "re-sending a request of model 'scale'" in srv.log()  # the stuck requests went elsewhere


def test_least_request_starves_a_slow_node(nodes: list[Process], repo: Path, tmp_path: Path) -> None:
    with run_delay_proxy(nodes[2].address, 40.0, tmp_path / "proxy.log") as slow:
        config = {"nodes": [nodes[0].address, nodes[1].address, slow.address], "balancer": {"policy": "least_request"}}
        with gateway(tmp_path, config) as srv:
            with Traffic(srv.grpc_url, "scale", threads=4, x=X, limit=1500) as traffic:
                traffic.done.wait(120)
            table = endpoints(srv)
    assert set(traffic.outcomes) == {"ok"}, traffic.outcomes
    counts = {a: table[a]["requests"] for a in (nodes[0].address, nodes[1].address, slow.address)}
    share = counts[slow.address] / sum(counts.values())
    assert share < 0.10, counts
    # The slow node's estimate fades between its probes (balancer/endpoint.py: EWMA_DECAY_S) and the fast
    # ones' grow with the machine's load, so the gap read at one instant varies: 22 vs 5 ms on a busy CI VM.
    slow_ms, fast_ms = table[slow.address]["latency_ewma_ms"], table[nodes[0].address]["latency_ewma_ms"]
    assert slow_ms > 10 and slow_ms > 3 * fast_ms, (slow_ms, fast_ms)


def test_client_deadline_is_passed_to_the_node(nodes: list[Process], tmp_path: Path) -> None:
    with run_delay_proxy(nodes[0].address, 2000.0, tmp_path / "proxy.log") as slow:
        with gateway(tmp_path, {"nodes": [slow.address]}) as srv:
            client = grpcclient.InferenceServerClient(srv.grpc_url)
            inp = grpcclient.InferInput("x", [1, 4], "FP32")
            inp.set_data_from_numpy(X)
            start = time.monotonic()
            with pytest.raises(Exception) as info:
                client.infer("scale", [inp], client_timeout=0.5)
            took = time.monotonic() - start
            assert "Deadline" in str(info.value) or "DEADLINE" in str(info.value)
            assert took < 1.5
            # Over HTTP the deadline is Triton's request "timeout" parameter (microseconds).
            body = json.dumps(
                {
                    "parameters": {"timeout": 300_000},
                    "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
                }
            ).encode()
            req = urllib.request.Request(f"http://{srv.http_url}/v2/models/scale/infer", data=body, method="POST")
            start = time.monotonic()
            with pytest.raises(urllib.error.HTTPError) as http_info:
                urllib.request.urlopen(req, timeout=10)
            assert http_info.value.code == 504 and time.monotonic() - start < 1.5
            assert "deadline" in json.load(http_info.value)["error"]
            assert endpoints(srv)[slow.address]["ejections"] == 0  # a short client deadline is not the node's fault


def test_node_file_and_dns_are_followed(nodes: list[Process], tmp_path: Path) -> None:
    node_file = tmp_path / "nodes.txt"
    node_file.write_text(f"# nodes\n{nodes[0].address} 2\n")
    config = {
        "node_file": str(node_file),
        "node_dns": [{"name": "localhost", "port": nodes[1].port}],
        "balancer": {"node_file_poll_s": 0.2, "dns_refresh_s": 0.5, **FAST_CHECKS},
    }
    with gateway(tmp_path, config) as srv:
        table = endpoints(srv)
        assert table[nodes[0].address]["weight"] == 2.0 and table[nodes[0].address]["state"] == "healthy"
        assert table[nodes[1].address]["state"] == "healthy"  # from DNS (localhost -> 127.0.0.1)
        node_file.write_text(f"{nodes[0].address} 2\n{nodes[2].address}\n")
        wait_for(lambda: endpoints(srv).get(nodes[2].address, {}).get("state") == "healthy", 5)
        node_file.write_text(f"{nodes[2].address}\n")
        wait_for(lambda: nodes[0].address not in endpoints(srv), 5)
        node_file.write_text("this is not a node list\n")  # a broken file keeps the last good list
        time.sleep(0.6)
        assert nodes[2].address in endpoints(srv)
        with Traffic(srv.grpc_url, "scale", threads=2, x=X, limit=200) as traffic:
            traffic.done.wait(60)
        assert set(traffic.outcomes) == {"ok"}
        assert "line 'this is not a node list' is not 'host:port [weight]' (keeping 1 node(s))" in srv.log()


def test_local_workers_and_a_gateway_node_share_a_model(repo: Path, tmp_path: Path) -> None:
    """Gateway A holds 'scale' itself and also balances onto gateway B, which holds it too."""
    with run_server(repo, tmp_path / "b.log") as b:
        config = {"nodes": [f"127.0.0.1:{b.grpc_port}"], "balancer": {"policy": "weighted_round_robin"}}
        with gateway(tmp_path, config, repository=repo) as a:
            with Traffic(a.grpc_url, "scale", threads=2, x=X, limit=400) as traffic:
                traffic.done.wait(60)
            table = endpoint_table(a)
    assert set(traffic.outcomes) == {"ok"}
    rows = {e["endpoint"]: e for e in table["endpoints"]}
    assert rows["local:scale:1#0"]["requests"] > 150 and rows[f"127.0.0.1:{b.grpc_port}"]["requests"] > 150
    assert table["models"]["scale:1"] == ["local:scale:1#0", f"127.0.0.1:{b.grpc_port}"]


def test_sigterm_under_load_finishes_in_flight_requests(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    slow_model(repo / "slow", instances=2)
    config = {"balancer": {"drain_delay_s": 1.0}, "stop_grace_s": 20}
    x = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    with gateway(tmp_path, config, repository=repo) as srv:
        with Traffic(srv.grpc_url, "slow", threads=6, x=x, client_timeout=30) as traffic:
            time.sleep(1.5)
            sent_term = time.monotonic()
            srv.process.send_signal(signal.SIGTERM)
            # Draining: readiness says no at once, while requests are still served.
            wait_for(lambda: _http_status(srv, "/v2/health/ready") == 400, 1.0)  # Triton answers 400
            time.sleep(0.5)
            assert _http_status(srv, "/v2/health/live") == 200
            srv.process.wait(30)
    assert srv.process.returncode == 0
    started_before = [r for r in traffic.records if r[0] < sent_term]
    assert len(started_before) > 6
    assert all(outcome == "ok" for _, _, outcome in started_before), traffic.outcomes
    # Requests that began while draining were served too; only those after the listeners closed failed.
    assert any(start > sent_term and outcome == "ok" for start, _, outcome in traffic.records)


def _http_status(srv: RunningServer, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{srv.http_url}{path}", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def test_a_hung_local_worker_is_noticed_by_ping_and_its_requests_go_elsewhere(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    slow_model(repo / "pair", instances=2)
    config = {"balancer": {"local_ping_interval_s": 0.2, "health_timeout_s": 0.3, "unhealthy_threshold": 2}}
    x = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    deadline_s = 4.0
    with gateway(tmp_path, config, repository=repo) as srv:
        victim = sorted(srv.worker_pids("pair"))[0]
        with Traffic(srv.grpc_url, "pair", threads=4, x=x, client_timeout=deadline_s) as traffic:
            time.sleep(1.0)
            os.kill(victim, signal.SIGSTOP)
            try:
                noticed = wait_for(lambda: any(e["state"] == "unhealthy" for e in endpoints(srv).values()), 5)
                time.sleep(deadline_s + 0.5)
            finally:
                os.kill(victim, signal.SIGCONT)
            back = wait_for(lambda: all(e["state"] == "healthy" for e in endpoints(srv).values()), 5)
            time.sleep(0.5)
    assert noticed < 1.5, noticed
    assert back < 3.0, back
    assert set(traffic.outcomes) == {"ok"}, (traffic.outcomes, traffic.messages[:3])
    assert traffic.longest < deadline_s
    assert "not answering" in srv.log() and "re-sending a request of model 'pair'" in srv.log()


def test_killing_a_remote_node_under_load_loses_nothing(nodes: list[Process], repo: Path, tmp_path: Path) -> None:
    with run_node(repo, "scale", tmp_path / "victim.log") as victim:
        # Every request frozen on the victim is retried at once when it dies: let the retry budget
        # cover all six clients (the default allows 3 concurrent retries at this request rate).
        config = {
            "nodes": [nodes[0].address, nodes[1].address, victim.address],
            "balancer": {**FAST_CHECKS, "min_retry_concurrency": 8},
        }
        with gateway(tmp_path, config) as srv:
            with Traffic(srv.grpc_url, "scale", threads=6, x=X, client_timeout=5.0) as traffic:
                time.sleep(1.0)
                assert endpoints(srv)[victim.address]["requests"] > 0
                # Freeze it first so that requests are certainly in flight there when it dies (a
                # fast node killed at a random moment may hold none, and then no retry is needed).
                os.kill(victim.process.pid, signal.SIGSTOP)
                wait_for(lambda: endpoints(srv)[victim.address]["inflight"] > 0, 5)
                victim.process.kill()
                victim.process.wait()
                gone = wait_for(lambda: endpoints(srv)[victim.address]["state"] != "healthy", 5)
                time.sleep(1.0)
            table = endpoint_table(srv)
    assert set(traffic.outcomes) == {"ok"}, (traffic.outcomes, traffic.messages[:3])
    assert gone < 2.0
    row = next(e for e in table["endpoints"] if e["endpoint"] == victim.address)
    assert row["failures"] >= 1 and row["retries"] == row["failures"]  # every failure there was retried elsewhere
    assert table["counters"]["retries"] >= 1


def test_model_ready_health_check_follows_each_model(nodes: list[Process], tmp_path: Path) -> None:
    config = {
        "nodes": [{"address": nodes[0].address, "models": ["scale", "ghost"]}],
        "balancer": {"health_check": "model_ready", **FAST_CHECKS},
    }
    with gateway(tmp_path, config) as srv:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        assert client.is_model_ready("scale") and not client.is_model_ready("ghost")
        assert endpoint_table(srv)["models"] == {"scale:*": [nodes[0].address]}
        inp = grpcclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(X)
        assert client.infer("scale", [inp]).as_numpy("y").tolist() == [[0.0, 2.0, 4.0, 6.0]]
        with pytest.raises(Exception, match="unknown model 'ghost'"):
            client.infer("ghost", [inp])
