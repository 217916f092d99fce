"""Assemble and run the gateway: data plane, gRPC, HTTP and metrics listeners, signal handling."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

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
    await site.start()
    log.info("%s listening on %s:%d%s", what, host, port, " (TLS)" if ssl_context else "")
    return runner


async def serve(settings: ServerSettings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    dp = GatewayDataPlane(settings)
    access, tls, control = settings.access_policy(), settings.tls_settings(), settings.control_placement()
    limiter = settings.rate_limiter()
    grpc_server = GrpcServer(
        dp,
        settings.host,
        settings.grpc_port,
        settings.max_request_bytes,
        access=access,
        control=control,
        tls=tls,
        rate_limiter=limiter,
        max_pending_calls=settings.grpc_max_pending_calls,
    )
    await grpc_server.start()
    http = HttpFrontend(
        dp,
        settings.max_request_bytes,
        settings.max_json_depth,
        access=access,
        control=control,
        rate_limiter=limiter,
        body_idle_timeout_s=settings.body_idle_timeout_s,
    )
    grace = settings.stop_grace_s
    runners = [await _serve_http(http.app, settings.host, settings.http_port, "HTTP", grace, tls)]
    if control == "elsewhere":
        ctl = HttpFrontend(dp, settings.max_request_bytes, settings.max_json_depth, access=access, control="only")
        runners.append(
            await _serve_http(ctl.app, settings.control_host, settings.control_port, "model control", grace, tls)
        )
    if access.enabled:
        log.info(
            "authentication on: %d inference token(s), %d admin token(s)", len(access.inference), len(access.admin)
        )
    if settings.metrics_port:
        runners.append(await _serve_http(metrics_app(dp), settings.host, settings.metrics_port, "metrics", grace))
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
    return 0
