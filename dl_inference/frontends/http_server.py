"""V2 HTTP/REST frontend (aiohttp) and the Prometheus metrics endpoint.

Routes mirror KServe V2 / Triton. Errors are ``{"error": "..."}`` with the status from
``errors.HTTP_STATUS``; live/ready answer 200 with an empty body, else 400 (as Triton does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import http_exceptions, web, web_protocol

from dl_inference import offload
from dl_inference.dataplane import DataPlane
from dl_inference.errors import InvalidArgument, ServerError
from dl_inference.frontends import aiohttp_patches
from dl_inference.frontends.http_shared_memory import add_shared_memory_routes
from dl_inference.frontends.tfserving_http import add_tfserving_routes
from dl_inference.protocol.datatypes import element_size
from dl_inference.protocol.http_codec import json_object, parse_infer_body, render_error, render_infer_body
from dl_inference.protocol.jsonview import to_json
from dl_inference.security import (
    AccessPolicy,
    PermissionDenied,
    RateLimiter,
    Role,
    client_key,
    http_role,
    token_from_headers,
)

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


def _error(message: str, status: int) -> web.Response:
    if status == 401:
        return web.Response(
            body=render_error(message),
            status=status,
            content_type="application/json",
            headers={"WWW-Authenticate": 'Bearer realm="dl_inference"'},
        )
    return web.Response(body=render_error(message), status=status, content_type="application/json")


def _flag(ok: bool) -> web.Response:
    return web.Response(status=200 if ok else 400)


class HttpFrontend:
    """``control``: where the model-control routes are — "here", "elsewhere" (its own port),
    "disabled", or "only" (this app is that port: health and model control, nothing else)."""

    def __init__(
        self,
        dp: DataPlane,
        max_request_bytes: int,
        max_json_depth: int = 64,
        access: AccessPolicy | None = None,
        control: str = "here",
        rate_limiter: RateLimiter | None = None,
        body_idle_timeout_s: float = 10.0,
    ) -> None:
        aiohttp_patches.install()
        self.dp = dp
        self.body_idle_timeout_s = body_idle_timeout_s
        self.rate_limiter = rate_limiter
        self.max_request_bytes = max_request_bytes
        self.max_json_depth = max_json_depth
        self.access = access or AccessPolicy()
        self.control = control
        self.app = web.Application(client_max_size=max_request_bytes, middlewares=[self._errors, self._auth])
        r = self.app.router
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_post("/v2/repository/models/{model}/load", self.load)
        r.add_post("/v2/repository/models/{model}/unload", self.unload)
        if control == "only":
            return
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/models/stats", self.stats)
        r.add_get("/v2/endpoints", self.endpoints)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.model_metadata)
            r.add_get(prefix + "/ready", self.model_ready)
            r.add_get(prefix + "/config", self.model_config)
            r.add_get(prefix + "/stats", self.stats)
            r.add_post(prefix + "/infer", self.infer)
        add_tfserving_routes(r, self)  # TF-Serving REST: /v1/models/{m}[...]:predict, status, metadata
        add_shared_memory_routes(r, self)  # v2/systemsharedmemory/..., v2/cudasharedmemory/...

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await self._answer(request, handler)
        if (
            "Content-Encoding" in request.headers
            and not request.content.is_eof()
            and isinstance(response, web.Response)
            and not response.prepared
        ):
            # Answered without reading a compressed body (404, 401, 429...): aiohttp then drains it,
            # and if it does not decompress it drops the connection. Say so in the answer, so that
            # a keep-alive client does not send its next request into a closed socket.
            response.force_close()
        return response

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ServerError as exc:
            return _error(exc.message, exc.http_status)
        except web.HTTPRequestEntityTooLarge:
            response = _error(
                f"request body exceeds the server's limit of {self.max_request_bytes} bytes "
                f"(setting max_request_bytes)",
                413,
            )
            response.force_close()  # the rest of the body is unread: say the connection ends here
            return response
        except web_protocol.RequestPayloadError as exc:
            # The body could not be read (corrupt Content-Encoding data, bad chunked framing): the client's fault.
            # aiohttp drops the connection after such a body, so the answer says "Connection: close"
            # and a keep-alive client does not send its next request into a closed socket.
            cause = exc.__cause__
            detail = cause.message if isinstance(cause, http_exceptions.HttpProcessingError) else str(exc)
            response = _error(f"cannot read the request body: {detail}", 400)
            response.force_close()
            return response
        except web.HTTPException as exc:
            if exc.status >= 400:
                return _error(exc.reason or str(exc), exc.status)
            raise
        except ConnectionResetError:  # the client left before its body was complete: not a server fault
            log.info("client closed the connection while sending %s %s", request.method, request.path)
            response = _error("the client closed the connection before the request body was complete", 499)
            response.force_close()
            return response
        except Exception as exc:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _error(f"internal error: {exc}", 500)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        role = http_role(request.path)
        if role == Role.CONTROL and self.control in ("elsewhere", "disabled"):
            where = "its own port (setting control_port)" if self.control == "elsewhere" else "nowhere"
            raise PermissionDenied(f"the model-control API is not served on this port: it is served {where}")
        token = token_from_headers(request.headers.get("Authorization"), request.headers.get("X-API-Key"))
        self.access.check(role, token)
        if self.rate_limiter is not None and request.method == "POST" and request.path.endswith("/infer"):
            self.rate_limiter.check(client_key(token, request.remote))
        return await handler(request)

    @staticmethod
    def _mv(request: web.Request) -> tuple[str, str]:
        return request.match_info.get("model", ""), request.match_info.get("version", "")

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(to_json(self.dp.server_metadata()))

    async def live(self, request: web.Request) -> web.Response:
        return _flag(self.dp.live())

    async def ready(self, request: web.Request) -> web.Response:
        return _flag(self.dp.ready())

    async def model_ready(self, request: web.Request) -> web.Response:
        return _flag(self.dp.model_ready(*self._mv(request)))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(to_json(self.dp.model_metadata(*self._mv(request))))

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(to_json(self.dp.model_config(*self._mv(request))))

    async def stats(self, request: web.Request) -> web.Response:
        return _json(to_json(await self.dp.model_statistics(*self._mv(request))))

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole (decompressed) body, refused once it passes max_request_bytes (413) or when no
        data arrives for ``body_idle_timeout_s`` (a stalled or never-ending body must not hold the
        request, and its memory, forever: slow-client attacks, or a compressed body that the decoder
        keeps waiting on)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = await asyncio.wait_for(request.content.readany(), self.body_idle_timeout_s)
            except TimeoutError:
                raise InvalidArgument(
                    f"request body stalled: no data for {self.body_idle_timeout_s:g} s after {size} bytes "
                    f"(setting body_idle_timeout_s)"
                ) from None
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_request_bytes:
                raise web.HTTPRequestEntityTooLarge(max_size=self.max_request_bytes, actual_size=size)
            chunks.append(chunk)

    async def _body_json(self, request: web.Request) -> dict[str, Any]:
        body = await self._read_body(request)
        if not body:
            return {}
        return (await offload.call(json_object, body))[1]

    async def repository_index(self, request: web.Request) -> web.Response:
        data = await self._body_json(request)
        index = await self.dp.repository_index(bool(data.get("ready", False)))
        return _json([to_json(m, defaults=False) for m in index.models])

    async def load(self, request: web.Request) -> web.Response:
        data = await self._body_json(request)
        params = data.get("parameters", {})
        if not isinstance(params, dict):
            raise InvalidArgument("'parameters' must be a JSON object")
        await self.dp.load_model(request.match_info["model"], params)
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await self.dp.unload_model(request.match_info["model"])
        return web.Response(status=200)

    def _raw_input(self, name: str, version: str, nbytes: int) -> tuple[str, str, list[int]]:
        """Name/datatype/shape of the only input, for a header-less raw binary request."""
        meta = self.dp.model_metadata(name, version)
        if len(meta.inputs) != 1:
            raise InvalidArgument(
                f"a raw binary request (Inference-Header-Content-Length: 0) needs a model with exactly "
                f"one input; model '{name}' has {len(meta.inputs)}"
            )
        tensor = meta.inputs[0]
        shape = list(tensor.shape)
        size = element_size(tensor.datatype)
        unknown = [i for i, d in enumerate(shape) if d < 0]
        if unknown and size is not None and len(unknown) == 1:
            known = 1
            for d in shape:
                known *= d if d >= 0 else 1
            if known == 0:  # no elements whatever the variable dimension is: the body cannot tell it
                raise InvalidArgument(
                    f"input '{tensor.name}' has shape {shape}, which holds no elements; a raw binary request "
                    f"cannot say its shape"
                )
            if nbytes % (known * size):
                raise InvalidArgument(
                    f"input '{tensor.name}': {nbytes} bytes is not a whole number of {tensor.datatype} "
                    f"elements of shape {shape}"
                )
            shape[unknown[0]] = nbytes // (known * size)
        elif unknown:
            raise InvalidArgument(f"input '{tensor.name}' has shape {shape}; a raw binary request cannot say its shape")
        return tensor.name, tensor.datatype, shape

    async def endpoints(self, request: web.Request) -> web.Response:
        return _json(await self.dp.endpoint_table())

    async def infer(self, request: web.Request) -> web.Response:
        name, version = self._mv(request)
        body = await self._read_body(request)
        header = request.headers.get(HEADER_LENGTH)
        header_length = None
        raw_input = None
        if header is not None:
            try:
                header_length = int(header)
            except ValueError:
                raise InvalidArgument(f"{HEADER_LENGTH} must be an integer, got '{header}'") from None
            if header_length < 0 or header_length > len(body):
                raise InvalidArgument(f"{HEADER_LENGTH} {header_length} is outside the body's {len(body)} bytes")
            if header_length == 0:
                raw_input = self._raw_input(name, version, len(body))
        # A large JSON part is parsed in a helper process (see offload): C parsers hold the GIL.
        payload, extras = await offload.call(
            parse_infer_body, body, header_length, name, version, self.max_json_depth, raw_input,
            cost=len(body) if header_length is None else header_length,
        )  # fmt: skip
        deadline = None
        if extras.timeout_us > 0:  # Triton's request timeout, in microseconds
            deadline = time.monotonic() + extras.timeout_us / 1e6
        infer = self.dp.infer_shared if extras.shared else self.dp.infer
        reply = await infer(payload, name, version, deadline)
        policy = extras.policy
        all_binary = policy.binary_data_output and all(policy.binary_outputs.values())
        out_body, json_length = await offload.call(
            render_infer_body, reply, policy, cost=0 if all_binary else len(reply)
        )
        if json_length is None:
            return web.Response(body=out_body, content_type="application/json")
        return web.Response(
            body=out_body,
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(json_length)},
        )


def metrics_app(dp: DataPlane) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=await dp.metrics_text(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app
