"""TensorFlow Serving's gRPC services on the V2 gRPC server (same port, auth, TLS, rate limits).

Registered with generic handlers under the real method paths, ``/tensorflow.serving.PredictionService/
Predict`` etc., so the stock ``tensorflow-serving-api`` stubs work unchanged; the messages are our
wire-compatible copies (``protos/tf_serving.proto``). Classify, Regress, MultiInference and
HandleReloadConfigRequest answer UNIMPLEMENTED.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from dl_inference.dataplane import DataPlane
from dl_inference.frontends.grpc_calls import rate_limit, unary
from dl_inference.protocol.generated import tf_serving_pb2 as tfs
from dl_inference.protocol.tfserving import parse_request, requested_version
from dl_inference.security import RateLimiter
from dl_inference.tfserving_api import TfServingApi

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"

_NOT_IMPLEMENTED = {
    (PREDICTION_SERVICE, "Classify"): "it needs a TensorFlow classification signature over tf.Example inputs",
    (PREDICTION_SERVICE, "Regress"): "it needs a TensorFlow regression signature over tf.Example inputs",
    (PREDICTION_SERVICE, "MultiInference"): "it runs Classify and Regress signatures over tf.Example inputs",
    (MODEL_SERVICE, "HandleReloadConfigRequest"): (
        "models are loaded from the model repository; use the V2 repository API "
        "(POST /v2/repository/models/{name}/load) in explicit model control mode"
    ),
}


def _unimplemented(service: str, method: str, why: str) -> grpc.RpcMethodHandler:
    message = f"{service}/{method} is not implemented by this server: {why}; use Predict"

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
        return b""  # pragma: no cover - abort raises

    return grpc.unary_unary_rpc_method_handler(handler)


def _parsed(fn: Callable[[Any, Any], Awaitable[Any]], message_class: Any) -> grpc.RpcMethodHandler:
    """A unary handler that parses its request itself, so bytes that do not decode are an
    INVALID_ARGUMENT (grpc's deserializer would answer UNKNOWN and log a traceback)."""

    async def handler(data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        response = await fn(parse_request(message_class, data), ctx)
        return bytes(response.SerializeToString())

    return unary(handler, None)


def tfserving_handlers(
    dp: DataPlane, limiter: RateLimiter | None = None, max_request_bytes: int | None = None
) -> tuple[grpc.GenericRpcHandler, ...]:
    """Generic handlers for PredictionService and ModelService, served from ``dp``."""
    api = TfServingApi(dp, max_request_bytes)

    async def predict(req: tfs.PredictRequest, ctx: grpc.aio.ServicerContext) -> tfs.PredictResponse:
        rate_limit(limiter, ctx)
        remaining = ctx.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        return await api.predict(req, deadline)

    async def get_model_metadata(req: tfs.GetModelMetadataRequest, ctx: Any) -> tfs.GetModelMetadataResponse:
        return api.metadata(req.model_spec.name, requested_version(req.model_spec), list(req.metadata_field))

    async def get_model_status(req: tfs.GetModelStatusRequest, ctx: Any) -> tfs.GetModelStatusResponse:
        return await api.status(req.model_spec.name, requested_version(req.model_spec))

    prediction: dict[str, grpc.RpcMethodHandler] = {
        "Predict": _parsed(predict, tfs.PredictRequest),
        "GetModelMetadata": _parsed(get_model_metadata, tfs.GetModelMetadataRequest),
    }
    model: dict[str, grpc.RpcMethodHandler] = {"GetModelStatus": _parsed(get_model_status, tfs.GetModelStatusRequest)}
    for (service, method), why in _NOT_IMPLEMENTED.items():
        (prediction if service == PREDICTION_SERVICE else model)[method] = _unimplemented(service, method, why)
    return (
        grpc.method_handlers_generic_handler(PREDICTION_SERVICE, prediction),
        grpc.method_handlers_generic_handler(MODEL_SERVICE, model),
    )
