"""Triton's shared-memory extensions over HTTP (same auth and error bodies as inference).

``GET v2/{systemsharedmemory,cudasharedmemory}[/region/{name}]/status`` (a JSON list of regions),
``POST .../region/{name}/register`` (system: ``{"key", "offset", "byte_size"}``; CUDA:
``{"raw_handle": {"b64": ...}, "device_id", "byte_size"}``) and ``POST .../[region/{name}/]unregister``.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dl_inference.errors import InvalidArgument
from dl_inference.sharedmem.params import CUDA, SYSTEM

if TYPE_CHECKING:
    from dl_inference.frontends.http_server import HttpFrontend

_PATHS = {SYSTEM: "/v2/systemsharedmemory", CUDA: "/v2/cudasharedmemory"}


def _count(body: dict[str, Any], key: str, what: str, default: int | None = None) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{what}: '{key}' must be a non-negative integer, got {json.dumps(value)}")
    return value


def add_shared_memory_routes(router: web.UrlDispatcher, frontend: HttpFrontend) -> None:
    dp = frontend.dp

    def status(kind: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            regions = await dp.shared_memory_status(kind, request.match_info.get("name", ""))
            return web.json_response([r.status() for r in regions])

        return handler

    async def register_system(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await frontend._body_json(request)
        what = f"shared-memory region '{name}'"
        key = body.get("key")
        if not isinstance(key, str):
            raise InvalidArgument(f"{what}: 'key' must be a string, got {json.dumps(key)}")
        offset = _count(body, "offset", what, 0)
        await dp.register_system_shared_memory(name, key, offset, _count(body, "byte_size", what))
        return web.Response(status=200)

    async def register_cuda(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await frontend._body_json(request)
        what = f"CUDA shared-memory region '{name}'"
        handle = body.get("raw_handle")
        if not isinstance(handle, dict) or not isinstance(handle.get("b64"), str):
            raise InvalidArgument(f'{what}: \'raw_handle\' must be {{"b64": "<base64 cudaIpcMemHandle_t>"}}')
        try:
            raw = base64.b64decode(handle["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"{what}: 'raw_handle.b64' is not base64") from None
        device_id = _count(body, "device_id", what, 0)
        await dp.register_cuda_shared_memory(name, raw, device_id, _count(body, "byte_size", what))
        return web.Response(status=200)

    def unregister(kind: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            await dp.unregister_shared_memory(kind, request.match_info.get("name", ""))
            return web.Response(status=200)

        return handler

    for kind, base in _PATHS.items():
        router.add_get(base + "/status", status(kind))
        router.add_get(base + "/region/{name}/status", status(kind))
        router.add_post(base + "/unregister", unregister(kind))
        router.add_post(base + "/region/{name}/unregister", unregister(kind))
    router.add_post(_PATHS[SYSTEM] + "/region/{name}/register", register_system)
    router.add_post(_PATHS[CUDA] + "/region/{name}/register", register_cuda)
