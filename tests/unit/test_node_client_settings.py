"""How the gateway calls its nodes: ``node_client`` / per-node ``client`` parsing and validation, the
worker's security flags, and a RemoteNode against a real in-process gRPC server (token on every call,
refusals turning the node unhealthy with the node's answer as the reason)."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from dl_inference.balancer.clock import Clock
from dl_inference.balancer.credentials import NodeClientSettings, NodeCredentials, parse_credentials
from dl_inference.balancer.discovery import DnsNodes, parse_node_file
from dl_inference.balancer.endpoint import EndpointFailed
from dl_inference.balancer.remote import RemoteNode, failure_reason
from dl_inference.balancer.settings import BalancerSettings, DnsSpec, NodeSpec
from dl_inference.config import load_settings
from dl_inference.errors import InvalidArgument
from dl_inference.protocol.generated import grpc_service_pb2 as pb

TOKEN = "node-token-0123456789abcdef"


def _message(fn: Callable[[], object]) -> str:
    with pytest.raises(InvalidArgument) as info:
        fn()
    return info.value.message


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem, a client.pem/client.key it signed, and other.key (a key of another certificate)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=ca")
    openssl("req", "-x509", *ec, "-keyout", "client.key", "-out", "client.pem", "-subj", "/CN=client")
    openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-subj", "/CN=other")
    openssl("ec", "-in", "client.key", "-out", "encrypted.key", "-aes256", "-passout", "pass:secret")
    return d


@pytest.fixture()
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "node-token"
    path.write_text(f"# the gateway's token for its nodes\n{TOKEN}\n")
    return path


# -- parsing and validation ---------------------------------------------------------------------


def test_empty_settings_mean_plain_grpc_without_token() -> None:
    for data in (None, {}):
        creds = parse_credentials(data, "node_client")
        assert creds == NodeCredentials() and not creds.tls and creds.metadata is None
        assert creds.describe() == "plain gRPC"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("token", "node_client must be a mapping of token_file, tls_ca"),
        ({"token": TOKEN}, "node_client: unknown setting(s) token; known: token_file"),
        ({"tls_ca": 5}, "node_client.tls_ca must be a string, got 5"),
        ({"tls": "yes"}, "node_client.tls must be true or false, got 'yes'"),
        ({"tls": False, "tls_ca": "ca.pem"}, "node_client: tls is false but tls_ca"),
        ({"tls_cert": "c.pem"}, "node_client: tls_cert and tls_key go together"),
        ({"tls_key": "c.key"}, "node_client: tls_cert and tls_key go together"),
    ],
)
def test_bad_settings_are_named(data: Any, message: str) -> None:
    assert _message(lambda: NodeClientSettings.parse(data, "node_client")).startswith(message)


def test_token_file_gives_bearer_metadata_that_is_never_shown(token_file: Path) -> None:
    creds = parse_credentials({"token_file": str(token_file)}, "node_client")
    assert creds.token == TOKEN and not creds.tls
    assert creds.metadata == (("authorization", f"Bearer {TOKEN}"),)
    assert creds.describe() == "plain gRPC, bearer token"
    assert TOKEN not in repr(creds) and TOKEN not in repr(NodeSpec("a:1", client=creds))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{TOKEN}\n{TOKEN}x\n", "must hold exactly one token, found 2"),
        ("# nothing\n", "must hold exactly one token, found 0"),
        ("short\n", "tokens must have at least 16 characters"),
    ],
)
def test_token_file_contents_are_checked(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "t").write_text(text)
    assert message in _message(lambda: parse_credentials({"token_file": str(tmp_path / "t")}, "node_client"))


def test_missing_files_are_named(tmp_path: Path, pki: Path) -> None:
    missing = str(tmp_path / "missing")
    msg = _message(lambda: parse_credentials({"token_file": missing}, "node_client"))
    assert msg.startswith("node_client.token_file: cannot read token file") and missing in msg
    msg = _message(lambda: parse_credentials({"tls_ca": missing}, "node_client"))
    assert msg == f"node_client.tls_ca: cannot read {missing}: No such file or directory"
    both = {"tls_ca": str(pki / "ca.pem"), "tls_cert": str(pki / "client.pem"), "tls_key": missing}
    assert _message(lambda: parse_credentials(both, "n")).startswith(f"n.tls_key: cannot read {missing}")


def test_tls_files_are_loaded_and_checked(pki: Path, token_file: Path) -> None:
    data = {
        "tls_ca": str(pki / "ca.pem"), "tls_cert": str(pki / "client.pem"), "tls_key": str(pki / "client.key"),
        "tls_server_name": "node.internal", "token_file": str(token_file),
    }  # fmt: skip
    creds = parse_credentials(data, "node_client")
    assert creds.tls and creds.server_name == "node.internal" and creds.token == TOKEN
    assert creds.root_certificates == (pki / "ca.pem").read_bytes()
    assert creds.certificate_chain == (pki / "client.pem").read_bytes()
    assert creds.private_key == (pki / "client.key").read_bytes()
    assert creds.describe() == "TLS with a client certificate (server name node.internal), bearer token"
    assert "BEGIN" not in repr(creds)
    # TLS without a CA of our own: gRPC's default roots.
    assert parse_credentials({"tls": True}, "n") == NodeCredentials(tls=True)
    # Not PEM, or a key that is not the certificate's: refused at start-up, naming the files.
    assert "holds no usable PEM certificate" in _message(lambda: parse_credentials({"tls_ca": str(token_file)}, "n"))
    mismatch = {"tls_cert": str(pki / "client.pem"), "tls_key": str(pki / "other.key")}
    msg = _message(lambda: parse_credentials(mismatch, "n"))
    assert msg.startswith(f"n: tls_cert {pki / 'client.pem'} and tls_key {pki / 'other.key'} are not")
    encrypted = {"tls_cert": str(pki / "client.pem"), "tls_key": str(pki / "encrypted.key")}  # no prompt, an error
    assert _message(lambda: parse_credentials(encrypted, "n")).endswith("is encrypted; gRPC needs a plain key")


def test_node_entries_and_dns_entries_take_their_own_client(token_file: Path, tmp_path: Path) -> None:
    own = {"token_file": str(token_file)}
    spec = NodeSpec.parse({"address": "a:1", "client": own}, "nodes")
    assert spec.client is not None and spec.client.token == TOKEN
    assert NodeSpec.parse({"address": "a:1"}, "nodes").client is None  # the server's node_client
    assert NodeSpec.parse({"address": "a:1", "client": None}, "nodes").client is None
    assert NodeSpec.parse({"address": "a:1", "client": {}}, "nodes").client == NodeCredentials()  # plain
    assert NodeSpec.parse("a:1@2", "nodes").client is None
    msg = _message(lambda: NodeSpec.parse({"address": "a:1", "client": {"token_file": "/nope"}}, "nodes"))
    assert msg.startswith("nodes: node a:1 client.token_file: cannot read token file /nope")
    dns = DnsSpec.parse({"name": "workers", "port": 8001, "client": own})
    assert dns.client == spec.client

    async def resolver(host: str, port: int) -> list[str]:
        return ["10.0.0.1:8001", "10.0.0.2:8001"]

    nodes = DnsNodes(dns, resolver)
    assert asyncio.run(nodes.refresh())
    assert [n.client for n in nodes.nodes] == [spec.client, spec.client]
    parsed = parse_node_file(f"- {{address: 'b:2', client: {{token_file: '{token_file}'}}}}\n- c:3\n", "f")
    assert parsed[0].client == spec.client and parsed[1].client is None


def test_server_settings_yaml_and_balancer_settings(tmp_path: Path, token_file: Path) -> None:
    (tmp_path / "server.yaml").write_text(f"node_client: {{token_file: {token_file}}}\nnodes: ['a:1']\n")
    settings = load_settings(str(tmp_path / "server.yaml"), {"model_repository": str(tmp_path)})
    assert settings.balancer_settings().node_client.token == TOKEN
    assert settings.topology().nodes[0].client is None  # uses the server's node_client
    # A bad file stops start-up with the setting and the file named.
    (tmp_path / "bad.yaml").write_text(f"node_client: {{token_file: {tmp_path / 'gone'}}}\n")
    msg = _message(lambda: load_settings(str(tmp_path / "bad.yaml"), {"model_repository": str(tmp_path)}))
    assert msg.startswith("node_client.token_file: cannot read token file") and "gone" in msg
    (tmp_path / "wrong.yaml").write_text("balancer: {node_client: {}}\n")
    msg = _message(lambda: load_settings(str(tmp_path / "wrong.yaml"), {"model_repository": str(tmp_path)}))
    assert msg == "balancer: unknown setting(s) node_client"  # a top-level setting, not a balancer one


def test_serve_flags_reach_the_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dl_inference.cli import main

    rc = main(["serve", "--model-repository", str(tmp_path), "--node-token-file", str(tmp_path / "none")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "node_client.token_file: cannot read token file" in err and str(tmp_path / "none") in err
    rc = main(["serve", "--model-repository", str(tmp_path), "--node-tls-cert", str(tmp_path / "c.pem")])
    assert rc == 2 and "tls_cert and tls_key go together" in capsys.readouterr().err


def test_worker_security_flags(tmp_path: Path, token_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dl_inference.worker.main import add_arguments, grpc_security, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model-repository", str(tmp_path), "--model", "m", "--grpc-port", "0"]
    access, tls = grpc_security(parser.parse_args(base))
    assert not access.enabled and not tls.enabled
    access, tls = grpc_security(parser.parse_args([*base, "--auth-token-file", str(token_file)]))
    assert access.inference == (TOKEN.encode(),) and not tls.enabled
    # Bad files: exit 2 with the reason before any model is loaded.
    assert main(parser.parse_args([*base, "--auth-token-file", str(tmp_path / "gone")])) == 2
    assert "cannot read token file" in capsys.readouterr().err
    assert main(parser.parse_args([*base, "--tls-cert", str(token_file)])) == 2
    assert "tls needs both cert and key" in capsys.readouterr().err


def test_failure_reasons_name_refusals_and_tls_failures() -> None:
    def err(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)

    plain, tls = NodeCredentials(), NodeCredentials(tls=True)
    assert failure_reason(err(grpc.StatusCode.UNAUTHENTICATED, "invalid token"), plain) == (
        "refused our credentials (UNAUTHENTICATED: invalid token)"
    )
    verify = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
        "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
        "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK"
    )
    reason = failure_reason(err(grpc.StatusCode.UNAVAILABLE, verify), tls)
    assert reason.startswith("TLS handshake failed: (TSI_PROTOCOL_FAILURE)") and "tls_ca" in reason
    assert "unable to get local issuer certificate (is" in reason
    closed = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
    assert "set tls_ca" in failure_reason(err(grpc.StatusCode.UNAVAILABLE, closed), plain)
    assert "set tls_cert and tls_key" in failure_reason(err(grpc.StatusCode.UNAVAILABLE, closed), tls)
    assert failure_reason(err(grpc.StatusCode.UNAVAILABLE, "Connection refused"), plain) == "Connection refused"


# -- a RemoteNode against a real gRPC server ----------------------------------------------------


class FakeNode(grpc.GenericRpcHandler):
    """A V2 node whose health probes are open and whose other methods want ``token`` (like ours).

    ``index_denied``: the repository index answers PERMISSION_DENIED (an inference-only token)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.index_denied = False
        self.calls: list[tuple[str, str | None]] = []

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        auth = dict(details.invocation_metadata or ()).get("authorization")
        self.calls.append((method, auth if isinstance(auth, str) else None))
        name = method.rsplit("/", 1)[-1]
        answers: dict[str, Callable[[bytes], bytes]] = {
            "Check": lambda _: health_pb2.HealthCheckResponse(status=1).SerializeToString(),
            "ServerMetadata": lambda _: pb.ServerMetadataResponse(name="fake").SerializeToString(),
            "RepositoryIndex": lambda _: pb.RepositoryIndexResponse(
                models=[pb.RepositoryIndexResponse.ModelIndex(name="m", version="1", state="READY")]
            ).SerializeToString(),
            "ModelConfig": lambda _: pb.ModelConfigResponse().SerializeToString(),
            "ModelMetadata": lambda _: pb.ModelMetadataResponse(name="m").SerializeToString(),
            "ModelInfer": lambda body: b"echo:" + body,
        }
        answer = answers.get(name)
        if answer is None:
            return None
        open_method = name == "Check"

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if not open_method and auth != f"Bearer {self.token}":
                why = "invalid token" if auth else "authentication required"
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            if name == "RepositoryIndex" and self.index_denied:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "this token may not use the model-control API")
            return answer(request)

        return grpc.unary_unary_rpc_method_handler(handle)


