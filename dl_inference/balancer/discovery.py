"""Where remote nodes come from: the server config, a node file re-read on change, DNS names.

A node file is YAML — a list of nodes, or a mapping with a ``nodes`` list — where each node is
``host:port[@weight]`` or ``{address, weight, models, client}``; plain text with one ``host:port [weight]``
per line (``#`` comments) works too, as dl_inference's node lists did. A file that cannot be read or
parsed (a node's ``client`` files included) leaves the previous list in place (and says why in the log).

A DNS name is resolved every ``dns_refresh_s``; each A/AAAA record becomes a node with the entry's
port, weight, models and client credentials. A failed lookup keeps the previous records.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from dl_inference.balancer.settings import DnsSpec, NodeSpec
from dl_inference.errors import InvalidArgument

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]


_IPV6_NODE = re.compile(r"^\[[0-9A-Fa-f:.%\w]*\]:")


def _looks_like_yaml(line: str) -> bool:
    if line.startswith("["):
        return not _IPV6_NODE.match(line)  # "[::1]:8001" is a plain node line, "[a, b]" is YAML
    return line == "-" or line.startswith(("- ", "-\t", "{", "nodes:"))


def parse_node_file(text: str, source: str) -> list[NodeSpec]:
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if lines and not any(_looks_like_yaml(ln) for ln in lines):  # plain "host:port [weight]" lines
        nodes = []
        for ln in lines:
            parts = ln.split()
            if len(parts) > 2:
                raise InvalidArgument(f"{source}: line '{ln}' is not 'host:port [weight]'")
            nodes.append(NodeSpec.parse(parts[0] + (f"@{parts[1]}" if len(parts) > 1 else ""), source))
        return nodes
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{source}: not YAML: {exc}") from None
    if data is None:
        return []
    if isinstance(data, dict):
        data = data.get("nodes") or []
    if not isinstance(data, list):
        raise InvalidArgument(f"{source}: expected a list of nodes (YAML) or 'host:port [weight]' lines")
    return [NodeSpec.parse(item, source) for item in data]


class NodeFile:
    """A node list file, re-read when its modification time or size changes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.nodes: list[NodeSpec] = []
        self._stamp: tuple[int, int] | None = None
        self.error = ""

    def poll(self) -> bool:
        """Re-read if changed; return True when the node list changed."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self.error != str(exc):
                log.error("node file %s: %s (keeping %d node(s))", self.path, exc, len(self.nodes))
            self.error = str(exc)
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            nodes = parse_node_file(self.path.read_text(), f"node file {self.path}")
        except (OSError, UnicodeDecodeError, InvalidArgument) as exc:
            self.error = getattr(exc, "message", str(exc))
            log.error("%s (keeping %d node(s))", self.error, len(self.nodes))
            return False
        self.error = ""
        if nodes == self.nodes:
            return False
        self.nodes = nodes
        log.info("node file %s: %d node(s)", self.path, len(nodes))
        return True


AddrInfo = list[tuple[Any, ...]]


def _deliver(future: asyncio.Future[AddrInfo], result: AddrInfo | None, error: BaseException | None) -> None:
    if future.done():  # cancelled: the caller stopped waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result or [])


def _lookup_in_daemon_thread(
    host: str, port: int, lookup: Callable[..., AddrInfo] = socket.getaddrinfo
) -> asyncio.Future[AddrInfo]:
    """Run a blocking ``getaddrinfo`` on a daemon thread of its own.

    The loop's own ``getaddrinfo`` runs on its executor (asyncio's default executor, or libuv's pool
    under uvloop), and the loop waits for that work when it shuts down: a lookup stuck on an
    unanswered DNS server (a container network whose name was just removed) held the gateway's exit
    for the resolver's whole timeout, past `docker compose down`'s grace. A daemon thread is not
    waited for: cancelling the returned future lets shutdown go on at once, and a late answer is
    dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[AddrInfo] = loop.create_future()

    def work() -> None:
        result: AddrInfo | None = None
        error: BaseException | None = None
        try:
            result = lookup(host, port, type=socket.SOCK_STREAM)
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(_deliver, future, result, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=work, name=f"dns-{host}", daemon=True).start()
    return future


async def resolve(host: str, port: int) -> list[str]:
    """host:port strings for every A/AAAA record of ``host``."""
    infos = await _lookup_in_daemon_thread(host, port)
    out = []
    for family, _, _, _, addr in infos:
        ip, port_number = str(addr[0]), int(addr[1])
        text = f"[{ip}]:{port_number}" if family == socket.AF_INET6 else f"{ip}:{port_number}"
        if text not in out:
            out.append(text)
    return sorted(out)


class DnsNodes:
    """Nodes from one DNS name."""

    def __init__(self, spec: DnsSpec, resolver: Resolver = resolve) -> None:
        self.spec = spec
        self.resolver = resolver
        self.nodes: list[NodeSpec] = []
        self.error = ""

    async def refresh(self) -> bool:
        try:
            addresses = await self.resolver(self.spec.name, self.spec.port)
        except OSError as exc:
            if self.error != str(exc):
                log.error("DNS %s: %s (keeping %d node(s))", self.spec.name, exc, len(self.nodes))
            self.error = str(exc)
            return False
        self.error = ""
        source = f"dns {self.spec.name}"
        nodes = [NodeSpec(a, self.spec.weight, self.spec.models, source, self.spec.client) for a in addresses]
        if nodes == self.nodes:
            return False
        log.info("DNS %s: %s", self.spec.name, ", ".join(addresses) or "no records")
        self.nodes = nodes
        return True
