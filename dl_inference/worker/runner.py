"""Runs V2 requests against one loaded backend: validate and decode each, infer per batch, encode.

Everything here is transport-free apart from the V2 protobuf messages that are this hop's payload.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from dl_inference.backends.base import Backend
from dl_inference.errors import InternalError, InvalidArgument, NotFound, ServerError
from dl_inference.protocol.datatypes import datatype_of, numpy_dtype
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.protocol.model_info import dtype_name
from dl_inference.protocol.tensors import SharedReader, build_response, decode_inputs, decode_request, nonnegative_int
from dl_inference.sharedmem.cuda import DeviceParts
from dl_inference.sharedmem.mapping import HostPinning, RegionMaps
from dl_inference.sharedmem.params import (
    BYTE_SIZE,
    LOCATIONS,
    OFFSET,
    REGION,
    Location,
    TensorRef,
    decode_locations,
    tensor_ref,
)
from dl_inference.worker.handler import Handler, config_parameters, request_parameters

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


@dataclass(slots=True)
class Prepared:
    """One validated request, decoded and ready to join a batch."""

    request_id: str
    inputs: dict[str, np.ndarray]
    outputs: list[str]
    rows: int
    key: tuple[object, ...]
    priority: int | None
    timeout_us: int | None
    prepare_ns: int
    #: config parameters overlaid with the request's, for a handler (None without one)
    parameters: dict[str, object] | None = None
    #: outputs to write into shared memory: name -> (where, the region's location)
    shared_outputs: dict[str, tuple[TensorRef, Location]] | None = None


@dataclass(slots=True)
class ExecTimes:
    """Where one execution's time went (shared by every request of the batch, as in Triton)."""

    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0

    def add(self, other: ExecTimes) -> None:
        self.input_ns += other.input_ns
        self.infer_ns += other.infer_ns
        self.output_ns += other.output_ns


Outcome = tuple["bytes | None", "ServerError | None"]


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


