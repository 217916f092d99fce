"""A remote node: any V2 gRPC endpoint (a standalone worker, another gateway, Triton).

Requests are forwarded as the client's ModelInferRequest bytes (identity serializers), with the
remaining deadline as the gRPC timeout. A background task checks the node's health every
``health_interval_s`` (grpc.health.v1 ``Check``, falling back to V2 ``ServerReady`` on nodes without
it; or, with ``health_check: model_ready``, V2 ``ModelReady`` of each of its models)
and, unless the node's models are configured, re-reads its repository index to learn which models
and versions it serves, with their config and metadata for this gateway's metadata endpoints.

Nodes are called as their :class:`NodeCredentials` say (TLS, a client certificate, a bearer token on
every call). Health probes are open on dl_inference nodes, so each check also makes one call that
needs a token (``ServerMetadata``, or the repository index after the node refused to show it): a
node that refuses our credentials turns unhealthy at once, with the node's answer as the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from dl_inference.balancer.clock import Clock
from dl_inference.balancer.credentials import NodeCredentials
from dl_inference.balancer.endpoint import Endpoint, EndpointFailed, Reply
from dl_inference.balancer.settings import BalancerSettings, NodeSpec
from dl_inference.errors import Code
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc

log = logging.getLogger(__name__)

SERVICE = "/inference.GRPCInferenceService/"
ANY_VERSION = "*"
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class CredentialsRefused(Exception):
    """The node answered UNAUTHENTICATED or PERMISSION_DENIED: our token (or its absence) is not accepted."""


def failure_reason(exc: grpc.aio.AioRpcError, credentials: NodeCredentials) -> str:
    """A short, operator-facing reason for a failed call to a node (never containing our token)."""
    code = exc.code()
    detail = exc.details() or code.name
    if code in _REFUSALS:
        return f"refused our credentials ({code.name}: {detail})"
    at = detail.lower().find("handshake failed")
    if at >= 0:
        tail = detail[at + len("handshake failed") :].strip(" :").removesuffix(": OK")
        hint = ""
        if "CERTIFICATE_VERIFY_FAILED" in tail:
            hint = " (is the node's certificate signed by tls_ca's CA, for its address or tls_server_name?)"
        elif "WRONG_VERSION_NUMBER" in tail:
            hint = " (does the node serve TLS?)"
        return f"TLS handshake failed: {tail}{hint}"
    if code is grpc.StatusCode.UNAVAILABLE and detail.lower().endswith("socket closed"):
        if not credentials.tls:
            return f"{detail} (if the node serves TLS only, set tls_ca)"
        if credentials.certificate_chain is None:
            return f"{detail} (if the node requires client certificates, set tls_cert and tls_key)"
    return detail


class RemoteNode(Endpoint):
    kind = "remote"

    def __init__(
        self,
        spec: NodeSpec,
        settings: BalancerSettings,
        clock: Clock,
        on_change: Callable[[], None],
        *,
        max_message_bytes: int = 96 * 1024 * 1024,
        slow_start: bool = False,
    ) -> None:
        super().__init__(spec.address, spec.weight, clock, slow_start=slow_start)
        self._spec = spec
        self.s = settings
        self.on_change = on_change
        self.healthy = False  # until the first check passes
        self.closed = False
        self._seen_healthy = False
        self._boot = not slow_start
        self.models: set[tuple[str, str]] = {(m, ANY_VERSION) for m in spec.models}
        self.configs: dict[str, tuple[mc.ModelConfig, pb.ModelMetadataResponse]] = {}
        self._use_health_service = settings.health_check == "grpc_health"
        self._calls: set[grpc.aio.Call] = set()
        self._abandoned: set[grpc.aio.Call] = set()
        self._index_refused = ""  # why the node would not show its repository index (learned model lists)
        self._index_read = False
        self._retired: set[asyncio.Task[None]] = set()
        self._options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.credentials = spec.client or settings.node_client
        self._connect()
        if self.credentials != NodeCredentials():
            log.info("node %s: %s", self.name, self.credentials.describe())
        self._task: asyncio.Task[None] | None = None
        self._refreshed_at = -float("inf")

    def _connect(self) -> None:
        creds = self.credentials
        self._metadata = creds.metadata
        if creds.tls:
            options = list(self._options)
            if creds.server_name:
                options.append(("grpc.ssl_target_name_override", creds.server_name))
            channel_credentials = grpc.ssl_channel_credentials(
                creds.root_certificates, creds.private_key, creds.certificate_chain
            )
            self.channel = grpc.aio.secure_channel(self.spec.address, channel_credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(self.spec.address, options=self._options)
        self._infer = self.channel.unary_unary(SERVICE + "ModelInfer")

    @property
    def spec(self) -> NodeSpec:
        return self._spec

    @spec.setter
    def spec(self, spec: NodeSpec) -> None:
        """A changed entry (node file, DNS): new credentials mean a new channel; the old one drains."""
        self._spec = spec
        credentials = spec.client or self.s.node_client
        if credentials == self.credentials:
            return
        log.info("node %s: credentials changed, reconnecting (%s)", self.name, credentials.describe())
        old = self.channel
        self.credentials = credentials
        self._connect()
        task = asyncio.get_running_loop().create_task(old.close(grace=30.0))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._check_loop())

    async def close(self, grace: float = 0.0) -> None:
        """Stop checking; let in-flight calls finish for up to ``grace`` seconds; close the channel."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()
        deadline = self.clock.now() + grace
        while self.inflight and self.clock.now() < deadline:
            await asyncio.sleep(0.05)
        await self.channel.close()

    def usable(self) -> bool:
        return not self.closed

    def serves(self, name: str, version: str) -> bool:
        """Whether this node serves ``name`` at ``version`` ("" = whichever version it likes)."""
        if not version:
            return any(n == name for n, _ in self.models)
        return (name, version) in self.models or (name, ANY_VERSION) in self.models

    # -- data path ----------------------------------------------------------------------------------
    async def infer(self, payload: bytes, timeout: float | None) -> Reply:
        call = self._infer(payload, timeout=timeout, metadata=self._metadata)
        self._calls.add(call)
        try:
            body: bytes = await call
            return Reply(body)
        except asyncio.CancelledError:
            if call in self._abandoned:
                raise EndpointFailed(f"node {self.name} {self.last_error or 'went down'}", resend=True) from None
            call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            detail = exc.details() or code.name
            if code in _REFUSALS:  # the node turns the gateway away, not this request: try elsewhere
                why = failure_reason(exc, self.credentials)
                self._refused(why)
                raise EndpointFailed(f"node {self.name} {why}", resend=True) from None
            if code is grpc.StatusCode.UNAVAILABLE:
                raise EndpointFailed(f"node {self.name}: {failure_reason(exc, self.credentials)}") from None
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(detail) from None
            if code is grpc.StatusCode.CANCELLED and call in self._abandoned:
                raise EndpointFailed(f"node {self.name} {self.last_error or 'went down'}", resend=True) from None
            if code is grpc.StatusCode.CANCELLED:  # not by us (that is CancelledError above): the node's
                # gRPC dropped the call, e.g. stopping with calls it had not handed to its server yet
                raise EndpointFailed(f"node {self.name} cancelled the call: {detail}") from None
            ours = Code.__members__.get(code.name, Code.INTERNAL)
            return Reply.error(ours, detail)
        finally:
            self._calls.discard(call)
            self._abandoned.discard(call)

    def went_down(self, why: str) -> None:
        self.last_error = why
        for call in list(self._calls):
            self._abandoned.add(call)
            call.cancel()

    # -- health -------------------------------------------------------------------------------------
    async def _probe(self) -> None:
        """One health check; raises on failure."""
        timeout = self.s.health_timeout_s
        if self.s.health_check == "model_ready":
            names = sorted(set(self.spec.models) or {n for n, _ in self.models})
            if names:
                await self._probe_models(names, timeout)
                return
        if self._use_health_service:
            check = self.channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            try:
                resp = await check(health_pb2.HealthCheckRequest(service=""), timeout=timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                    raise
                log.info("node %s has no grpc.health.v1; checking it with ServerReady", self.name)
                self._use_health_service = False
            else:
                if resp.status != health_pb2.HealthCheckResponse.SERVING:
                    raise RuntimeError(
                        f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
                    )
                return
        ready = await self._call("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse, timeout)
        if not getattr(ready, "ready", False):
            raise RuntimeError("ServerReady says not ready")

    async def _check_credentials(self) -> None:
        """One call that needs a token; CredentialsRefused when the node turns us away.

        While the node refuses to show its repository index, that call is the one retried (so the
        node comes back once it would tell us its models); otherwise ``ServerMetadata``, which every
        V2 server has. Any other error is left to the health probe to judge.
        """
        if self._index_refused and self.spec.models:  # models listed since: the index is not needed
            self._index_refused = ""
        if self._index_refused:
            if await self._read_index() is None:
                raise CredentialsRefused(self._index_refused)
            self._index_refused = ""  # the next refresh, once healthy, learns the models
            return
        try:
            await self._call("ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse,
                             self.s.health_timeout_s)  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REFUSALS:
                raise CredentialsRefused(failure_reason(exc, self.credentials)) from None

    def _refused(self, why: str) -> None:
        """The node refused our credentials: unhealthy now (no threshold: retrying will not help)."""
        self._fail_check(why, 1)

    def _fail_check(self, why: str, unhealthy_threshold: int) -> None:
        flipped = self.record_check(False, why, self.s.healthy_threshold, unhealthy_threshold)
        # Said once when it turns unhealthy, and once for a node that has not been healthy yet (a
        # node failing from the start never flips, and its reason matters most then).
        if flipped or (not self._seen_healthy and self.checks_failed == 1):
            log.warning("node %s is unhealthy: %s", self.name, why)
        if flipped:
            self.on_change()

    async def _probe_models(self, names: list[str], timeout: float) -> None:
        """V2 ModelReady for each model: the node is healthy while one is ready. A configured model
        list shrinks to the ready ones (learned lists follow the repository index instead)."""
        answers = await asyncio.gather(
            *(self._call("ModelReady", pb.ModelReadyRequest(name=n), pb.ModelReadyResponse, timeout) for n in names)
        )
        ready = {n for n, a in zip(names, answers) if getattr(a, "ready", False)}
        if self.spec.models:
            models = {(n, ANY_VERSION) for n in ready}
            if models != self.models:
                self.models = models
                self.on_change()
        if not ready:
            raise RuntimeError(f"ModelReady is false for {', '.join(names)}")

    async def _call(self, method: str, request: object, response: Any, timeout: float) -> object:
        stub = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )
        return await stub(request, timeout=timeout, metadata=self._metadata)

    async def check_once(self) -> None:
        try:
            await self._probe()
            await self._check_credentials()
        except CredentialsRefused as exc:
            self._refused(str(exc))
            return
        except (TimeoutError, grpc.aio.AioRpcError, RuntimeError) as exc:
            if isinstance(exc, grpc.aio.AioRpcError):
                why = failure_reason(exc, self.credentials)
            else:
                why = str(exc) or "no answer"
            self._fail_check(why, self.s.unhealthy_threshold)
            return
        # A node starts unhealthy; its first passed check brings it in (with no slow start at boot).
        first = not self._seen_healthy
        threshold = 1 if first else self.s.healthy_threshold
        if self.record_check(True, "", threshold, self.s.unhealthy_threshold):
            self._seen_healthy = True
            if first and self._boot:
                self.returned_at = -float("inf")
            log.info("node %s is healthy", self.name)
            self.on_change()

    async def _read_index(self) -> pb.RepositoryIndexResponse | None:
        """The node's index of ready models; None when it has none or did not answer (logged);
        CredentialsRefused when it will not show it to us."""
        try:
            index = await self._call(
                "RepositoryIndex", pb.RepositoryIndexRequest(ready=True), pb.RepositoryIndexResponse,
                self.s.health_timeout_s,
            )  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                log.error("node %s has no repository index; list its models in the node config", self.name)
            elif exc.code() in _REFUSALS:
                self._index_refused = (
                    f"would not show its repository index: {failure_reason(exc, self.credentials)}; give this "
                    f"gateway a token the node accepts for it (an admin token on dl_inference nodes with admin "
                    f"tokens), or list the node's models in its entry"
                )
                raise CredentialsRefused(self._index_refused) from None
            return None
        assert isinstance(index, pb.RepositoryIndexResponse)
        return index

    @property
    def models_unknown(self) -> bool:
        """Whether this node may serve models we do not know of: none listed, its index never read."""
        return not self.spec.models and not self._index_read

    async def refresh_models(self) -> None:
        """Learn the node's ready models (and their config) from its repository index."""
        if self.spec.models:
            names = set(self.spec.models)
        else:
            try:
                index = await self._read_index()
            except CredentialsRefused as exc:
                self._refused(str(exc))
                return
            if index is None:
                return
            self._index_refused = ""
            self._index_read = True
            models = {(m.name, m.version or ANY_VERSION) for m in index.models if m.state in ("", "READY")}
            if models != self.models:
                log.info("node %s serves %s", self.name, ", ".join(sorted(f"{n}:{v}" for n, v in models)) or "nothing")
                self.models = models
                self.on_change()
            names = {n for n, _ in models}
        for name in names - set(self.configs):
            with contextlib.suppress(grpc.aio.AioRpcError):
                cfg = await self._call(
                    "ModelConfig", pb.ModelConfigRequest(name=name), pb.ModelConfigResponse, self.s.health_timeout_s
                )
                meta = await self._call(
                    "ModelMetadata",
                    pb.ModelMetadataRequest(name=name),
                    pb.ModelMetadataResponse,
                    self.s.health_timeout_s,
                )
                assert isinstance(cfg, pb.ModelConfigResponse) and isinstance(meta, pb.ModelMetadataResponse)
                self.configs[name] = (cfg.config, meta)

    async def first_check(self) -> None:
        """The check at start-up, so readiness and the model list are known before serving."""
        await self.check_once()
        if self.healthy:
            await self.refresh_models()
        self._refreshed_at = self.clock.now()

    async def _check_loop(self) -> None:
        next_refresh = self._refreshed_at + self.s.index_refresh_s
        while not self.closed:
            started = self.clock.now()
            await self.check_once()
            if self.healthy and started >= next_refresh:
                try:
                    await self.refresh_models()
                except Exception:  # a broken node must not stop its own health checks
                    log.exception("reading the model list of node %s failed", self.name)
                next_refresh = started + self.s.index_refresh_s
            await asyncio.sleep(max(0.0, self.s.health_interval_s - (self.clock.now() - started)))

    def describe(self, now: float, slow_start_s: float) -> dict[str, object]:
        out = super().describe(now, slow_start_s)
        out["models"] = sorted(f"{n}:{v}" for n, v in self.models)
        out["source"] = self.spec.source
        out["client"] = self.credentials.describe()
        if self.last_error:
            out["last_error"] = self.last_error
        return out
