"""Token policy, token files and TLS settings (the logic; tests/integration/test_security.py runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dl_inference.config import ServerSettings
from dl_inference.errors import Code, InvalidArgument, ServerError
from dl_inference.security import AccessPolicy, Role, TlsSettings, grpc_role, http_role, token_from_headers

INFER = "inference-token-0123456789"
ADMIN = "admin-token-0123456789abcd"


def _code(policy: AccessPolicy, role: str, token: str | None) -> Code | None:
    try:
        policy.check(role, token)
    except ServerError as exc:
        return exc.code
    return None


def test_roles_of_paths_and_methods() -> None:
    svc = "/inference.GRPCInferenceService/"
    assert http_role("/v2/health/live") == http_role("/v2/health/ready") == Role.OPEN
    assert http_role("/v2/models/m/ready") == http_role("/v2/models/m/versions/2/ready") == Role.OPEN
    assert http_role("/v2/repository/models/m/load") == http_role("/v2/repository/models/m/unload") == Role.CONTROL
    assert http_role("/v2/repository/index") == grpc_role(svc + "RepositoryIndex") == Role.INFERENCE  # listing models
    assert http_role("/v2/models/m/infer") == http_role("/v2") == http_role("/v2/models/m/config") == Role.INFERENCE
    assert http_role("/v2/models/ready/infer") == Role.INFERENCE  # a model named "ready" is not a probe
    svc = "/inference.GRPCInferenceService/"
    assert grpc_role(svc + "ServerReady") == grpc_role("/grpc.health.v1.Health/Check") == Role.OPEN
    assert grpc_role(svc + "RepositoryModelLoad") == Role.CONTROL
    assert grpc_role(svc + "ModelInfer") == grpc_role(svc + "ModelStreamInfer") == Role.INFERENCE


def test_open_when_nothing_is_configured() -> None:
    policy = AccessPolicy.from_mapping({})
    assert not policy.enabled
    assert _code(policy, Role.INFERENCE, None) is None and _code(policy, Role.CONTROL, "x") is None


def test_inference_and_admin_tokens() -> None:
    policy = AccessPolicy.from_mapping({"tokens": [INFER], "admin_tokens": ADMIN})
    assert _code(policy, Role.OPEN, None) is None
    assert _code(policy, Role.INFERENCE, None) is Code.UNAUTHENTICATED
    assert _code(policy, Role.INFERENCE, "wrong-token-0123456789") is Code.UNAUTHENTICATED
    assert _code(policy, Role.INFERENCE, INFER) is None
    assert _code(policy, Role.INFERENCE, ADMIN) is None  # an admin may infer too
    assert _code(policy, Role.CONTROL, INFER) is Code.PERMISSION_DENIED
    assert _code(policy, Role.CONTROL, ADMIN) is None
    assert _code(policy, Role.CONTROL, None) is Code.UNAUTHENTICATED


def test_without_admin_tokens_inference_tokens_open_control() -> None:
    policy = AccessPolicy.from_mapping({"tokens": [INFER]})
    assert _code(policy, Role.CONTROL, INFER) is None
    assert _code(policy, Role.CONTROL, None) is Code.UNAUTHENTICATED


def test_only_admin_tokens_leave_inference_open() -> None:
    policy = AccessPolicy.from_mapping({"admin_tokens": [ADMIN]})
    assert _code(policy, Role.INFERENCE, None) is None
    assert _code(policy, Role.CONTROL, None) is Code.UNAUTHENTICATED
    assert _code(policy, Role.CONTROL, ADMIN) is None


def test_token_files(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# service A\n{INFER}\n\n  {ADMIN}  \n")
    policy = AccessPolicy.from_mapping({"tokens_file": str(f)})
    assert policy.inference == (INFER.encode(), ADMIN.encode())
    with pytest.raises(InvalidArgument, match="cannot read token file"):
        AccessPolicy.from_mapping({"tokens_file": str(tmp_path / "missing")})
    with pytest.raises(InvalidArgument, match="at least 16 characters"):
        AccessPolicy.from_mapping({"tokens": ["short"]})
    with pytest.raises(InvalidArgument, match="unknown auth setting"):
        AccessPolicy.from_mapping({"token": INFER})


def test_token_from_headers() -> None:
    assert token_from_headers(f"Bearer {INFER}", None) == INFER
    assert token_from_headers(f"bearer   {INFER} ", None) == INFER
    assert token_from_headers(None, INFER) == INFER
    assert token_from_headers(None, None) is None
    assert token_from_headers(f"Basic {INFER}", None) == ""  # present but unusable: invalid, not missing


def test_tls_settings_validation(tmp_path: Path) -> None:
    assert not TlsSettings.from_mapping({}).enabled
    with pytest.raises(InvalidArgument, match="both cert and key"):
        TlsSettings.from_mapping({"cert": "x.pem"})
    with pytest.raises(InvalidArgument, match="is not a readable file"):
        TlsSettings.from_mapping({"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")})
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(InvalidArgument, match="cannot load the certificate"):
        TlsSettings.from_mapping({"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")}).ssl_context()


def test_server_settings_validate_security(tmp_path: Path) -> None:
    base = {"model_repository": str(tmp_path)}
    ServerSettings(**base, control_api="disabled").validate()  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="control_api must be one of"):
        ServerSettings(**base, control_api="off").validate()  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="at least 16 characters"):
        ServerSettings(**base, auth={"tokens": ["abc"]}).validate()  # type: ignore[arg-type]
    assert ServerSettings(**base, control_port=9000).control_placement() == "elsewhere"  # type: ignore[arg-type]


def test_rate_limiter_token_bucket() -> None:
    from dl_inference.security import RateLimiter, client_key

    now = [0.0]
    limiter = RateLimiter(requests_per_s=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("a")  # the burst
    with pytest.raises(ServerError, match=r"over 2 requests/s \(burst 3\)") as err:
        limiter.check("a")
    assert err.value.code is Code.RESOURCE_EXHAUSTED and err.value.http_status == 429
    limiter.check("b")  # another client has its own bucket
    now[0] = 0.5  # one token back
    limiter.check("a")
    with pytest.raises(ServerError):
        limiter.check("a")
    assert RateLimiter.from_mapping({}) is None
    assert RateLimiter.from_mapping({"requests_per_s": 10}).burst == 10  # type: ignore[union-attr]
    with pytest.raises(InvalidArgument, match="requests_per_s must be a positive number"):
        RateLimiter.from_mapping({"requests_per_s": 0})
    assert client_key(None, "ipv4:10.1.2.3:5555") == client_key(None, "ipv4:10.1.2.3:6666") == "addr:10.1.2.3"
    assert client_key(None, "ipv6:[::1]:5555") == "addr:[::1]"
    assert client_key(INFER, "ipv4:10.1.2.3:5555") == "token:" + INFER
