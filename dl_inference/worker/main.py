"""Worker process entry point: load one model instance, then serve it.

Spawned by the gateway with ``--connect SOCKET`` and its token in ``DL_INFERENCE_WORKER_TOKEN`` (not on
the command line, which every local user can read): the worker loads its model, connects to the
gateway's Unix socket and says HELLO (or LOAD_FAILED with the reason), then serves framed
requests until the gateway goes away. With ``--grpc-port`` it also (or only) serves V2 gRPC, so it
can be a standalone node behind another gateway; ``--auth-token-file`` and ``--tls-cert/--tls-key
[--tls-ca]`` protect that port as they protect a gateway's (tokens, TLS, mutual TLS).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import itertools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from dl_inference.errors import WIRE_CODE, ServerError
from dl_inference.memtrim import trim_every
from dl_inference.protocol.framing import WORKER_TOKEN_ENV, ExecStats, FrameProtocol, Kind, pack_token
from dl_inference.security import AccessPolicy, TlsSettings
from dl_inference.worker.executor import InstanceExecutor
from dl_inference.worker.loader import LoadedModel, load_model_version

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0  # a standalone worker's in-flight requests get this long at SIGTERM
TRIM_EVERY_S = 60.0  # as the gateway's default memory_trim_interval_s


class GatewayLink:
    """The worker's end of one framed connection: the gateway's (the supervisor's) or a frontend's.

    Every link shares the one executor; request ids are each link's own, so they are mapped to ids
    unique in this worker (and back for the answer).
    """

    _ids = itertools.count(1)

    def __init__(self, executor: InstanceExecutor, on_closed: Callable[[], None]) -> None:
        self.executor = executor
        self.on_closed = on_closed
        self.proto = FrameProtocol(self._on_frame, self._on_lost)
        self._mine: dict[int, int] = {}  # link's request id -> executor's

    def _on_frame(self, kind: Kind, rid: int, code: int, stats: ExecStats | None, payload: bytes) -> None:
        if kind is Kind.INFER:
            xid = next(self._ids)
            self._mine[rid] = xid
            self.executor.submit(xid, payload, lambda _xid, body, st, err: self._reply(rid, body, st, err))
        elif kind is Kind.CANCEL:
            queued = self._mine.pop(rid, 0)  # ids start at 1
            if queued:
                self.executor.cancel(queued)
        elif kind is Kind.PING:
            self.proto.send(Kind.PONG, rid, b"", urgent=True)
        elif kind is Kind.FORGET_REGIONS:
            self.executor.runner.regions.forget(json.loads(payload))
        else:
            log.warning("unexpected frame kind %s from gateway", kind)

    def _reply(self, rid: int, body: bytes | None, stats: ExecStats, error: ServerError | None) -> None:
        self._mine.pop(rid, None)
        if error is None:
            assert body is not None
            self.proto.send(Kind.RESULT, rid, body, stats=stats)
        else:
            self.proto.send(Kind.ERROR, rid, error.message.encode(), WIRE_CODE[error.code], stats)

    def _on_lost(self, exc: Exception | None) -> None:
        for xid in self._mine.values():  # nobody is left to answer
            self.executor.cancel(xid)
        self._mine.clear()
        self.on_closed()


def frontend_listener(executor: InstanceExecutor, token: str) -> Callable[[], FrameProtocol]:
    """Protocol factory for the ``--listen`` socket: each connection must first ATTACH with the token."""

    def accept() -> FrameProtocol:
        link = GatewayLink(executor, lambda: None)
        serve = link.proto.on_frame

        def first(kind: Kind, rid: int, code: int, stats: ExecStats | None, payload: bytes) -> None:
            if kind is Kind.ATTACH and hmac.compare_digest(payload, token.encode()):
                link.proto.on_frame = serve
                return
            log.warning("a connection to the frontend socket did not attach (kind %s); closing it", kind)
            if link.proto.transport is not None:
                link.proto.transport.close()

        link.proto.on_frame = first
        return link.proto

    return accept


async def _report_failure(socket_path: str, token: str, reason: str) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    transport, proto = await loop.create_unix_connection(
        lambda: FrameProtocol(lambda *a: None, lambda e: done.set()), socket_path
    )
    proto.send(Kind.LOAD_FAILED, 0, pack_token(token, reason.encode()))
    proto.flush()
    transport.close()
    await asyncio.wait_for(done.wait(), 5)


def grpc_security(args: argparse.Namespace) -> tuple[AccessPolicy, TlsSettings]:
    """The V2 gRPC port's tokens and TLS, from the flags; InvalidArgument naming a bad file."""
    access = AccessPolicy.from_mapping({"tokens_file": args.auth_token_file} if args.auth_token_file else {})
    tls = TlsSettings.from_mapping({"cert": args.tls_cert, "key": args.tls_key, "ca": args.tls_ca})
    return access, tls


async def run_worker(args: argparse.Namespace, access: AccessPolicy, tls: TlsSettings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loaded: LoadedModel = await loop.run_in_executor(
            None,
            load_model_version,
            Path(args.model_repository),
            args.model,
            args.version,
            args.device,
            args.device_id,
            args.max_tensor_elements,
            args.max_bytes_element,
            not args.disable_auto_complete_config,
        )
    except Exception as exc:
        reason = exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
        log.error("model '%s' failed to load: %s", args.model, reason)
        if args.connect:
            await _report_failure(args.connect, args.token, reason)
        return 3

    executor = InstanceExecutor(loaded.runner, loop)
    listener: asyncio.AbstractServer | None = None
    trimmer = asyncio.create_task(trim_every(TRIM_EVERY_S))  # freed request buffers go back to the OS
    waits = [asyncio.create_task(stop.wait())]
    grpc_server = None
    if args.connect:
        link = GatewayLink(executor, stop.set)  # the gateway is gone: this worker's work is over
        await loop.create_unix_connection(lambda: link.proto, args.connect)
        if args.listen:  # before HELLO: frontends may connect as soon as the gateway hears it
            # kept referenced: an unreferenced server may be collected, and closed with it
            listener = await loop.create_unix_server(frontend_listener(executor, args.token), args.listen)
        link.proto.send(Kind.HELLO, 0, pack_token(args.token, loaded.config.SerializeToString()))
    if args.grpc_port is not None:
        from dl_inference.frontends.grpc_server import GrpcServer
        from dl_inference.worker.dataplane import WorkerDataPlane

        dp = WorkerDataPlane(loaded, executor)
        grpc_server = GrpcServer(dp, args.host, args.grpc_port, args.max_request_bytes, access=access, tls=tls)
        await grpc_server.start()
        how = "TLS, client certificates required" if tls.ca else "TLS" if tls.enabled else "plain"
        how += f", {len(access.inference)} token(s) accepted" if access.enabled else ", no token needed"
        log.info("worker for '%s' serving V2 gRPC on %s:%d (%s)", args.model, args.host, grpc_server.port, how)
    await asyncio.wait(waits)
    if grpc_server is not None:  # a rolling update: requests in flight finish, new ones go elsewhere
        await grpc_server.stop(grace=await grpc_server.drain(STOP_GRACE_S))
    trimmer.cancel()
    if listener is not None:
        listener.close()
    executor.close()
    loaded.runner.close()
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repository", required=True, help="model repository directory")
    p.add_argument("--model", required=True, help="model name (directory in the repository)")
    p.add_argument("--version", type=int, default=None, help="version to serve (default: latest by policy)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--device-id", type=int, default=None)
    p.add_argument("--connect", default=None, help=argparse.SUPPRESS)  # gateway's Unix socket
    p.add_argument("--token", default="", help=argparse.SUPPRESS)
    p.add_argument("--listen", default=None, help=argparse.SUPPRESS)  # Unix socket for the gateway's frontends
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--grpc-port", type=int, default=None, help="serve V2 gRPC on this TCP port")
    p.add_argument("--max-request-bytes", type=int, default=96 * 1024 * 1024)
    p.add_argument("--max-tensor-elements", type=int, default=0, help="per input tensor (0: no separate limit)")
    p.add_argument("--max-bytes-element", type=int, default=0, help="largest BYTES element (0: no separate limit)")
    p.add_argument(
        "--disable-auto-complete-config", action="store_true",
        help="take the config as written: it must list its inputs and outputs, and nothing is filled in",
    )  # fmt: skip
    p.add_argument("--auth-token-file", help="--grpc-port: tokens, one per line; calls need 'Authorization: Bearer'")
    p.add_argument("--tls-cert", help="--grpc-port: PEM certificate chain, serve gRPC over TLS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", help="PEM CA: callers must present a certificate it signed (mutual TLS)")


def main(args: argparse.Namespace) -> int:
    if args.connect is None and args.grpc_port is None:
        args.grpc_port = 8001
    if not args.token:  # spawned by a gateway: the token comes in the environment, not on the command line
        args.token = os.environ.pop(WORKER_TOKEN_ENV, "")
    try:  # before the model loads: a bad token or certificate file is an error at once
        access, tls = grpc_security(args)
    except ServerError as exc:
        print(f"dl-inference worker: {exc.message}", file=sys.stderr)
        return 2
    from dl_inference.eventloop import run

    log.debug("worker pid %d", os.getpid())
    return run(run_worker(args, access, tls))
