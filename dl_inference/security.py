"""Who may call what: bearer tokens / API keys, the model-control switch, TLS contexts.

Settings (``auth`` in the server YAML, or the ``--auth-token-file`` style flags):

``tokens`` / ``tokens_file``
    Inference tokens. When any is configured, every endpoint except the health probes needs one:
    HTTP ``Authorization: Bearer <token>`` (or ``X-API-Key: <token>``), gRPC metadata
    ``authorization: Bearer <token>`` (or ``x-api-key``). A file holds one token per line (``#``
    comments and blank lines ignored), so tokens need not sit in a config file or a process list.
``admin_tokens`` / ``admin_tokens_file``
    Tokens for the model-control API (repository index, load, unload). When set, only these open
    it: an inference token gets 403 / PERMISSION_DENIED there. When not set, the inference tokens
    (if any) open it too.

Always open, so that orchestrators can probe without secrets: ``/v2/health/live``,
``/v2/health/ready``, ``/v2/models/{m}[/versions/{v}]/ready``, gRPC ``ServerLive``, ``ServerReady``,
``ModelReady`` and ``grpc.health.v1.Health``. The metrics port is separate and not covered: bind it
to a private address (or 0 to disable).

Tokens are compared in constant time (``hmac.compare_digest``) against every configured token.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dl_inference.errors import Code, InvalidArgument, ServerError

__all__ = [
    "CONTROL_GRPC_METHODS",
    "OPEN_GRPC_METHODS",
    "AccessPolicy",
    "RateLimiter",
    "Role",
    "TlsSettings",
    "http_role",
]


class Role:
    OPEN = "open"  # health probes
    INFERENCE = "inference"
    CONTROL = "control"  # repository index / load / unload


_SERVICE = "/inference.GRPCInferenceService/"
OPEN_GRPC_METHODS = frozenset(
    {
        _SERVICE + "ServerLive",
        _SERVICE + "ServerReady",
        _SERVICE + "ModelReady",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    }
)
# The repository index is not among them: clients list models with it, so it is served wherever
# inference is, to inference tokens (as Triton serves it in every model-control mode).
CONTROL_GRPC_METHODS = frozenset({_SERVICE + "RepositoryModelLoad", _SERVICE + "RepositoryModelUnload"})


def grpc_role(method: str) -> str:
    if method in OPEN_GRPC_METHODS:
        return Role.OPEN
    if method in CONTROL_GRPC_METHODS:
        return Role.CONTROL
    return Role.INFERENCE


def http_role(path: str) -> str:
    """The role an HTTP path needs (paths as the V2 HTTP API spells them)."""
    if path in ("/v2/health/live", "/v2/health/ready"):
        return Role.OPEN
    if path.startswith("/v2/repository/") and path != "/v2/repository/index":
        return Role.CONTROL
    if path.startswith("/v2/models/") and path.endswith("/ready"):
        return Role.OPEN
    return Role.INFERENCE


class PermissionDenied(ServerError):
    code = Code.PERMISSION_DENIED


class Unauthenticated(ServerError):
    code = Code.UNAUTHENTICATED


def read_tokens(values: Iterable[Any], files: Iterable[str], what: str) -> tuple[bytes, ...]:
    """Tokens from inline values and token files (one per line); InvalidArgument naming the problem."""
    tokens: list[str] = []
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise InvalidArgument(f"{what}: every token must be a non-empty string")
        tokens.append(value.strip())
    for name in files:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidArgument(f"{what}: cannot read token file {name}: {exc.strerror or exc}") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    for token in tokens:
        if len(token) < 16:
            raise InvalidArgument(f"{what}: tokens must have at least 16 characters (one has {len(token)})")
        if any(c.isspace() for c in token):
            raise InvalidArgument(f"{what}: tokens cannot contain whitespace")
    return tuple(t.encode() for t in tokens)


def _listify(value: Any, key: str) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise InvalidArgument(f"auth.{key} must be a string or a list of strings")


@dataclass(frozen=True)
class AccessPolicy:
    """Which tokens open which role. Empty ``inference`` and ``admin``: everything open."""

    inference: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def from_mapping(cls, auth: Mapping[str, Any] | None) -> AccessPolicy:
        auth = dict(auth or {})
        known = {"tokens", "tokens_file", "admin_tokens", "admin_tokens_file"}
        unknown = sorted(set(auth) - known)
        if unknown:
            raise InvalidArgument(f"unknown auth setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        inference = read_tokens(
            _listify(auth.get("tokens"), "tokens"), _listify(auth.get("tokens_file"), "tokens_file"), "auth.tokens"
        )
        admin = read_tokens(
            _listify(auth.get("admin_tokens"), "admin_tokens"),
            _listify(auth.get("admin_tokens_file"), "admin_tokens_file"),
            "auth.admin_tokens",
        )
        return cls(inference, admin)

    @property
    def enabled(self) -> bool:
        return bool(self.inference or self.admin)

    @staticmethod
    def _matches(token: bytes, allowed: Sequence[bytes]) -> bool:
        found = False
        for candidate in allowed:  # every candidate compared: the time does not say which matched
            found |= hmac.compare_digest(token, candidate)
        return found

    def check(self, role: str, token: str | None) -> None:
        """Raise Unauthenticated (401) or PermissionDenied (403) unless ``token`` opens ``role``."""
        if role == Role.OPEN or not self.enabled:
            return
        if role == Role.CONTROL:
            allowed = self.admin or self.inference
        elif self.inference:
            allowed = self.inference + self.admin  # an admin may infer too
        else:  # only admin tokens configured: inference stays open
            return
        if not token:
            raise Unauthenticated("authentication required: send 'Authorization: Bearer <token>'")
        raw = token.encode()
        if self._matches(raw, allowed):
            return
        if role == Role.CONTROL and self._matches(raw, self.inference):
            raise PermissionDenied("this token may not use the model-control API (it needs an admin token)")
        raise Unauthenticated("invalid token")


def token_from_headers(authorization: str | None, api_key: str | None) -> str | None:
    """The token of ``Authorization: Bearer <t>`` or ``X-API-Key: <t>``; None when neither is given."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return ""  # present but not a bearer token: fails as invalid rather than missing
    if api_key:
        return api_key.strip()
    return None


