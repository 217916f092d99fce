"""Balancer settings (the ``balancer:`` section of the server YAML) and remote node specs.

Defaults follow what production proxies settled on, scaled to an inference server whose requests
take milliseconds: a node is declared unhealthy after two failed checks a second apart, ejected for
5 s (times the number of ejections, at most 60 s) after five consecutive failures, and ramps back
in over 10 s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dl_inference.balancer.credentials import NodeCredentials, parse_credentials
from dl_inference.errors import InvalidArgument

POLICIES = ("least_request", "weighted_round_robin")
HEALTH_CHECKS = ("grpc_health", "server_ready", "model_ready")


@dataclass
class BalancerSettings:
    policy: str = "least_request"
    local_weight: float = 1.0  # weight of each local worker instance
    # active health checks of remote nodes
    health_check: str = "grpc_health"  # grpc.health.v1 Check | V2 ServerReady | V2 ModelReady per model
    health_interval_s: float = 1.0
    health_timeout_s: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2
    local_ping_interval_s: float = 1.0  # local workers: a PING frame; no PONG within timeout = a failed check
    index_refresh_s: float = 5.0  # how often a node's model list is re-read (when not configured)
    # passive outlier ejection
    consecutive_failures: int = 5
    base_ejection_s: float = 5.0
    max_ejection_s: float = 60.0
    max_ejection_percent: float = 50.0  # at least one endpoint may always be ejected
    panic_threshold_percent: float = 50.0  # below this share of healthy endpoints, route to all of them
    slow_start_s: float = 10.0  # a returning endpoint's weight ramps from 10% to 100% over this window
    # retries
    max_retries: int = 2
    retry_budget_percent: float = 20.0  # concurrent retries allowed, as a share of active requests
    min_retry_concurrency: int = 3
    per_try_timeout_s: float = 0.0  # 0: an attempt may use the whole remaining deadline
    hedge_delay_s: float = 0.0  # > 0: send a second attempt elsewhere if no answer by then
    # discovery
    dns_refresh_s: float = 5.0
    node_file_poll_s: float = 1.0
    # drain
    drain_delay_s: float = 0.0  # after NOT_SERVING, keep accepting this long (load balancers notice)
    # How nodes without a `client` of their own are called: the server's `node_client` setting,
    # not a key of the `balancer:` section.
    node_client: NodeCredentials = field(default_factory=NodeCredentials, compare=False)

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None) -> BalancerSettings:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)} - {"node_client"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgument(f"balancer: unknown setting(s) {', '.join(unknown)}")
        for f in dataclasses.fields(cls):
            if f.name in data:
                data[f.name] = _typed(f.name, data[f.name], type(f.default))
        out = cls(**data)
        out.validate()
        return out

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidArgument(f"balancer policy '{self.policy}' is not one of {', '.join(POLICIES)}")
        if self.health_check not in HEALTH_CHECKS:
            raise InvalidArgument(
                f"balancer health_check '{self.health_check}' is not one of {', '.join(HEALTH_CHECKS)}"
            )
        for name in ("health_interval_s", "health_timeout_s", "local_ping_interval_s", "index_refresh_s",
                     "dns_refresh_s", "node_file_poll_s"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"balancer {name} must be positive")
        for name in ("base_ejection_s", "max_ejection_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"balancer {name} must be positive")
        for name in ("slow_start_s", "per_try_timeout_s", "hedge_delay_s", "drain_delay_s"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"balancer {name} must be >= 0 (0 turns it off)")
        for name in ("healthy_threshold", "unhealthy_threshold", "consecutive_failures"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"balancer {name} must be at least 1")
        if self.local_weight <= 0:
            raise InvalidArgument("balancer local_weight must be positive")
        if self.max_retries < 0:
            raise InvalidArgument("balancer max_retries must be >= 0")
        for name in ("max_ejection_percent", "panic_threshold_percent", "retry_budget_percent"):
            if not 0 <= getattr(self, name) <= 100:
                raise InvalidArgument(f"balancer {name} must be between 0 and 100")


def _typed(name: str, value: Any, kind: type) -> Any:
    """``value`` as the setting's type; a clear error instead of a TypeError later."""
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise InvalidArgument(f"balancer {name} must be {'a number' if kind in (int, float) else 'a ' + kind.__name__}, "
                          f"got {value!r}")  # fmt: skip


