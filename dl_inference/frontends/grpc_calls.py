"""The call guard every gRPC service of this server shares (V2 and TF-Serving): each handler gets its
request parsed here (a malformed one is INVALID_ARGUMENT naming the message type, not gRPC's UNKNOWN),
its ServerError turned into the matching status code, and the rate limit checked per client."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from dl_inference.errors import InvalidArgument, ServerError
from dl_inference.security import RateLimiter, client_key, token_from_headers


def status_of(exc: ServerError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.code.name]


def unary(fn: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], req_cls: Any) -> grpc.RpcMethodHandler:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            # Parsed here, not by gRPC's request_deserializer: a DecodeError raised there escapes as
            # UNKNOWN with a traceback in the log instead of the client's INVALID_ARGUMENT.
            message = request if req_cls is None else parse(req_cls, request)
            return await fn(message, context)
        except ServerError as exc:
            await context.abort(status_of(exc), exc.message)

    return grpc.unary_unary_rpc_method_handler(
        handler,
        response_serializer=(lambda m: m.SerializeToString()) if req_cls is not None else None,
    )


def parse(req_cls: Any, data: bytes) -> Any:
    try:
        return req_cls.FromString(data)
    except DecodeError:
        raise InvalidArgument(
            f"the request is not a valid {req_cls.DESCRIPTOR.full_name} message ({len(data)} bytes)"
        ) from None


def unimplemented(name: str) -> grpc.RpcMethodHandler:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not supported by this server")
        return b""

    return grpc.unary_unary_rpc_method_handler(handler)


def rate_limit(limiter: RateLimiter | None, ctx: grpc.aio.ServicerContext) -> None:
    if limiter is not None:
        md = {k: v for k, v in (ctx.invocation_metadata() or ()) if isinstance(v, str)}
        limiter.check(client_key(token_from_headers(md.get("authorization"), md.get("x-api-key")), ctx.peer()))
