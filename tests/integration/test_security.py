"""Tokens, the model-control switch and TLS/mTLS on the real server, with stock tritonclient and urllib."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.integration.server import RunningServer, free_port, run_server

INFER = "inference-token-0123456789"
ADMIN = "admin-token-0123456789abcd"


def _repo(example_repo: Path, root: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    shutil.copytree(example_repo / "simple", repo / "simple")
    return repo


def _simple_input(module: object) -> object:
    x = module.InferInput("x", [1, 16], "FP32")  # type: ignore[attr-defined]
    x.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
    return x


def _http(url: str, method: str = "GET", token: str | None = None, ctx: ssl.SSLContext | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            assert exc.headers["WWW-Authenticate"] == 'Bearer realm="dl_inference"'
            assert "error" in json.loads(exc.read())
        return exc.code


@pytest.fixture(scope="module")
def token_server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("tokens")
    (root / "tokens").write_text(f"# clients\n{INFER}\n")
    control_port = free_port()
    (root / "server.yaml").write_text(
        f"auth: {{tokens_file: {root / 'tokens'}, admin_tokens: [{ADMIN}]}}\n"
        f"control_port: {control_port}\nmodel_control_mode: explicit\nload_models: [simple]\n"
    )
    with run_server(_repo(example_repo, root), root / "server.log", "--config", str(root / "server.yaml")) as srv:
        srv.control_port = control_port  # type: ignore[attr-defined]
        yield srv


def test_grpc_needs_a_token(token_server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(token_server.grpc_url)
    assert client.is_server_ready() and client.is_model_ready("simple")  # probes stay open
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", [_simple_input(grpcclient)])
    assert err.value.status() == "StatusCode.UNAUTHENTICATED"
    assert "authentication required" in err.value.message()
    with pytest.raises(InferenceServerException, match="invalid token"):
        client.get_model_metadata("simple", headers={"authorization": "Bearer not-the-right-token-123"})
    out = client.infer("simple", [_simple_input(grpcclient)], headers={"authorization": f"Bearer {INFER}"})
    assert out.as_numpy("y").shape == (1, 4)
    out = client.infer("simple", [_simple_input(grpcclient)], headers={"x-api-key": ADMIN})
    assert out.as_numpy("y").shape == (1, 4)


def test_http_needs_a_token(token_server: RunningServer) -> None:
    base = f"http://{token_server.http_url}"
    assert _http(f"{base}/v2/health/ready") == 200
    assert _http(f"{base}/v2/models/simple/ready") == 200
    assert _http(f"{base}/v2/models/simple") == 401
    assert _http(f"{base}/v2/models/simple", token="wrong-token-0123456789") == 401
    assert _http(f"{base}/v2/models/simple", token=INFER) == 200
    client = httpclient.InferenceServerClient(token_server.http_url)
    with pytest.raises(InferenceServerException, match="authentication required"):
        client.infer("simple", [_simple_input(httpclient)])
    out = client.infer("simple", [_simple_input(httpclient)], headers={"Authorization": f"Bearer {INFER}"})
    assert out.as_numpy("y").shape == (1, 4)


def test_shared_memory_registration_needs_the_inference_token(token_server: RunningServer) -> None:
    key = f"dlinf_sec_{os.getpid()}"
    Path("/dev/shm", key).write_bytes(bytes(64))
    try:
        client = grpcclient.InferenceServerClient(token_server.grpc_url)
        with pytest.raises(InferenceServerException, match="authentication required"):
            client.register_system_shared_memory("r", "/" + key, 64)
        with pytest.raises(InferenceServerException, match="authentication required"):
            client.get_system_shared_memory_status()
        base = f"http://{token_server.http_url}"
        assert _http(f"{base}/v2/systemsharedmemory/status") == 401
        assert _http(f"{base}/v2/cudasharedmemory/unregister", "POST") == 401
        auth = {"authorization": f"Bearer {INFER}"}
        client.register_system_shared_memory("r", "/" + key, 64, headers=auth)
        assert "r" in client.get_system_shared_memory_status(headers=auth).regions
        assert _http(f"{base}/v2/systemsharedmemory/status", token=INFER) == 200
        client.unregister_system_shared_memory("r", headers=auth)
    finally:
        Path("/dev/shm", key).unlink()


def test_model_control_only_on_its_port_and_only_for_admins(token_server: RunningServer) -> None:
    base = f"http://{token_server.http_url}"
    control = f"http://127.0.0.1:{token_server.control_port}"  # type: ignore[attr-defined]
    # Not on the main ports, whatever the token.
    assert _http(f"{base}/v2/repository/models/simple/unload", "POST", ADMIN) == 403
    with pytest.raises(InferenceServerException) as err:
        grpcclient.InferenceServerClient(token_server.grpc_url).unload_model(
            "simple", headers={"authorization": f"Bearer {ADMIN}"}
        )
    assert err.value.status() == "StatusCode.PERMISSION_DENIED"
    # On the control port: admins only.
    assert _http(f"{control}/v2/repository/index", "POST") == 401
    assert _http(f"{control}/v2/repository/models/simple/load", "POST", INFER) == 403
    assert _http(f"{control}/v2/repository/index", "POST", ADMIN) == 200
    # The index lists models for clients: served wherever inference is, to inference tokens.
    assert _http(f"{base}/v2/repository/index", "POST") == 401
    assert _http(f"{base}/v2/repository/index", "POST", INFER) == 200
    index = grpcclient.InferenceServerClient(token_server.grpc_url).get_model_repository_index(
        headers={"authorization": f"Bearer {INFER}"}
    )
    assert [m.name for m in index.models] == ["simple"]
    assert _http(f"{control}/v2/models/simple", token=ADMIN) == 404  # inference is not served there
    assert _http(f"{control}/v2/repository/models/simple/unload", "POST", ADMIN) == 200
    assert _http(f"{base}/v2/models/simple/ready") == 400
    assert _http(f"{control}/v2/repository/models/simple/load", "POST", ADMIN) == 200
    assert _http(f"{base}/v2/models/simple/ready") == 200


def test_control_api_disabled(example_repo: Path, tmp_path: Path) -> None:
    (tmp_path / "server.yaml").write_text("control_api: disabled\n")
    with run_server(_repo(example_repo, tmp_path), tmp_path / "log", "--config", str(tmp_path / "server.yaml")) as srv:
        assert _http(f"http://{srv.http_url}/v2/repository/models/simple/unload", "POST") == 403
        assert _http(f"http://{srv.http_url}/v2/repository/index", "POST") == 200  # listing models stays
        assert _http(f"http://{srv.http_url}/v2/models/simple") == 200  # no tokens configured: open
        with pytest.raises(InferenceServerException, match="not served on this port"):
            grpcclient.InferenceServerClient(srv.grpc_url).unload_model("simple")
        assert grpcclient.InferenceServerClient(srv.grpc_url).get_model_repository_index().models


# --- TLS ---------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(d: Path) -> None:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d,
        )  # fmt: skip


@pytest.fixture(scope="module")
def tls_server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _make_pki(d)
    (d / "server.yaml").write_text(f"tls: {{cert: {d / 'server.pem'}, key: {d / 'server.key'}, ca: {d / 'ca.pem'}}}\n")
    with run_server(_repo(example_repo, d), d / "server.log", "--config", str(d / "server.yaml"), wait=False) as srv:
        ctx = _client_context(d, with_cert=True)
        deadline = time.monotonic() + 60
        while _try(f"https://localhost:{srv.http_port}/v2/health/ready", ctx) != 200:
            assert srv.process.poll() is None, srv.log()
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.3)
        yield srv, d


def _client_context(d: Path, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    if with_cert:
        ctx.load_cert_chain(str(d / "client.pem"), str(d / "client.key"))
    return ctx


def _try(url: str, ctx: ssl.SSLContext) -> int | None:
    try:
        return _http(url, ctx=ctx)
    except (urllib.error.URLError, ConnectionError, ssl.SSLError):
        return None


def test_https_with_client_certificates(tls_server: tuple[RunningServer, Path]) -> None:
    srv, d = tls_server
    url = f"https://localhost:{srv.http_port}/v2/models/simple"
    assert _http(url, ctx=_client_context(d, with_cert=True)) == 200
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):  # no client certificate
        _http(url, ctx=_client_context(d, with_cert=False))
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to the TLS port
        urllib.request.urlopen(f"http://localhost:{srv.http_port}/v2/health/live", timeout=5).read()


def test_grpc_mutual_tls_with_tritonclient(tls_server: tuple[RunningServer, Path]) -> None:
    srv, d = tls_server
    client = grpcclient.InferenceServerClient(
        f"localhost:{srv.grpc_port}",
        ssl=True,
        root_certificates=str(d / "ca.pem"),
        private_key=str(d / "client.key"),
        certificate_chain=str(d / "client.pem"),
    )
    assert client.infer("simple", [_simple_input(grpcclient)]).as_numpy("y").shape == (1, 4)
    no_cert = grpcclient.InferenceServerClient(
        f"localhost:{srv.grpc_port}", ssl=True, root_certificates=str(d / "ca.pem")
    )
    with pytest.raises(InferenceServerException) as err:
        no_cert.is_server_live(client_timeout=5)
    assert "UNAVAILABLE" in err.value.status()
    plain = grpcclient.InferenceServerClient(f"localhost:{srv.grpc_port}")
    with pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=5)


# --- limits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("limits")
    (root / "server.yaml").write_text(
        "rate_limit: {requests_per_s: 5, burst: 3}\nmax_tensor_elements: 20\nmax_request_bytes: 1048576\n"
    )
    with run_server(_repo(example_repo, root), root / "server.log", "--config", str(root / "server.yaml")) as srv:
        yield srv


def test_per_client_rate_limit(limited_server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(limited_server.grpc_url)
    outcomes = []
    for _ in range(8):
        start = time.monotonic()
        try:
            client.infer("simple", [_simple_input(grpcclient)])
            outcomes.append(("ok", time.monotonic() - start))
        except InferenceServerException as exc:
            assert exc.status() == "StatusCode.RESOURCE_EXHAUSTED", exc
            assert "rate limit: this client is over 5 requests/s (burst 3)" in exc.message()
            outcomes.append(("limited", time.monotonic() - start))
    assert [o for o, _ in outcomes].count("ok") >= 3 and "limited" in [o for o, _ in outcomes]
    assert max(t for o, t in outcomes if o == "limited") < 0.05  # refused at once
    time.sleep(0.5)  # the bucket refills
    client.infer("simple", [_simple_input(grpcclient)])
    # HTTP clients are limited by address too (the gRPC bucket above is the same address: 127.0.0.1).
    statuses = [_http_post_infer(limited_server) for _ in range(8)]
    assert 429 in statuses and 200 in statuses


def _http_post_infer(srv: RunningServer, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    if body is None:
        body = json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]}
        ).encode()
    req = urllib.request.Request(
        f"http://{srv.http_url}/v2/models/simple/infer", data=body, method="POST", headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def test_tensor_element_limit_and_compressed_body(limited_server: RunningServer) -> None:
    import gzip

    time.sleep(1.0)  # let the rate limiter refill after the test above
    x = grpcclient.InferInput("x", [2, 16], "FP32")
    x.set_data_from_numpy(np.ones((2, 16), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="32 elements exceed this server's limit of 20 per tensor"):
        grpcclient.InferenceServerClient(limited_server.grpc_url).infer("simple", [x])
    # 1 MiB limit: a small gzip body that expands to 64 MiB is refused (aiohttp counts the expanded bytes).
    bomb = gzip.compress(b'{"inputs": [' + b" " * (64 * 1024 * 1024) + b"]}", 9)
    assert len(bomb) < 1024 * 1024
    assert _http_post_infer(limited_server, bomb, {"Content-Encoding": "gzip"}) == 413


def test_command_line_flags(example_repo: Path, tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(INFER + "\n")
    flags = ("--auth-token-file", str(tmp_path / "tokens"), "--control-api", "disabled", "--log-level", "debug")
    with run_server(_repo(example_repo, tmp_path), tmp_path / "log", *flags) as srv:
        assert " DEBUG [worker " in srv.log()  # serve --log-level reaches the workers
        base = f"http://{srv.http_url}"
        assert _http(f"{base}/v2/models/simple") == 401
        assert _http(f"{base}/v2/models/simple", token=INFER) == 200
        assert _http(f"{base}/v2/repository/models/simple/load", "POST", INFER) == 403
        assert _http(f"{base}/v2/repository/index", "POST", INFER) == 200
