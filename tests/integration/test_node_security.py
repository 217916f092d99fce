"""Gateway → node security with real processes: a standalone ``dl-inference worker`` node that requires
a token and client certificates (mutual TLS), gateways calling it with the right credentials, without
a token and with the wrong CA, and stock tritonclient in front."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from tests.integration.models import scale_model
from tests.integration.server import Process, RunningServer, free_port, run_server, stop_process
from tests.integration.test_security import _make_pki, _openssl

TOKEN = "node-token-0123456789abcdef"
X = np.arange(4, dtype=np.float32).reshape(1, 4)
FAST_CHECKS = {"health_interval_s": 0.2, "health_timeout_s": 1.0}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem signs the node's server.pem and the gateway's client.pem; other-ca.pem signs nothing."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("node_pki")
    _make_pki(d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "other-ca.key", "-out", "other-ca.pem", "-days", "2",
             "-subj", "/CN=other-ca", cwd=d)  # fmt: skip
    (d / "node-tokens").write_text(f"# tokens the node accepts\n{TOKEN}\n")
    (d / "gateway-token").write_text(f"{TOKEN}\n")
    return d


def _tls_client(pki: Path, address: str, client_cert: bool = True) -> grpcclient.InferenceServerClient:
    key, chain = (str(pki / "client.key"), str(pki / "client.pem")) if client_cert else (None, None)
    return grpcclient.InferenceServerClient(
        address, ssl=True, root_certificates=str(pki / "ca.pem"), private_key=key, certificate_chain=chain
    )


@pytest.fixture(scope="module")
def node(pki: Path) -> Iterator[Process]:
    """``dl-inference worker --grpc-port`` with a token file, a server certificate and a client CA."""
    scale_model(pki / "repo" / "scale", 2.0)
    port = free_port()
    cmd = [
        sys.executable, "-m", "dl_inference", "worker", "--model-repository", str(pki / "repo"), "--model", "scale",
        "--host", "127.0.0.1", "--grpc-port", str(port), "--auth-token-file", str(pki / "node-tokens"),
        "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"), "--tls-ca", str(pki / "ca.pem"),
    ]  # fmt: skip
    log_path = pki / "node.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            client, deadline = _tls_client(pki, f"localhost:{port}"), time.monotonic() + 60
            while True:
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                try:
                    if client.is_server_ready(client_timeout=1):  # open: a probe needs no token
                        break
                except InferenceServerException:
                    pass
                time.sleep(0.1)
            yield Process(proc, port, log_path)
        finally:
            stop_process(proc, 15)


def _input(module: Any) -> Any:
    inp = module.InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    return inp


def _endpoints(srv: RunningServer) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(f"http://{srv.http_url}/v2/endpoints", timeout=5) as r:
        return {e["endpoint"]: e for e in json.load(r)["endpoints"]}


def _checked_row(srv: RunningServer, address: str) -> dict[str, Any]:
    """The node's endpoint-table row once its first health check is done (listeners open before it)."""
    deadline = time.monotonic() + 20
    while True:
        row = _endpoints(srv).get(address)
        if row is not None and (row["state"] == "healthy" or "last_error" in row):
            return row
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.1)


def _gateway(tmp: Path, config: dict[str, Any], *flags: str) -> Any:
    """A gateway with an empty repository (every model is on the node); not waiting for readiness."""
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    (tmp / "empty").mkdir(exist_ok=True)
    return run_server(tmp / "empty", tmp / "gateway.log", "--config", str(tmp / "gateway.yaml"), *flags, wait=False)


def _wait_live(srv: RunningServer) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert srv.process.poll() is None, srv.log()
        assert time.monotonic() < deadline, srv.log()
        try:
            with urllib.request.urlopen(f"http://{srv.http_url}/v2/health/live", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)


def _failed_infer(srv: RunningServer, model: str) -> tuple[InferenceServerException, float]:
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [_input(grpcclient)], client_timeout=10)
    return err.value, time.monotonic() - start


def test_the_node_wants_a_token_and_a_client_certificate(node: Process, pki: Path) -> None:
    client = _tls_client(pki, f"localhost:{node.port}")
    with pytest.raises(InferenceServerException) as err:
        client.infer("scale", [_input(grpcclient)])
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"
    out = client.infer("scale", [_input(grpcclient)], headers={"authorization": f"Bearer {TOKEN}"})
    assert out.as_numpy("y").tolist() == [[0.0, 2.0, 4.0, 6.0]]
    with pytest.raises(InferenceServerException) as err:  # TLS, but no client certificate
        _tls_client(pki, f"localhost:{node.port}", client_cert=False).is_server_live(client_timeout=5)
    assert "UNAVAILABLE" in err.value.status()
    with pytest.raises(InferenceServerException):  # plain gRPC
        grpcclient.InferenceServerClient(node.address).is_server_live(client_timeout=5)