@dataclass(frozen=True)
class TlsSettings:
    """Server certificate and key (PEM); with ``ca``, clients must present a certificate it signed."""

    cert: str = ""
    key: str = ""
    ca: str = ""

    @classmethod
    def from_mapping(cls, tls: Mapping[str, Any] | None) -> TlsSettings:
        tls = dict(tls or {})
        known = {"cert", "key", "ca"}
        unknown = sorted(set(tls) - known)
        if unknown:
            raise InvalidArgument(f"unknown tls setting(s): {', '.join(unknown)}; known: cert, key, ca")
        settings = cls(str(tls.get("cert") or ""), str(tls.get("key") or ""), str(tls.get("ca") or ""))
        settings.validate()
        return settings

    @property
    def enabled(self) -> bool:
        return bool(self.cert)

    def validate(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise InvalidArgument("tls needs both cert and key")
        if self.ca and not self.cert:
            raise InvalidArgument("tls.ca (client certificates) needs tls.cert and tls.key too")
        for what, path in (("cert", self.cert), ("key", self.key), ("ca", self.ca)):
            if path and not Path(path).is_file():
                raise InvalidArgument(f"tls.{what}: {path} is not a readable file")

    def _read(self, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"cannot read {path}: {exc.strerror or exc}") from None

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS: TLS 1.2+, and client certificates required when ``ca`` is set."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.ca:
                ctx.load_verify_locations(self.ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (ssl.SSLError, OSError) as exc:
            raise InvalidArgument(f"tls: cannot load the certificate/key/CA: {exc}") from None
        return ctx

    def grpc_credentials(self) -> Any:
        import grpc

        return grpc.ssl_server_credentials(
            [(self._read(self.key), self._read(self.cert))],
            root_certificates=self._read(self.ca) if self.ca else None,
            require_client_auth=bool(self.ca),
        )


class RateLimiter:
    """Per-client token buckets for inference requests: ``requests_per_s`` sustained, ``burst`` at once.

    A client is its token when it sends one, else its address. Over the limit: ResourceExhausted
    (429 / RESOURCE_EXHAUSTED) at once, before any work is done. Idle full buckets are forgotten.
    """

    def __init__(self, requests_per_s: float, burst: int, clock: Any = None) -> None:
        import time

        self.rate = requests_per_s
        self.burst = burst
        self._clock = clock or time.monotonic
        self._buckets: dict[str, tuple[float, float]] = {}

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None) -> RateLimiter | None:
        settings = dict(settings or {})
        if not settings:
            return None
        unknown = sorted(set(settings) - {"requests_per_s", "burst"})
        if unknown:
            raise InvalidArgument(f"unknown rate_limit setting(s): {', '.join(unknown)}; known: requests_per_s, burst")
        rate = settings.get("requests_per_s")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0:
            raise InvalidArgument(f"rate_limit.requests_per_s must be a positive number, got {rate!r}")
        burst = settings.get("burst", max(1, int(rate)))
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise InvalidArgument(f"rate_limit.burst must be a positive integer, got {burst!r}")
        return cls(float(rate), burst)

    def check(self, client: str) -> None:
        now = self._clock()
        tokens, last = self._buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            from dl_inference.errors import ResourceExhausted

            raise ResourceExhausted(
                f"rate limit: this client is over {self.rate:g} requests/s (burst {self.burst}); retry later"
            )
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > 10_000:
            self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        full_after = self.burst / self.rate
        for key, (_, last) in list(self._buckets.items()):
            if now - last >= full_after:
                del self._buckets[key]


def client_key(token: str | None, peer: str | None) -> str:
    """Rate-limit key: the token when given, else the peer's address without its port."""
    if token:
        return "token:" + token
    peer = peer or "?"
    if peer.startswith(("ipv4:", "ipv6:")):  # gRPC peers: "ipv4:1.2.3.4:5678", "ipv6:[::1]:5678"
        peer = peer.split(":", 1)[1].rsplit(":", 1)[0]
    return "addr:" + peer
