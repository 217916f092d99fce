"""A V2 gRPC pass-through proxy that delays every ModelInfer: a slow node for balancing tests.

    python -m load_tests.delay_proxy --port 9100 --target 127.0.0.1:9001 --delay-ms 20

Every unary method of ``inference.GRPCInferenceService`` and ``grpc.health.v1.Health/Check`` is
forwarded byte-for-byte to the target (status codes and messages too); ModelInfer waits
``--delay-ms`` first. Nothing is parsed, so the proxy adds only its own hop and the delay.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

FORWARDED = ("inference.GRPCInferenceService", "grpc.health.v1.Health")


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel, delay_s: float) -> None:
        self.channel = channel
        self.delay_s = delay_s

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if not method.lstrip("/").startswith(FORWARDED) or method.endswith(("StreamInfer", "/Watch")):
            return None
        stub = self.channel.unary_unary(method)
        delay = self.delay_s if method.endswith("/ModelInfer") else 0.0

        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if delay:
                await asyncio.sleep(delay)
            remaining = context.time_remaining()
            try:
                reply: bytes = await stub(request, timeout=remaining)
                return reply
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
                raise

        return grpc.unary_unary_rpc_method_handler(handler)


async def run(port: int, target: str, delay_ms: float, host: str = "127.0.0.1") -> None:
    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((_Forwarder(channel, delay_ms / 1e3),))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"delay proxy {host}:{port} -> {target} (+{delay_ms:g} ms per ModelInfer)", flush=True)
    await stop.wait()
    await server.stop(0.5)
    await channel.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--target", required=True, help="host:port of the V2 gRPC server behind the proxy")
    p.add_argument("--delay-ms", type=float, default=20.0)
    args = p.parse_args()
    asyncio.run(run(args.port, args.target, args.delay_ms))


if __name__ == "__main__":
    main()