@dataclass(frozen=True)
class NodeSpec:
    """One remote V2 gRPC endpoint. ``models`` empty: learned from the node's repository index.
    ``client`` None: called as the server's ``node_client`` says."""

    address: str
    weight: float = 1.0
    models: tuple[str, ...] = ()
    source: str = "config"
    client: NodeCredentials | None = None

    @classmethod
    def parse(cls, item: Any, source: str) -> NodeSpec:
        """From a mapping ``{address, weight, models, client}`` or a string ``host:port[@weight]``."""
        if isinstance(item, str):
            address, _, weight_text = item.strip().partition("@")
            data: dict[str, Any] = {"address": address, "weight": weight_text or 1.0}
        elif isinstance(item, dict):
            data = dict(item)
        else:
            raise InvalidArgument(f"{source}: a node must be 'host:port[@weight]' or a mapping, not {item!r}")
        unknown = sorted(set(data) - {"address", "weight", "models", "client"})
        if unknown:
            raise InvalidArgument(f"{source}: unknown node field(s) {', '.join(unknown)}")
        address = str(data.get("address", "")).strip()
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InvalidArgument(f"{source}: node address '{address}' is not host:port")
        try:
            weight = float(data.get("weight", 1.0))
        except (TypeError, ValueError):
            raise InvalidArgument(f"{source}: node {address} weight {data.get('weight')!r} is not a number") from None
        if weight <= 0:
            raise InvalidArgument(f"{source}: node {address} weight must be positive, got {weight}")
        models = data.get("models") or ()
        if isinstance(models, str) or not all(isinstance(m, str) for m in models):
            raise InvalidArgument(f"{source}: node {address} models must be a list of model names")
        client = data.get("client")  # None: the server's node_client; {}: plain gRPC, no token
        creds = None if client is None else parse_credentials(client, f"{source}: node {address} client")
        return cls(address, weight, tuple(models), source, creds)


@dataclass(frozen=True)
class DnsSpec:
    """A DNS name whose A/AAAA records are nodes (e.g. a Kubernetes headless Service)."""

    name: str
    port: int
    weight: float = 1.0
    models: tuple[str, ...] = ()
    client: NodeCredentials | None = None  # None: the server's node_client

    @classmethod
    def parse(cls, item: Any) -> DnsSpec:
        if isinstance(item, str):
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise InvalidArgument(f"node_dns entry '{item}' is not name:port")
            item = {"name": host, "port": port}
        if not isinstance(item, dict) or "name" not in item or "port" not in item:
            raise InvalidArgument(f"node_dns entry {item!r} needs 'name' and 'port' ('name:port' or a mapping)")
        unknown = sorted(set(item) - {"name", "port", "weight", "models", "client"})
        if unknown:
            raise InvalidArgument(f"node_dns: unknown field(s) {', '.join(unknown)}")
        # The same checks as a node entry: host:port, a positive weight, model names, client settings.
        passed = ("weight", "models", "client")
        node = {"address": f"{item['name']}:{item['port']}", **{k: item[k] for k in passed if k in item}}
        spec = NodeSpec.parse(node, "node_dns")
        return cls(str(item["name"]), int(str(item["port"])), spec.weight, spec.models, spec.client)


@dataclass
class Topology:
    """Where remote nodes come from: a static list, a node file, DNS names."""

    nodes: list[NodeSpec] = field(default_factory=list)
    node_file: str = ""
    dns: list[DnsSpec] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.nodes or self.node_file or self.dns)
