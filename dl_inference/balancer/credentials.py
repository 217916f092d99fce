"""How the gateway proves itself to its remote nodes: TLS (optionally with a client certificate) and
a bearer token.

``node_client`` in the server YAML (or ``--node-token-file``, ``--node-tls-ca``, ``--node-tls-cert``,
``--node-tls-key``, ``--node-tls-server-name``) applies to every node: listed ones, node files and
DNS-discovered ones. A node entry's own ``client`` mapping replaces it for that node (``client: {}``:
plain gRPC without a token). Files are read once, when the setting is parsed, so a missing or bad
file is an error at start-up, not a failed handshake later. The token is sent as
``authorization: Bearer <token>`` metadata on every call to the node and is never logged or shown.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dl_inference.errors import InvalidArgument
from dl_inference.security import read_tokens

_FILES = ("token_file", "tls_ca", "tls_cert", "tls_key")
KEYS = (*_FILES, "tls", "tls_server_name")


@dataclass(frozen=True)
class NodeCredentials:
    """What a node's channel is opened with, read from files. Compare/hash by content; shows no secret."""

    tls: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)  # None: gRPC's default roots
    private_key: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    server_name: str = ""  # the name the node's certificate is checked against, if not its address
    token: str = field(default="", repr=False)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata carrying the token (None without one)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def describe(self) -> str:
        """For logs and the endpoint table: how the node is called, without any secret."""
        if not self.tls:
            how = "plain gRPC"
        else:
            how = "TLS" + (" with a client certificate" if self.certificate_chain else "")
            if self.server_name:
                how += f" (server name {self.server_name})"
        return how + (", bearer token" if self.token else "")


@dataclass(frozen=True)
class NodeClientSettings:
    """File paths and switches of ``node_client`` (or a node's ``client``), validated by :meth:`parse`."""

    token_file: str = ""
    tls: bool = False  # TLS with gRPC's default roots; implied by tls_ca or tls_cert
    tls_ca: str = ""  # PEM CA(s) the node's certificate must chain to
    tls_cert: str = ""  # PEM client certificate chain, for nodes that require one (mutual TLS)
    tls_key: str = ""
    tls_server_name: str = ""  # check the node's certificate for this name instead of its address

    @classmethod
    def parse(cls, data: Any, where: str) -> NodeClientSettings:
        """From a mapping; InvalidArgument naming ``where`` and the key on anything wrong."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"{where} must be a mapping of {', '.join(KEYS)}")
        unknown = sorted(map(str, set(data) - set(KEYS)))
        if unknown:
            raise InvalidArgument(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
        values: dict[str, Any] = {}
        for key in (*_FILES, "tls_server_name"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidArgument(f"{where}.{key} must be a string, got {value!r}")
            values[key] = (value or "").strip()
        tls = data.get("tls")
        if tls is not None and not isinstance(tls, bool):
            raise InvalidArgument(f"{where}.tls must be true or false, got {tls!r}")
        explicit_off = tls is False
        out = cls(tls=bool(tls), **values)
        if explicit_off and (out.tls_ca or out.tls_cert or out.tls_server_name):
            raise InvalidArgument(f"{where}: tls is false but tls_ca/tls_cert/tls_server_name are set")
        if bool(out.tls_cert) != bool(out.tls_key):
            raise InvalidArgument(f"{where}: tls_cert and tls_key go together (a client certificate and its key)")
        return out

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.tls_ca or self.tls_cert or self.tls_server_name)

    def load(self, where: str) -> NodeCredentials:
        """Read and check the files: one token, PEM that Python's ssl accepts, a key matching its cert."""
        token = ""
        if self.token_file:
            tokens = read_tokens([], [self.token_file], f"{where}.token_file")
            if len(tokens) != 1:
                raise InvalidArgument(
                    f"{where}.token_file {self.token_file} must hold exactly one token, found {len(tokens)}"
                )
            token = tokens[0].decode()
        if not self.uses_tls:
            return NodeCredentials(token=token)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        root = _read(self.tls_ca, f"{where}.tls_ca") if self.tls_ca else None
        if root is not None:
            try:
                ctx.load_verify_locations(cadata=root.decode("ascii", errors="replace"))
            except (ssl.SSLError, ValueError) as exc:
                raise InvalidArgument(f"{where}.tls_ca {self.tls_ca} holds no usable PEM certificate: {exc}") from None
        key = chain = None
        if self.tls_cert:
            chain = _read(self.tls_cert, f"{where}.tls_cert")
            key = _read(self.tls_key, f"{where}.tls_key")
            try:
                ctx.load_cert_chain(self.tls_cert, self.tls_key, password=_no_passphrase)
            except _EncryptedKey:
                raise InvalidArgument(f"{where}.tls_key {self.tls_key} is encrypted; gRPC needs a plain key") from None
            except (ssl.SSLError, OSError) as exc:
                raise InvalidArgument(
                    f"{where}: tls_cert {self.tls_cert} and tls_key {self.tls_key} are not a PEM certificate "
                    f"and its private key: {exc}"
                ) from None
        return NodeCredentials(True, root, key, chain, self.tls_server_name, token)


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _EncryptedKey  # instead of OpenSSL asking for a passphrase on the terminal


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def parse_credentials(data: Any, where: str) -> NodeCredentials:
    """A ``client`` / ``node_client`` mapping straight to loaded credentials."""
    return NodeClientSettings.parse(data, where).load(where)
