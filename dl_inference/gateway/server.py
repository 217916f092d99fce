"""Assemble and run the gateway: data plane, gRPC, HTTP and metrics listeners, signal handling."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket

from aiohttp import web

from dl_inference import offload
from dl_inference.config import ServerSettings
from dl_inference.frontends.grpc_server import GrpcServer
from dl_inference.frontends.http_server import HttpFrontend, metrics_app
from dl_inference.gateway.router import GatewayDataPlane, RoutingDataPlane, StartupFailed
from dl_inference.memtrim import trim_every
from dl_inference.security import TlsSettings

log = logging.getLogger(__name__)


async def _serve_http(
    app: web.Application,
    host: str,
    port: int,
    what: str,
    grace: float,
    tls: TlsSettings | None = None,
    reuse_port: bool = False,
) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ssl_context = tls.ssl_context() if tls is not None and tls.enabled else None
    site = web.TCPSite(
        runner, host, port, reuse_address=True, reuse_port=reuse_port or None, shutdown_timeout=grace,
        ssl_context=ssl_context,
    )  # fmt: skip
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise OSError(exc.errno, f"cannot listen for {what} on {host}:{port}: {why}") from None
    log.info("%s listening on %s:%d%s", what, host, port, " (TLS)" if ssl_context else "")
    return runner


def _check_free(host: str, port: int, what: str) -> None:
    """OSError naming the port when something listens there already (bound once, without SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise OSError(exc.errno, f"cannot listen for {what} on {host}:{port}: {why}") from None


async def _listen(
    dp: RoutingDataPlane, settings: ServerSettings, frontend: int = 0
) -> tuple[GrpcServer, list[web.AppRunner]]:
    """Open every listener (gRPC, HTTP, model control, metrics; frontends other than 0 only gRPC and
    HTTP, shared with the others). On failure the ones already open are closed and OSError names the
    one that failed (its address, and why)."""
    access, tls, control = settings.access_policy(), settings.tls_settings(), settings.control_placement()
    limiter = settings.rate_limiter()
    grace = settings.stop_grace_s
    shared = settings.frontends > 1
    if shared and not frontend:  # SO_REUSEPORT would let us join another server of this user's ports
        for port, what in ((settings.grpc_port, "gRPC"), (settings.http_port, "HTTP")):
            _check_free(settings.host, port, what)
    grpc_server = GrpcServer(
        dp, settings.host, settings.grpc_port, settings.max_request_bytes, access=access, control=control,
        tls=tls, rate_limiter=limiter, max_pending_calls=settings.grpc_max_pending_calls, reuse_port=shared,
    )  # fmt: skip
    await grpc_server.start()
    runners: list[web.AppRunner] = []
    try:
        http = HttpFrontend(
            dp, settings.max_request_bytes, settings.max_json_depth, access=access, control=control,
            rate_limiter=limiter, body_idle_timeout_s=settings.body_idle_timeout_s,
        )  # fmt: skip
        runners.append(
            await _serve_http(http.app, settings.host, settings.http_port, "HTTP", grace, tls, reuse_port=shared)
        )
        if frontend:
            pass  # the model-control and metrics ports are the supervisor's
        elif control == "elsewhere":
            ctl = HttpFrontend(dp, settings.max_request_bytes, settings.max_json_depth, access=access, control="only")
            host, port = settings.control_host, settings.control_port
            runners.append(await _serve_http(ctl.app, host, port, "model control", grace, tls))
        if settings.metrics_port and not frontend:
            runners.append(await _serve_http(metrics_app(dp), settings.host, settings.metrics_port, "metrics", grace))
    except OSError:
        await grpc_server.stop(0)
        for runner in runners:
            await runner.cleanup()
        raise
    if access.enabled:
        log.info(
            "authentication on: %d inference token(s), %d admin token(s)", len(access.inference), len(access.admin)
        )
    return grpc_server, runners


async def serve(settings: ServerSettings) -> int:
    """``dl-inference serve``: the gateway (with ``frontends`` > 1, the supervisor and frontend 0)."""
    dp = GatewayDataPlane(settings)
    return await run_listeners(dp, settings)


async def run_listeners(
    dp: RoutingDataPlane, settings: ServerSettings, frontend: int = 0, stop_also: asyncio.Event | None = None
) -> int:
    """Serve ``dp`` on the listeners until SIGTERM/SIGINT (or ``stop_also``), then drain and close.

    Frontend 0 (``serve``) also starts the other frontends (``frontends`` > 1) and stops them first at
    the end: each drains on its own, and the workers stop after the last of them.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        grpc_server, runners = await _listen(dp, settings, frontend)
    except OSError as exc:  # a port in use: one clear line, not a traceback
        log.error(
            "%s (another server running? choose other ports: --http-port, --grpc-port, --metrics-port)", exc.args[-1]
        )
        return 2
    supervisor = None
    if settings.frontends > 1 and not frontend:
        from dl_inference.gateway.frontend_processes import FrontendSupervisor

        assert isinstance(dp, GatewayDataPlane)  # frontend 0 is the supervisor
        supervisor = dp.frontends = FrontendSupervisor(dp, settings)
        await supervisor.start()
    grace = settings.stop_grace_s
    trimmer = asyncio.create_task(trim_every(settings.memory_trim_interval_s))
    # Listeners come up first so liveness answers while models load; readiness waits for them.
    start = asyncio.create_task(dp.start())
    waits = {asyncio.create_task(stop.wait())}
    if stop_also is not None:
        waits.add(asyncio.create_task(stop_also.wait()))
    await asyncio.wait({start, *waits}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if start.done() and not start.cancelled() and start.exception() is not None:
        failure = start.exception()
        log.error("%s", failure if isinstance(failure, StartupFailed) else f"start-up failed: {failure!r}")
        code = 1
    elif not (stop.is_set() or (stop_also is not None and stop_also.is_set())):
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    # Graceful drain: report NOT_SERVING at once (readiness and grpc.health.v1), keep serving for
    # drain_delay_s so load balancers notice, then refuse new inference requests with UNAVAILABLE
    # "shutting down" while the ones in flight finish (within stop_grace_s; GrpcServer.drain says why
    # the listeners stay open meanwhile), and only then close the listeners and stop the workers.
    start.cancel()
    trimmer.cancel()
    if supervisor is not None:
        supervisor.stop_frontends()
    dp.stop_accepting()
    await grpc_server.set_not_serving()
    delay = dp.balancer.s.drain_delay_s
    log.info(
        "shutting down%s: NOT_SERVING%s; in-flight requests get %.0f s",
        f" frontend {frontend}" if frontend else "", f", draining {delay:g} s" if delay else "", grace,
    )  # fmt: skip
    if delay:
        await asyncio.sleep(delay)
    left = await grpc_server.drain(grace)
    await asyncio.gather(grpc_server.stop(grace=left), *(runner.cleanup() for runner in runners))
    if supervisor is not None:
        await supervisor.wait_stopped(delay + grace + 5)
    await dp.close()
    offload.shutdown()
    return code
