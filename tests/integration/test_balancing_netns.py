"""A remote node in its own network namespace, cut off from the gateway by dropping every packet.

The node listens on a veth address inside a namespace this test creates; taking the node's end of
the veth down makes it a black hole for the gateway (no RST, no ICMP: packets vanish, as when a
cable is pulled or a machine dies). Needs root and ``ip``; skipped where namespaces cannot be made,
and the SIGSTOP test in test_balancing.py covers the same path on loopback. (iptables and tc netem
are not installed on the development machines; a link down is the cut-off available everywhere.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from load_tests.faults import netns_available, network_namespace, run_cmd
from tests.integration.models import scale_model
from tests.integration.server import Process, run_node
from tests.integration.test_balancing import FAST_CHECKS, endpoints, gateway
from tests.integration.traffic import Traffic, wait_for

X = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture
def namespace() -> Iterator[tuple[str, str, str]]:
    """(namespace, node-side veth, node address inside the namespace)."""
    why = netns_available()
    if why is not None:
        pytest.skip(f"cannot create a network namespace here: {why}")
    with network_namespace(prefix="dli", net=201) as created:
        yield created


def test_a_node_cut_off_by_the_network_is_ejected_and_nothing_fails(
    namespace: tuple[str, str, str], tmp_path: Path
) -> None:
    ns, node_if, node_ip = namespace
    repo = tmp_path / "repo"
    scale_model(repo / "scale", 2.0)
    deadline_s = 3.0
    with ExitStack() as stack:
        local: list[Process] = [stack.enter_context(run_node(repo, "scale", tmp_path / f"n{i}.log")) for i in range(2)]
        remote = stack.enter_context(
            run_node(repo, "scale", tmp_path / "ns.log", host=node_ip, prefix=("ip", "netns", "exec", ns))
        )
        config = {
            "nodes": [n.address for n in (*local, remote)],
            "balancer": {"policy": "least_request", **FAST_CHECKS},
        }
        srv = stack.enter_context(gateway(tmp_path, config))
        with Traffic(srv.grpc_url, "scale", threads=6, x=X, client_timeout=deadline_s) as traffic:
            time.sleep(1.0)
            assert endpoints(srv)[remote.address]["requests"] > 0
            run_cmd("ip", "netns", "exec", ns, "ip", "link", "set", node_if, "down")
            try:
                cut_off = wait_for(lambda: endpoints(srv)[remote.address]["state"] != "healthy", 10)
                time.sleep(deadline_s + 1)
            finally:
                run_cmd("ip", "netns", "exec", ns, "ip", "link", "set", node_if, "up")
            back = wait_for(lambda: endpoints(srv)[remote.address]["state"] == "healthy", 15)
            time.sleep(0.5)
        assert cut_off < 2.0, f"cut-off node taken out after {cut_off:.2f} s"
        assert back < 15
        assert set(traffic.outcomes) == {"ok"}, (traffic.outcomes, traffic.messages[:3])
        assert traffic.longest < deadline_s
