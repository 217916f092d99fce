"""Runs V2 requests against one loaded backend: validate, decode, infer, encode.

Everything here is transport-free apart from the V2 protobuf messages that are this hop's payload.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from dl_inference.backends.base import Backend
from dl_inference.errors import InternalError, InvalidArgument, NotFound, ServerError
from dl_inference.protocol.framing import ExecStats
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.protocol.model_info import dtype_name
from dl_inference.protocol.tensors import build_response, decode_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None
    optional: bool = False


def _specs(tensors: Sequence[mc.ModelInput] | Sequence[mc.ModelOutput]) -> dict[str, TensorSpec]:
    specs: dict[str, TensorSpec] = {}
    for t in tensors:
        reshape = tuple(t.reshape.shape) if t.HasField("reshape") else None
        specs[t.name] = TensorSpec(
            t.name, dtype_name(t.data_type), tuple(t.dims), reshape, bool(getattr(t, "optional", False))
        )
    return specs


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class ModelRunner:
    """One model instance's request path. ``run`` is called from the instance's execution thread."""

    def __init__(self, backend: Backend, config: mc.ModelConfig, version: str) -> None:
        self.backend = backend
        self.config = config
        self.version = version
        self.name = config.name
        self.max_batch_size = config.max_batch_size
        self.inputs = _specs(config.input)
        self.outputs = _specs(config.output)
        self.output_order = [t.name for t in config.output]

    # -- validation ---------------------------------------------------------------------------
    def _check_inputs(self, request: pb.ModelInferRequest) -> int:
        """Check names, datatypes and shapes against the config; return the request's batch size."""
        seen: set[str] = set()
        batch = 0
        for tensor in request.inputs:
            spec = self.inputs.get(tensor.name)
            if spec is None:
                raise InvalidArgument(
                    f"unexpected inference input '{tensor.name}' for model '{self.name}', "
                    f"expected one of: {', '.join(self.inputs)}"
                )
            if tensor.name in seen:
                raise InvalidArgument(f"input '{tensor.name}' is given more than once")
            seen.add(tensor.name)
            if tensor.datatype != spec.datatype:
                raise InvalidArgument(
                    f"input '{tensor.name}': expected datatype {spec.datatype}, got {tensor.datatype}"
                )
            shape = list(tensor.shape)
            expected = [-1, *spec.dims] if self.max_batch_size > 0 else list(spec.dims)
            ok = len(shape) == len(expected) and all(e == -1 or e == s for e, s in zip(expected, shape))
            if not ok or any(s < 0 for s in shape):
                raise InvalidArgument(
                    f"input '{tensor.name}': expected shape {_fmt(expected)}, got {_fmt(shape)}"
                )
            if self.max_batch_size > 0:
                b = shape[0]
                if b < 1 or b > self.max_batch_size:
                    raise InvalidArgument(
                        f"input '{tensor.name}': batch size {b} is outside 1..{self.max_batch_size} "
                        f"(max_batch_size of model '{self.name}')"
                    )
                if batch and b != batch:
                    raise InvalidArgument(
                        f"input '{tensor.name}': batch size {b} differs from other inputs' {batch}"
                    )
                batch = b
        missing = [n for n, s in self.inputs.items() if n not in seen and not s.optional]
        if missing:
            raise InvalidArgument(
                f"model '{self.name}' expects input(s) {', '.join(repr(m) for m in missing)}, "
                f"which the request does not give"
            )
        return batch or 1

    def _requested_outputs(self, request: pb.ModelInferRequest) -> list[str]:
        if not request.outputs:
            return self.output_order
        names = []
        for out in request.outputs:
            if out.name not in self.outputs:
                raise InvalidArgument(
                    f"unexpected inference output '{out.name}' for model '{self.name}', "
                    f"expected one of: {', '.join(self.output_order)}"
                )
            names.append(out.name)
        return names

    # -- execution ----------------------------------------------------------------------------
    def run(self, payload: bytes, enqueued_ns: int) -> tuple[bytes | None, ExecStats, ServerError | None]:
        """Serve one serialized request; return the serialized response.

        Never raises: errors come back as the third element.
        """
        start = time.monotonic_ns()
        stats = ExecStats(queue_ns=max(start - enqueued_ns, 0))
        try:
            try:
                request = pb.ModelInferRequest.FromString(payload)
            except DecodeError as exc:
                raise InvalidArgument(f"malformed ModelInferRequest: {exc}") from None
            if request.model_name and request.model_name != self.name:
                raise NotFound(f"unknown model '{request.model_name}' (this worker serves '{self.name}')")
            batch = self._check_inputs(request)
            output_names = self._requested_outputs(request)
            inputs = decode_inputs(request)
            for name, arr in list(inputs.items()):
                reshape = self.inputs[name].reshape
                if reshape is not None:
                    lead = [arr.shape[0]] if self.max_batch_size > 0 else []
                    inputs[name] = arr.reshape([*lead, *reshape])
            t_in = time.monotonic_ns()
            results = self.backend.infer(inputs, output_names)
            t_run = time.monotonic_ns()
            outputs = [(name, self._shape_output(name, results, batch)) for name in output_names]
            response = build_response(self.name, self.version, request.id, outputs).SerializeToString()
            t_out = time.monotonic_ns()
        except ServerError as exc:
            return None, stats, exc
        except Exception as exc:  # backend bug or framework error: report, keep serving
            log.exception("inference failed for model '%s'", self.name)
            return None, stats, InternalError(f"inference failed for model '{self.name}': {exc}")
        stats.compute_input_ns = t_in - start
        stats.compute_infer_ns = t_run - t_in
        stats.compute_output_ns = t_out - t_run
        stats.batch_size = batch
        stats.counts_execution = True
        return response, stats, None

    def _shape_output(self, name: str, results: dict[str, np.ndarray], batch: int) -> np.ndarray:
        try:
            arr = results[name]
        except KeyError:
            raise InternalError(f"model '{self.name}' did not produce output '{name}'") from None
        spec = self.outputs[name]
        if spec.reshape is not None:
            lead = [batch] if self.max_batch_size > 0 else []
            target = [*lead, *spec.dims]
            if all(d >= 0 for d in target) and math.prod(target) == arr.size:
                arr = arr.reshape(target)
        return arr
