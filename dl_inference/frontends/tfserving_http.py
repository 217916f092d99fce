"""TensorFlow Serving's REST API on the V2 HTTP port (same auth, limits and error bodies).

``POST /v1/models/{m}[/versions/{v}|/labels/{l}]:predict`` (row form ``{"instances": ...}`` or
columnar form ``{"inputs": ...}``), ``GET /v1/models/{m}[/versions/{v}|/labels/{l}]`` (model status)
and ``GET .../metadata``. Errors are ``{"error": "..."}`` with the status of the project's code table.

Version labels: this server has no label configuration, so ``labels/{l}`` works only when ``l`` is
a version number (it then means that version); any other label is a 400 that says so.
``:classify`` and ``:regress`` answer 501. A model whose name contains ``:`` cannot be reached here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from dl_inference.errors import InvalidArgument, Unimplemented
from dl_inference.protocol.generated import tf_serving_pb2 as tfs
from dl_inference.protocol.tfserving import label_to_version
from dl_inference.security import client_key, token_from_headers
from dl_inference.tfserving_api import TfServingApi

if TYPE_CHECKING:
    from dl_inference.frontends.http_server import HttpFrontend

# A path segment without '/' or ':' (aiohttp's default {name} would swallow ":predict").
_SEG = "[^/:]+"
PREFIXES = (
    f"/v1/models/{{model:{_SEG}}}",
    f"/v1/models/{{model:{_SEG}}}/versions/{{version:{_SEG}}}",
    f"/v1/models/{{model:{_SEG}}}/labels/{{label:{_SEG}}}",
)


def _proto_json(message: Message) -> dict[str, Any]:
    """Proto3 JSON as TF-Serving writes it: field names as in the .proto, defaults included."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _json(body: bytes | dict[str, Any]) -> web.Response:
    if isinstance(body, dict):
        return web.json_response(body)
    return web.Response(body=body, content_type="application/json")


class TfServingRoutes:
    """The TF-Serving REST handlers of one HttpFrontend (its data plane, limits and rate limiter)."""

    def __init__(self, frontend: HttpFrontend) -> None:
        self.frontend = frontend
        self.api = TfServingApi(frontend.dp, frontend.max_request_bytes)

    @staticmethod
    def _target(request: web.Request) -> tuple[str, str]:
        """(model, V2 version) named by the URL; "" is the latest version."""
        info = request.match_info
        if "label" in info:
            return info["model"], label_to_version(info["label"])
        version = info.get("version", "")
        if version and not (version.isascii() and version.isdigit()):
            raise InvalidArgument(f"version '{version}' in the URL is not a version number")
        return info["model"], str(int(version)) if version else ""

    async def predict(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if method in ("classify", "regress"):
            raise Unimplemented(
                f":{method} is not implemented by this server (it needs a TensorFlow {method} signature over "
                f"tf.Example inputs); use :predict"
            )
        if method != "predict":
            raise InvalidArgument(f"unknown method ':{method}' in {request.path}; this server serves ':predict'")
        name, version = self._target(request)
        frontend = self.frontend
        if frontend.rate_limiter is not None:  # as the V2 /infer route: before any work is done
            token = token_from_headers(request.headers.get("Authorization"), request.headers.get("X-API-Key"))
            frontend.rate_limiter.check(client_key(token, request.remote))
        body = await frontend._read_body(request)
        return _json(await self.api.predict_json(name, version, body, frontend.max_json_depth))

    async def status(self, request: web.Request) -> web.Response:
        return _json(_proto_json(await self.api.status(*self._target(request))))

    async def metadata(self, request: web.Request) -> web.Response:
        response = self.api.metadata(*self._target(request))
        signatures = tfs.SignatureDefMap.FromString(response.metadata["signature_def"].value)
        return _json(
            {"model_spec": _proto_json(response.model_spec), "metadata": {"signature_def": _proto_json(signatures)}}
        )


def add_tfserving_routes(router: web.UrlDispatcher, frontend: HttpFrontend) -> None:
    """Register the TF-Serving REST routes on ``frontend``'s router."""
    routes = TfServingRoutes(frontend)
    for prefix in PREFIXES:
        router.add_post(f"{prefix}:{{method:{_SEG}}}", routes.predict)
        router.add_get(prefix, routes.status)
        router.add_get(prefix + "/metadata", routes.metadata)