def test_gateway_with_the_node_credentials_infers_through_it(node: Process, pki: Path, tmp_path: Path) -> None:
    flags = (
        "--node", node.address, "--node-token-file", str(pki / "gateway-token"), "--node-tls-ca", str(pki / "ca.pem"),
        "--node-tls-cert", str(pki / "client.pem"), "--node-tls-key", str(pki / "client.key"),
    )  # fmt: skip
    with _gateway(tmp_path, {}, *flags) as srv:
        _wait_live(srv)
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        deadline = time.monotonic() + 20
        while not client.is_model_ready("scale"):  # the model list comes from the node's index, with our token
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        assert client.get_model_metadata("scale").name == "scale"
        assert client.infer("scale", [_input(grpcclient)]).as_numpy("y").tolist() == [[0.0, 2.0, 4.0, 6.0]]
        http = httpclient.InferenceServerClient(srv.http_url)
        assert http.infer("scale", [_input(httpclient)]).as_numpy("y").tolist() == [[0.0, 2.0, 4.0, 6.0]]
        row = _endpoints(srv)[node.address]
        assert row["state"] == "healthy" and row["models"] == ["scale:1"] and "last_error" not in row
        assert row["client"] == "TLS with a client certificate, bearer token"
        assert TOKEN not in srv.log()


def _assert_node_unhealthy(
    srv: RunningServer, address: str, *, in_row: tuple[str, ...], in_error: str, in_log: str
) -> None:
    """The node is unhealthy in the endpoint table with the reason, a client gets UNAVAILABLE naming the
    node at once, and the gateway's log says why."""
    row = _checked_row(srv, address)
    assert row["state"] == "unhealthy"
    assert all(text in row["last_error"] for text in in_row), row["last_error"]
    error, seconds = _failed_infer(srv, "scale")
    assert error.status() == "StatusCode.UNAVAILABLE" and seconds < 2.0
    assert address in error.message() and in_error in error.message()
    assert f"node {address} is unhealthy: {in_log}" in srv.log()


def test_gateway_without_a_token_sees_the_node_refuse_it(node: Process, pki: Path, tmp_path: Path) -> None:
    config = {
        "nodes": [node.address],  # models learned from its index, which the node will not show
        "node_client": {"tls_ca": str(pki / "ca.pem"), "tls_cert": str(pki / "client.pem"),
                        "tls_key": str(pki / "client.key")},
        "balancer": FAST_CHECKS,
    }  # fmt: skip
    with _gateway(tmp_path, config) as srv:
        _wait_live(srv)
        _assert_node_unhealthy(
            srv,
            node.address,
            in_row=("refused our credentials (UNAUTHENTICATED: authentication required",),
            in_error="UNAUTHENTICATED",
            in_log="refused our credentials (UNAUTHENTICATED",
        )
        assert not grpcclient.InferenceServerClient(srv.grpc_url).is_server_ready()
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}
        url = f"http://{srv.http_url}/v2/models/scale/infer"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(req, timeout=10)
        assert http_err.value.code == 503 and "UNAUTHENTICATED" in http_err.value.read().decode()


def test_gateway_with_the_wrong_ca_fails_the_tls_handshake(node: Process, pki: Path, tmp_path: Path) -> None:
    config = {
        "nodes": [{
            "address": node.address, "models": ["scale"],
            "client": {  # this node's own client settings replace node_client
                "token_file": str(pki / "gateway-token"), "tls_ca": str(pki / "other-ca.pem"),
                "tls_cert": str(pki / "client.pem"), "tls_key": str(pki / "client.key"),
            },
        }],
        "node_client": {"tls_ca": str(pki / "ca.pem")},
        "balancer": FAST_CHECKS,
    }  # fmt: skip
    with _gateway(tmp_path, config) as srv:
        _wait_live(srv)
        _assert_node_unhealthy(
            srv,
            node.address,
            in_row=("TLS handshake failed", "CERTIFICATE_VERIFY_FAILED"),
            in_error="TLS handshake failed",
            in_log="TLS handshake failed",
        )