def _with_node(
    credentials: NodeCredentials, test: Callable[[RemoteNode, FakeNode], Awaitable[None]], **settings: Any
) -> None:
    async def main() -> None:
        fake = FakeNode(TOKEN)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((fake,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        s = BalancerSettings(health_timeout_s=2.0, node_client=credentials, **settings)
        node = RemoteNode(NodeSpec(f"127.0.0.1:{port}"), s, Clock(), lambda: None)
        try:
            await test(node, fake)
        finally:
            await node.close()
            await server.stop(None)

    asyncio.run(main())


def test_the_token_goes_with_every_call_to_the_node() -> None:
    async def test(node: RemoteNode, fake: FakeNode) -> None:
        await node.first_check()
        assert node.healthy and node.models == {("m", "1")} and "m" in node.configs
        reply = await node.infer(b"request", 5.0)
        assert not reply.failed and reply.result() == b"echo:request"
        methods = {m.rsplit("/", 1)[-1] for m, _ in fake.calls}
        assert methods == {"Check", "ServerMetadata", "RepositoryIndex", "ModelConfig", "ModelMetadata", "ModelInfer"}
        assert {auth for _, auth in fake.calls} == {f"Bearer {TOKEN}"}
        assert node.describe(0.0, 0.0)["client"] == "plain gRPC, bearer token"

    _with_node(NodeCredentials(token=TOKEN), test)


def test_a_node_refusing_our_token_is_unhealthy_at_once_with_its_answer() -> None:
    async def test(node: RemoteNode, fake: FakeNode) -> None:
        await node.first_check()  # its open health probe passes; the ServerMetadata call is refused
        assert not node.healthy and not node.models and node.models_unknown
        assert node.last_error == (
            "failed its health check: refused our credentials (UNAUTHENTICATED: authentication required)"
        )
        node.healthy = True  # as if the node had started refusing later: one refused request is enough
        with pytest.raises(EndpointFailed) as info:
            await node.infer(b"request", 5.0)
        assert str(info.value) == (
            f"node {node.name} refused our credentials (UNAUTHENTICATED: authentication required)"
        )
        assert info.value.resend and not node.healthy

    _with_node(NodeCredentials(), test)


def test_a_node_hiding_its_index_stays_unhealthy_until_it_shows_it() -> None:
    async def test(node: RemoteNode, fake: FakeNode) -> None:
        fake.index_denied = True
        await node.first_check()
        assert not node.healthy and node.models_unknown
        assert "would not show its repository index: refused our credentials (PERMISSION_DENIED" in node.last_error
        for _ in range(3):  # no flapping: the probe passes, but the index is what is checked now
            await node.check_once()
            assert not node.healthy
        fake.index_denied = False
        for _ in range(2):  # healthy_threshold passes bring it back; the next refresh learns its models
            await node.check_once()
        assert node.healthy and node.last_error == ""
        await node.refresh_models()
        assert node.models == {("m", "1")} and not node.models_unknown

    _with_node(NodeCredentials(token=TOKEN), test, healthy_threshold=2)


def test_a_changed_client_of_a_node_entry_reconnects_with_it() -> None:
    async def test(node: RemoteNode, fake: FakeNode) -> None:
        await node.first_check()
        assert not node.healthy  # no token yet
        old = node.channel
        node.spec = NodeSpec(node.name, client=NodeCredentials(token=TOKEN))  # e.g. the node file changed
        assert node.channel is not old and node.credentials.token == TOKEN
        current = node.channel
        node.spec = NodeSpec(node.name, weight=2.0, client=NodeCredentials(token=TOKEN))  # same client: same channel
        assert node.channel is current
        for _ in range(2):
            await node.check_once()
        assert node.healthy

    _with_node(NodeCredentials(), test, healthy_threshold=2)