class ModelRunner:
    """One model instance's request path: ``prepare`` per request, ``execute`` per batch."""

    def __init__(self, backend: Backend, config: mc.ModelConfig, version: str, handler: Handler | None = None) -> None:
        self.backend = backend
        self.handler = handler
        self._config_parameters: dict[str, object] = dict(config_parameters(config)) if handler else {}
        self.config = config
        self.version = version
        self.name = config.name
        self.max_batch_size = config.max_batch_size
        self.inputs = _specs(config.input)
        self.outputs = _specs(config.output)
        self.output_order = [t.name for t in config.output]
        self.max_tensor_elements = 0  # 0: no limit beyond the request size
        # CUDA-region inputs stay on the device for a backend that takes device memory (not through a
        # handler); such a backend also joins a batch's rows itself, on the GPU.
        self.device_inputs = handler is None and bool(getattr(backend, "accepts_device_arrays", False))
        pinning = cast(HostPinning, backend) if self.device_inputs and hasattr(backend, "pin_host_memory") else None
        self.regions = RegionMaps(pinning=pinning)  # shared-memory regions requests name (mapped on first use)
        self.max_bytes_element = 0

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
                raise InvalidArgument(f"input '{tensor.name}': expected shape {_fmt(expected)}, got {_fmt(shape)}")
            if self.max_tensor_elements and math.prod(shape) > self.max_tensor_elements:
                raise InvalidArgument(
                    f"input '{tensor.name}': {math.prod(shape)} elements exceed this server's limit of "
                    f"{self.max_tensor_elements} per tensor (setting max_tensor_elements)"
                )
            if self.max_batch_size > 0:
                b = shape[0]
                if b < 1 or b > self.max_batch_size:
                    raise InvalidArgument(
                        f"input '{tensor.name}': batch size {b} is outside 1..{self.max_batch_size} "
                        f"(max_batch_size of model '{self.name}')"
                    )
                if batch and b != batch:
                    raise InvalidArgument(f"input '{tensor.name}': batch size {b} differs from other inputs' {batch}")
                batch = b
        missing = [n for n, s in self.inputs.items() if n not in seen and not s.optional]
        if missing:
            raise InvalidArgument(
                f"model '{self.name}' expects input(s) {', '.join(repr(m) for m in missing)}, "
                f"which the request does not give"
            )
        return batch or 1

    def _check_bytes_elements(self, inputs: dict[str, np.ndarray]) -> None:
        for name, arr in inputs.items():
            if arr.dtype != object or arr.size == 0:
                continue
            longest = max(len(v) for v in arr.flat)
            if longest > self.max_bytes_element:
                raise InvalidArgument(
                    f"input '{name}': a BYTES element of {longest} bytes exceeds this server's limit of "
                    f"{self.max_bytes_element} (setting max_bytes_element)"
                )

    def _refuse_unimplemented(self, request: pb.ModelInferRequest) -> None:
        """Request features this server does not implement are refused, never dropped: a sequence's
        requests answered as if independent, or a classification answered with raw scores, are wrong."""
        params = request.parameters
        sequence = [k for k in ("sequence_id", "sequence_start", "sequence_end") if k in params and _is_set(params[k])]
        if sequence:
            raise InvalidArgument(
                f"model '{self.name}' is not a stateful (sequence-batched) model, and this server does not "
                f"implement sequences yet: request parameter(s) {', '.join(sequence)} cannot be honoured"
            )
        for out in request.outputs:
            if "classification" in out.parameters:
                raise InvalidArgument(
                    f"output '{out.name}': the classification extension (parameter 'classification') is not "
                    "implemented by this server; request the output's values and take the top classes yourself"
                )

    def _requested_outputs(self, request: pb.ModelInferRequest) -> list[str]:
        if not request.outputs:
            return self.output_order
        names: list[str] = []
        for out in request.outputs:
            if out.name not in self.outputs:
                raise InvalidArgument(
                    f"unexpected inference output '{out.name}' for model '{self.name}', "
                    f"expected one of: {', '.join(self.output_order)}"
                )
            if out.name in names:
                raise InvalidArgument(f"output '{out.name}' is requested more than once")
            names.append(out.name)
        return names

    # -- per request: parse, validate, decode --------------------------------------------------
    def prepare(self, payload: bytes) -> Prepared:
        """Parse and validate one serialized request; raise ServerError naming what is wrong.

        Only ServerError leaves: the caller answers the request with it. Anything else is a bug in
        the validation, reported as InternalError rather than left to drop the request unanswered.
        """
        try:
            return self._prepare(payload)
        except ServerError:
            raise
        except Exception as exc:
            log.exception("preparing a request for model '%s' failed", self.name)
            raise InternalError(
                f"model '{self.name}': cannot prepare the request: {type(exc).__name__}: {exc}"
            ) from None

    def _prepare(self, payload: bytes) -> Prepared:
        start = time.monotonic_ns()
        request = decode_request(payload)
        if request.model_name and request.model_name != self.name:
            raise NotFound(f"unknown model '{request.model_name}' (this worker serves '{self.name}')")
        if request.model_version and request.model_version != str(self.version):
            raise NotFound(
                f"model '{self.name}' version {request.model_version} is not served here "
                f"(this worker serves version {self.version})"
            )
        self._refuse_unimplemented(request)
        rows = self._check_inputs(request)
        output_names = self._requested_outputs(request)
        reader, shared_outputs = self._shared_memory(request)
        inputs = decode_inputs(request, reader)
        if self.max_bytes_element:
            self._check_bytes_elements(inputs)
        lead = self.max_batch_size > 0
        for name, arr in list(inputs.items()):
            reshape = self.inputs[name].reshape
            if reshape is not None:
                inputs[name] = arr.reshape([arr.shape[0], *reshape] if lead else list(reshape))
        # Requests may share one backend call only when everything but the batch dimension agrees.
        key: tuple[object, ...] = tuple(
            sorted((n, a.dtype.str, a.shape[1:] if lead else a.shape) for n, a in inputs.items())
        )
        parameters = None
        if self.handler is not None:  # a handler sees one set of parameters per batch
            parameters = {**self._config_parameters, **request_parameters(request)}
            key = (key, tuple(sorted((k, type(v).__name__, v) for k, v in parameters.items())))
        return Prepared(
            request_id=request.id,
            inputs=inputs,
            outputs=output_names,
            rows=rows,
            key=key,
            priority=_int_parameter(request, "priority"),
            timeout_us=_int_parameter(request, "timeout"),
            prepare_ns=time.monotonic_ns() - start,
            parameters=parameters,
            shared_outputs=shared_outputs,
        )

    def _shared_memory(
        self, request: pb.ModelInferRequest
    ) -> tuple[SharedReader | None, dict[str, tuple[TensorRef, Location]] | None]:
        """How to read the request's shared-memory inputs and where its shared-memory outputs go.

        The regions' locations come from the gateway (parameter LOCATIONS); a tensor naming a region
        the request has no location for is refused, never read as if it had no data.
        """
        if LOCATIONS not in request.parameters:
            for out in request.outputs:
                if REGION in out.parameters:
                    raise InvalidArgument(f"output '{out.name}': shared-memory tensors are not served by this endpoint")
            return None, None
        locations = decode_locations(request)
        regions = self.regions

        def located(params: Any, label: str) -> tuple[TensorRef, Location] | None:
            ref = tensor_ref(params, label)
            if ref is None:
                return None
            loc = locations.get(ref.region)
            if loc is None:
                raise InvalidArgument(f"{label}: shared-memory region '{ref.region}' is not registered")
            return ref, loc

        def read(tensor: Any, label: str) -> bytes | memoryview | None:
            found = located(tensor.parameters, label)
            if found is None:
                return None
            return regions.read_input(found[0].region, found[1], found[0], label, self.device_inputs)

        outputs = {}
        for out in request.outputs:
            found = located(out.parameters, f"output '{out.name}'")
            if found is not None:
                outputs[out.name] = found
        return read, outputs or None

    def _write_shared(self, p: Prepared, outs: list[tuple[str, np.ndarray]]) -> dict[str, dict[str, int | str]]:
        """Write ``p``'s shared-memory outputs into their regions; each one's response parameters."""
        assert p.shared_outputs is not None
        written: dict[str, dict[str, int | str]] = {}
        for name, arr in outs:
            target = p.shared_outputs.get(name)
            if target is None:
                continue
            ref, loc = target
            arr = np.asarray(arr)
            nbytes = self.regions.write_output(ref.region, loc, ref, arr, datatype_of(arr.dtype), f"output '{name}'")
            written[name] = {REGION: ref.region, BYTE_SIZE: nbytes}
            if ref.offset:
                written[name][OFFSET] = ref.offset
        return written

    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        """One direct call (warm-up), through the handler when there is one."""
        if self.handler is None:
            return self.backend.infer(inputs, output_names)
        results, _ = self.handler.run(inputs, self._config_parameters)
        return {n: self._check_handler_output(n, results) for n in (output_names or self.output_order)}

    def close(self) -> None:
        """Unload the backend, forget the handler module, unmap shared memory."""
        self.regions.close()
        self.backend.unload()
        if self.handler is not None:
            self.handler.close()

    # -- per batch: one backend call, outputs split back -----------------------------------------
    def execute(self, batch: Sequence[Prepared]) -> tuple[list[Outcome], ExecTimes]:
        """Run ``batch`` as one backend call; one outcome (response bytes or error) per request.

        If a batch of several requests fails with a client error, each request is run again alone
        so that only the request at fault fails.
        """
        try:
            return self._execute(batch)
        except ServerError as exc:
            if len(batch) == 1 or exc.http_status >= 500:
                return [(None, exc)] * len(batch), ExecTimes()
        except Exception as exc:  # backend bug or framework error: report, keep serving
            log.exception("inference failed for model '%s'", self.name)
            error = InternalError(f"inference failed for model '{self.name}': {exc}")
            return [(None, error)] * len(batch), ExecTimes()
        outcomes: list[Outcome] = []
        times = ExecTimes()
        for item in batch:
            (outcome,), t = self.execute([item])
            outcomes.append(outcome)
            times.add(t)
        return outcomes, times

    def _execute(self, batch: Sequence[Prepared]) -> tuple[list[Outcome], ExecTimes]:
        t0 = time.monotonic_ns()
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            join = self.device_inputs
            inputs = {name: _concatenate([p.inputs[name] for p in batch], join) for name in batch[0].inputs}
        wanted = set().union(*(p.outputs for p in batch)) if len(batch) > 1 else set(batch[0].outputs)
        output_names = [n for n in self.output_order if n in wanted]
        t1 = time.monotonic_ns()
        if self.handler is None:
            results = self.backend.infer(inputs, output_names)
            t2 = time.monotonic_ns()
        else:
            results, (pre_ns, infer_ns, _) = self.handler.run(inputs, batch[0].parameters or {})
            results = {n: self._check_handler_output(n, results) for n in output_names}
            t1 += pre_ns  # preprocess counts as input time, postprocess as output time
            t2 = t1 + infer_ns
        total = sum(p.rows for p in batch)
        shaped = {name: self._shape_output(name, results, total) for name in output_names}
        if self.max_batch_size > 0 and len(batch) > 1:
            for name, arr in shaped.items():
                if arr.ndim == 0 or arr.shape[0] != total:
                    raise InternalError(
                        f"model '{self.name}': output '{name}' has shape {list(arr.shape)}, "
                        f"which does not split into the batch of {total} rows"
                    )
        outcomes: list[Outcome] = []
        offset = 0
        for p in batch:
            if len(batch) == 1:
                outs = [(n, shaped[n]) for n in p.outputs]
            else:
                outs = [(n, shaped[n][offset : offset + p.rows]) for n in p.outputs]
            offset += p.rows
            try:
                shared = self._write_shared(p, outs) if p.shared_outputs else None
            except ServerError as exc:  # e.g. this request's output region is too small: only it fails
                outcomes.append((None, exc))
                continue
            body = build_response(self.name, self.version, p.request_id, outs, shared=shared).SerializeToString()
            outcomes.append((body, None))
        t3 = time.monotonic_ns()
        return outcomes, ExecTimes(t1 - t0, t2 - t1, t3 - t2)

    def _check_handler_output(self, name: str, results: dict[str, np.ndarray]) -> np.ndarray:
        """A handler's output, cast to the config datatype; InternalError naming what is wrong."""
        try:
            arr = results[name]
        except KeyError:
            raise InternalError(
                f"model '{self.name}': the handler did not produce output '{name}' "
                f"(it gave: {', '.join(results) or 'nothing'})"
            ) from None
        spec = self.outputs[name]
        if spec.datatype == "BYTES":
            if arr.dtype.kind not in "OSU":
                raise InternalError(
                    f"model '{self.name}': output '{name}': expected BYTES (bytes or str elements), "
                    f"the handler gave {arr.dtype}"
                )
        else:
            want = numpy_dtype(spec.datatype)
            if arr.dtype != want:
                if not np.can_cast(arr.dtype, want, casting="same_kind"):
                    raise InternalError(
                        f"model '{self.name}': output '{name}': expected datatype {spec.datatype}, "
                        f"the handler gave {arr.dtype}"
                    )
                arr = arr.astype(want)
        expected = [-1, *spec.dims] if self.max_batch_size > 0 else list(spec.dims)
        shape = list(arr.shape)
        if spec.reshape is None and not (
            len(shape) == len(expected) and all(e == -1 or e == s for e, s in zip(expected, shape))
        ):
            raise InternalError(
                f"model '{self.name}': output '{name}': expected shape {_fmt(expected)}, the handler gave {_fmt(shape)}"
            )
        return arr

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


def _concatenate(arrays: list[Any], backend_joins: bool = False) -> Any:
    """Rows of several requests as one input; a backend that joins them itself (on the GPU, straight
    from where each request's rows are) gets them as they are, and so do rows left in device memory."""
    if backend_joins or any(not isinstance(a, np.ndarray) for a in arrays):
        return DeviceParts(arrays)
    return np.concatenate(arrays)


def _is_set(param: pb.InferParameter) -> bool:
    """A parameter with a value other than its type's zero (tritonclient sends none for no sequence)."""
    kind = param.WhichOneof("parameter_choice")
    return kind is not None and bool(getattr(param, kind))


def _int_parameter(request: pb.ModelInferRequest, key: str) -> int | None:
    """An integer request parameter (``priority``, ``timeout``), or None when absent."""
    if key not in request.parameters:
        return None
    return nonnegative_int(request.parameters[key], f"request parameter '{key}'")
