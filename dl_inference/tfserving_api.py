"""The TensorFlow Serving API over a V2 data plane, transport-free: the gRPC and REST frontends both
call :class:`TfServingApi` and only convert bytes and map errors.

Every request becomes one V2 ``ModelInfer`` for :meth:`DataPlane.infer`, so TF-Serving clients reach
every backend. Signatures: a V2 model has one. ``""`` and ``serving_default`` name it, and so does
the name in the model config's ``signature_name`` parameter when there is one (a SavedModel served
under another signature); GetModelMetadata lists those names.
"""

from __future__ import annotations

from dl_inference import offload
from dl_inference.dataplane import DataPlane
from dl_inference.errors import InvalidArgument, ServerError, Unimplemented
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import tf_serving_pb2 as tfs
from dl_inference.protocol.tfserving import (
    DEFAULT_SIGNATURE,
    VersionState,
    check_signature,
    infer_to_predict,
    metadata_response,
    predict_to_infer,
    requested_version,
    status_response,
)
from dl_inference.protocol.tfserving_json import predict_body_to_infer, render_predict_body

SIGNATURE_PARAMETER = "signature_name"  # model-config parameter naming a SavedModel's signature


class TfServingApi:
    """PredictionService.Predict / GetModelMetadata and ModelService.GetModelStatus on a data plane."""

    def __init__(self, dp: DataPlane, max_request_bytes: int | None = None) -> None:
        self.dp = dp
        self.max_request_bytes = max_request_bytes  # what one value filling a shape may expand to

    # -- signatures -----------------------------------------------------------------------------
    def model_signature(self, name: str, version: str) -> str:
        """The signature name the model's config gives (``serving_default`` when it gives none)."""
        config = self.dp.model_config(name, version)
        if SIGNATURE_PARAMETER in config.parameters:
            return config.parameters[SIGNATURE_PARAMETER].string_value or DEFAULT_SIGNATURE
        return DEFAULT_SIGNATURE

    def signature(self, name: str, version: str, requested: str) -> str:
        """The signature a request names, resolved (InvalidArgument for one the model lacks)."""
        if requested in ("", DEFAULT_SIGNATURE):  # the common case needs no config look-up
            return DEFAULT_SIGNATURE
        return check_signature(requested, name, self.model_signature(name, version))

    # -- predict --------------------------------------------------------------------------------
    async def predict(self, request: tfs.PredictRequest, deadline: float | None = None) -> tfs.PredictResponse:
        name = request.model_spec.name
        if not name:
            raise InvalidArgument("model_spec.name is empty: name the model to run")
        version = requested_version(request.model_spec)
        signature = self.signature(name, version, request.model_spec.signature_name)
        infer = predict_to_infer(request, version, self.max_request_bytes)
        reply = await self.dp.infer(infer.SerializeToString(), name, version, deadline)
        return infer_to_predict(pb.ModelInferResponse.FromString(reply), request.output_filter, name, signature)

    async def predict_json(self, name: str, version: str, body: bytes, max_json_depth: int) -> bytes:
        """A REST ``:predict`` body in, the answer body out (row or columnar, as asked)."""
        metadata = self.dp.model_metadata(name, version).SerializeToString()
        payload, (signature, row) = await offload.call(
            predict_body_to_infer, body, max_json_depth, metadata, name, version
        )
        self.signature(name, version, signature)
        reply = await self.dp.infer(payload, name, version)
        return (await offload.call(render_predict_body, reply, row))[0]

    # -- metadata -------------------------------------------------------------------------------
    def _served_version(self, name: str, version: str, versions: list[str]) -> str:
        """The version a request without one is served by: the newest ready one."""
        if version:
            return version
        numbered = sorted((v for v in versions if v.isdigit()), key=int, reverse=True)
        for candidate in numbered:
            if self.dp.model_ready(name, candidate):
                return candidate
        return numbered[0] if numbered else ""

    def metadata(self, name: str, version: str, fields: list[str] | None = None) -> tfs.GetModelMetadataResponse:
        """GetModelMetadata: ``signature_def`` is the one metadata field there is."""
        if not name:
            raise InvalidArgument("model_spec.name is empty: name the model")
        if fields is not None:
            if not fields:
                raise InvalidArgument("metadata_field is empty: ask for 'signature_def'")
            unsupported = [f for f in fields if f != "signature_def"]
            if unsupported:
                raise InvalidArgument(
                    f"metadata field(s) {', '.join(repr(f) for f in unsupported)} are not supported; "
                    f"this server supports 'signature_def'"
                )
        meta = self.dp.model_metadata(name, version)
        served = self._served_version(name, version, list(meta.versions))
        own = self.model_signature(name, version)
        names = (DEFAULT_SIGNATURE,) if own == DEFAULT_SIGNATURE else (DEFAULT_SIGNATURE, own)
        return metadata_response(name, served, meta, names)

    # -- status ---------------------------------------------------------------------------------
    async def _states(self, name: str) -> list[VersionState]:
        try:
            index = await self.dp.repository_index(False)
        except Unimplemented:  # a data plane without a repository: what it serves is ready or not
            try:
                versions = list(self.dp.model_metadata(name, "").versions)
            except ServerError:
                return []
            return [VersionState(v, "READY" if self.dp.model_ready(name, v) else "UNAVAILABLE") for v in versions]
        return [VersionState(m.version, m.state, m.reason) for m in index.models if m.name == name]

    async def status(self, name: str, version: str) -> tfs.GetModelStatusResponse:
        if not name:
            raise InvalidArgument("model_spec.name is empty: name the model")
        return status_response(name, version, await self._states(name))
