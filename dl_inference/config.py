"""Server settings: defaults, then a YAML file (``--config``), then command-line flags."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dl_inference.balancer.credentials import NodeClientSettings, NodeCredentials
from dl_inference.balancer.settings import BalancerSettings, DnsSpec, NodeSpec, Topology
from dl_inference.errors import InvalidArgument
from dl_inference.security import AccessPolicy, RateLimiter, TlsSettings

CONTROL_MODES = ("none", "poll", "explicit")
CONTROL_API = ("enabled", "disabled")
WORKER_ENVIRONMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


GRPC_MAX_PENDING_CALLS = 20000


@dataclass
class ServerSettings:
    model_repository: str = ""
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control_mode: str = "none"
    load_models: list[str] = field(default_factory=list)
    repository_poll_secs: float = 15.0
    # Largest request accepted on either transport; the default fits a 64 MiB tensor plus headers.
    max_request_bytes: int = 96 * 1024 * 1024
    max_json_depth: int = 64
    body_idle_timeout_s: float = 10.0  # HTTP: a request body that sends nothing this long is refused (400)
    # gRPC calls arrived but not yet taken up by the event loop (gRPC core's own queue; its default of
    # 1000 drops calls as CANCELLED during a loop stall of ~1000 requests' worth).
    grpc_max_pending_calls: int = GRPC_MAX_PENDING_CALLS
    # Requests the gateway holds at once over every model and transport; more are answered 429 /
    # RESOURCE_EXHAUSTED at once. 0: no gateway-wide bound (each model's max_queue_size still applies).
    max_inflight_requests: int = 0
    # Every this many seconds the gateway hands freed heap memory back to the OS (glibc malloc_trim),
    # so RSS comes back down after a burst of queued calls; 0: never.
    memory_trim_interval_s: float = 60.0
    # Every this many seconds, system shared-memory regions whose client is gone (the /dev/shm object
    # removed, or no process outside this server maps it) are unregistered; 0: never.
    shared_memory_sweep_s: float = 5.0
    max_tensor_elements: int = 0  # per input tensor; 0: bounded only by max_request_bytes
    max_bytes_element: int = 0  # largest BYTES element in bytes; 0: bounded only by max_request_bytes
    # per-client request rate (clients keyed by token, else address): {requests_per_s, burst}; empty: off
    rate_limit: dict[str, Any] = field(default_factory=dict)
    load_timeout_s: float = 600.0
    # Triton's start-up conventions, with Triton's defaults: a model that fails to load at start stops the
    # server (exit status 1); the server is ready only while every model it holds or tried to load is
    # ready; backends complete a model's config from its file unless told not to.
    exit_on_error: bool = True
    strict_readiness: bool = True
    disable_auto_complete_config: bool = False
    stop_grace_s: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one object per line, from every process of the server
    # Frontend processes serving the gRPC and HTTP ports (SO_REUSEPORT; dl_inference/gateway/frontend_processes.py).
    # 1: the gateway process alone; 0: automatic (see auto_frontends).
    frontends: int = 0
    # remote nodes and balancing (see dl_inference/balancer/settings.py and the README)
    nodes: list[Any] = field(default_factory=list)  # "host:port[@weight]" or {address, weight, models}
    node_file: str = ""
    node_dns: list[Any] = field(default_factory=list)  # "name:port" or {name, port, weight, models}
    balancer: dict[str, Any] = field(default_factory=dict)
    # how this gateway calls its nodes: {token_file, tls, tls_ca, tls_cert, tls_key, tls_server_name}
    # (see dl_inference/balancer/credentials.py); a node entry's own `client` replaces it for that node
    node_client: dict[str, Any] = field(default_factory=dict)
    # security (see dl_inference/security.py and the README)
    auth: dict[str, Any] = field(default_factory=dict)  # tokens / tokens_file / admin_tokens / admin_tokens_file
    tls: dict[str, Any] = field(default_factory=dict)  # cert / key / ca (ca: client certificates required)
    control_api: str = "enabled"  # "disabled": no repository index/load/unload at all
    control_port: int = 0  # > 0: the model-control API only on this HTTP port (bound to control_host)
    control_host: str = "127.0.0.1"
    # Other Python environments for workers: name -> interpreter (e.g. {itex: .venv-itex/bin/python});
    # a model picks one with its config parameter `worker_environment`. Relative paths: from the cwd.
    worker_environments: dict[str, str] = field(default_factory=dict)

    def rate_limiter(self) -> RateLimiter | None:
        return RateLimiter.from_mapping(self.rate_limit)

    def access_policy(self) -> AccessPolicy:
        return AccessPolicy.from_mapping(self.auth)

    def tls_settings(self) -> TlsSettings:
        return TlsSettings.from_mapping(self.tls)

    def control_placement(self) -> str:
        """Where the model-control API is: "here" (main ports), "elsewhere" (control_port) or "disabled"."""
        if self.control_api == "disabled":
            return "disabled"
        return "elsewhere" if self.control_port else "here"

    def node_credentials(self) -> NodeCredentials:
        """``node_client`` with its files read (once per distinct setting, so later calls cannot fail)."""
        return _load_node_credentials(NodeClientSettings.parse(self.node_client, "node_client"))

    def balancer_settings(self) -> BalancerSettings:
        settings = BalancerSettings.from_mapping(self.balancer)
        settings.node_client = self.node_credentials()
        return settings

    def topology(self) -> Topology:
        return Topology(
            nodes=[NodeSpec.parse(n, "nodes") for n in self.nodes],
            node_file=self.node_file,
            dns=[DnsSpec.parse(d) for d in self.node_dns],
        )

    def validate(self) -> None:
        if not self.model_repository:
            raise InvalidArgument("--model-repository is required")
        if not Path(self.model_repository).is_dir():
            raise InvalidArgument(f"model repository '{self.model_repository}' is not a directory")
        if self.log_format not in ("text", "json"):
            raise InvalidArgument(f"log_format must be text or json, got '{self.log_format}'")
        if self.model_control_mode not in CONTROL_MODES:
            raise InvalidArgument(
                f"model control mode '{self.model_control_mode}' is not one of {', '.join(CONTROL_MODES)}"
            )
        if self.max_request_bytes <= 0:
            raise InvalidArgument("max_request_bytes must be positive")
        if self.body_idle_timeout_s <= 0:
            raise InvalidArgument("body_idle_timeout_s must be positive")
        if self.memory_trim_interval_s < 0:
            raise InvalidArgument("memory_trim_interval_s must be >= 0 (0: never)")
        if self.max_inflight_requests < 0:
            raise InvalidArgument("max_inflight_requests must be >= 0 (0: no limit)")
        if self.shared_memory_sweep_s < 0:
            raise InvalidArgument("shared_memory_sweep_s must be >= 0 (0: never)")
        if not isinstance(self.frontends, int) or self.frontends < 0:
            raise InvalidArgument(f"frontends must be a whole number >= 0 (0: automatic), got {self.frontends!r}")
        if self.frontends == 0:
            self.frontends = auto_frontends(self.http_port, self.grpc_port)
        if self.frontends > 1:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise InvalidArgument("frontends > 1 needs SO_REUSEPORT, which this platform lacks; use 1")
            if not self.http_port or not self.grpc_port:
                raise InvalidArgument("frontends > 1 needs fixed --http-port and --grpc-port (not 0)")
        if self.grpc_max_pending_calls < 1:
            raise InvalidArgument("grpc_max_pending_calls must be >= 1")
        if self.max_tensor_elements < 0 or self.max_bytes_element < 0:
            raise InvalidArgument("max_tensor_elements and max_bytes_element must be >= 0 (0: no separate limit)")
        self.rate_limiter()
        if self.repository_poll_secs <= 0:
            raise InvalidArgument("repository_poll_secs must be positive")
        if not isinstance(self.balancer, dict):
            raise InvalidArgument("balancer must be a mapping of settings")
        if not isinstance(self.nodes, list) or not isinstance(self.node_dns, list):
            raise InvalidArgument("nodes and node_dns must be lists")
        self.balancer_settings()  # reads node_client's files too
        self.topology()
        if self.control_api not in CONTROL_API:
            raise InvalidArgument(f"control_api must be one of {', '.join(CONTROL_API)}, got '{self.control_api}'")
        if not isinstance(self.auth, dict) or not isinstance(self.tls, dict):
            raise InvalidArgument("auth and tls must be mappings of settings")
        self.access_policy()
        self.tls_settings()
        validate_worker_environments(self.worker_environments)


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, bounded by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def auto_frontends(http_port: int, grpc_port: int) -> int:
    """The default number of frontends: a quarter of the usable cores, at most 8 (the rest are the
    workers'); 1 below 8 cores, without SO_REUSEPORT, or when a port is 0 (random)."""
    if not hasattr(socket, "SO_REUSEPORT") or not http_port or not grpc_port:
        return 1
    return max(1, min(8, usable_cores() // 4))


@functools.lru_cache(maxsize=8)
def _load_node_credentials(settings: NodeClientSettings) -> NodeCredentials:
    return settings.load("node_client")


def validate_worker_environments(environments: object) -> None:
    """A mapping of names to interpreter paths; whether each interpreter exists is checked per model."""
    if not isinstance(environments, dict):
        raise InvalidArgument("worker_environments must be a mapping of environment name to Python interpreter")
    for name, python in environments.items():
        if not isinstance(name, str) or not WORKER_ENVIRONMENT_NAME.fullmatch(name):
            raise InvalidArgument(
                f"worker environment name '{name}' must be letters, digits, '.', '_' or '-' (e.g. itex)"
            )
        if not isinstance(python, str) or not python.strip():
            raise InvalidArgument(f"worker environment '{name}' needs the path of a Python interpreter")


def parse_worker_environment(text: str) -> tuple[str, str]:
    """``--worker-environment NAME=PYTHON`` -> (name, interpreter path)."""
    name, sep, python = text.partition("=")
    name, python = name.strip(), python.strip()
    if not sep or not name or not python:
        raise InvalidArgument(f"--worker-environment takes NAME=PYTHON (e.g. itex=.venv-itex/bin/python), got '{text}'")
    validate_worker_environments({name: python})
    return name, python


ENV_PREFIX = "DL_INFERENCE_"
# DL_INFERENCE_* variables that are not settings: the processes' own (worker/frontend identity and tokens),
# the conversion cache, the event loop choice, the images' and compose file's, the tests' sample path.
NOT_SETTINGS_ENV = frozenset(
    {"WORKER", "FRONTEND", "FRONTEND_TOKEN", "WORKER_TOKEN", "CACHE_DIR", "LOOP", "TAG", "HEALTHCHECK",
     "HEALTHCHECK_TIMEOUT_S", "CAFFE_SAMPLES"}
)  # fmt: skip
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(text: str) -> bool:
    """Triton's boolean values: true/false, 1/0, yes/no, on/off (any case); ValueError otherwise."""
    lowered = text.strip().lower()
    if lowered in _TRUE + _FALSE:
        return lowered in _TRUE
    raise ValueError(f"expected true or false, got {text!r}")


def settings_from_env(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The settings given as ``DL_INFERENCE_<SETTING>`` variables (``DL_INFERENCE_HTTP_PORT=9000``,
    ``DL_INFERENCE_LOAD_MODELS=a,b``, ``DL_INFERENCE_BALANCER='{policy: least_request}'``), typed like the
    setting's default; and warnings for DL_INFERENCE_* names that are no setting. InvalidArgument names
    the variable whose value does not fit."""
    fields = {f.name: f for f in dataclasses.fields(ServerSettings)}
    values: dict[str, Any] = {}
    warnings: list[str] = []
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX):
            continue
        suffix = key[len(ENV_PREFIX) :]
        name = suffix.lower()
        if name not in fields:
            if suffix not in NOT_SETTINGS_ENV:
                warnings.append(f"environment variable {key} is not a server setting; ignored")
            continue
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        values[name] = _typed(key, environ[key], default)
    return values, warnings


def _typed(key: str, raw: str, default: Any) -> Any:
    text = raw.strip()
    try:
        if isinstance(default, bool):
            return parse_bool(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, list):
            if text.startswith("["):
                value = yaml.safe_load(text)
                if not isinstance(value, list):
                    raise ValueError("expected a list")
                return value
            return [item.strip() for item in text.split(",") if item.strip()]
        if isinstance(default, dict):
            value = yaml.safe_load(text) if text else {}
            if not isinstance(value, dict):
                raise ValueError("expected a mapping, e.g. '{key: value}'")
            return value
    except (ValueError, yaml.YAMLError) as exc:
        kind = type(default).__name__
        raise InvalidArgument(f"environment variable {key}={raw!r}: not a valid {kind} ({exc})") from None
    return raw


def load_settings(
    path: str | None, overrides: dict[str, Any], environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Settings from an optional YAML file, then ``DL_INFERENCE_<SETTING>`` environment variables
    (``environ``, default ``os.environ``), then ``overrides`` (non-None values: the flags) on top."""
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidArgument(f"cannot read server config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidArgument(f"server config {path} must be a mapping")
        known = {f.name for f in dataclasses.fields(ServerSettings)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgument(f"server config {path}: unknown setting(s) {', '.join(unknown)}")
        values.update(data)
    from_env, warnings = settings_from_env(os.environ if environ is None else environ)
    for warning in warnings:
        logging.getLogger(__name__).warning("%s", warning)
    values.update(from_env)
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = ServerSettings(**values)
    settings.validate()
    return settings
