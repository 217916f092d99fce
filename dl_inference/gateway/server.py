"""Assemble and run the gateway: data plane, gRPC, HTTP and metrics listeners, signal handling."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal

from aiohttp import web

from dl_inference import offload
from dl_inference.config import ServerSettings
from dl_inference.gateway.http_frontend import HttpFrontend, metrics_app
from dl_inference.gateway.router import GatewayDataPlane
from dl_inference.grpc_frontend import GrpcServer
from dl_inference.memtrim import trim_every
from dl_inference.security import TlsSettings

log = logging.getLogger(__name__)


async def _serve_http(
    app: web.Application, host: str, port: int, what: str, grace: float, tls: TlsSettings | None = None
) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ssl_context = tls.ssl_context() if tls is not None and tls.enabled else None
    site = web.TCPSite(runner, host, port, reuse_address=True, shutdown_timeout=grace, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise OSError(exc.errno, f"cannot listen for {what} on {host}:{port}: {why}") from None
    log.info("%s listening on %s:%d%s", what, host, port, " (TLS)" if ssl_context else "")
    return runner


async def _listen(dp: GatewayDataPlane, settings: ServerSettings) -> tuple[GrpcServer, list[web.AppRunner]]:
    """Open every listener (gRPC, HTTP, model control, metrics). On failure the ones already open are
    closed and OSError names the one that failed (its address, and why)."""
    access, tls, control = settings.access_policy(), settings.tls_settings(), settings.control_placement()
    limiter = settings.rate_limiter()
    grace = settings.stop_grace_s
    grpc_server = GrpcServer(
        dp, settings.host, settings.grpc_port, settings.max_request_bytes, access=access, control=control,
        tls=tls, rate_limiter=limiter, max_pending_calls=settings.grpc_max_pending_calls,
    )  # fmt: skip
    await grpc_server.start()
    runners: list[web.AppRunner] = []
    try:
        http = HttpFrontend(
            dp, settings.max_request_bytes, settings.max_json_depth, access=access, control=control,
            rate_limiter=limiter, body_idle_timeout_s=settings.body_idle_timeout_s,
        )  # fmt: skip
        runners.append(await _serve_http(http.app, settings.host, settings.http_port, "HTTP", grace, tls))
        if control == "elsewhere":
            ctl = HttpFrontend(dp, settings.max_request_bytes, settings.max_json_depth, access=access, control="only")
            host, port = settings.control_host, settings.control_port
            runners.append(await _serve_http(ctl.app, host, port, "model control", grace, tls))
        if settings.metrics_port:
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
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    dp = GatewayDataPlane(settings)
    try:
        grpc_server, runners = await _listen(dp, settings)
    except OSError as exc:  # a port in use: one clear line, not a traceback
        log.error(
            "%s (another server running? choose other ports: --http-port, --grpc-port, --metrics-port)", exc.args[-1]
        )
        return 2
    grace = settings.stop_grace_s
    trimmer = asyncio.create_task(trim_every(settings.memory_trim_interval_s))
    # Listeners come up first so liveness answers while models load; readiness waits for them.
    start = asyncio.create_task(dp.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        await stopped
    # Graceful drain: report NOT_SERVING at once (readiness and grpc.health.v1), keep serving for
    # drain_delay_s so load balancers notice, then refuse new inference requests with UNAVAILABLE
    # "shutting down" while the ones in flight finish (within stop_grace_s; GrpcServer.drain says why
    # the listeners stay open meanwhile), and only then close the listeners and stop the workers.
    start.cancel()
    trimmer.cancel()
    dp.stop_accepting()
    await grpc_server.set_not_serving()
    delay = dp.balancer.s.drain_delay_s
    log.info(
        "shutting down: NOT_SERVING%s; in-flight requests get %.0f s", f", draining {delay:g} s" if delay else "", grace
    )
    if delay:
        await asyncio.sleep(delay)
    left = await grpc_server.drain(grace)
    await asyncio.gather(grpc_server.stop(grace=left), *(runner.cleanup() for runner in runners))
    await dp.close()
    offload.shutdown()
    return 0
