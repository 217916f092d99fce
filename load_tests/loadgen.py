"""Closed-loop load generator for KServe V2 servers (dl_inference, Triton, ``load_tests.bare_server``).

N workers share one asyncio event loop (uvloop when installed). Each worker sends a request, waits
for the answer, and sends the next one, for a warm-up period and then for the measured duration.
Only requests that start and finish inside the measured window count.

* gRPC: ``grpc.aio`` with a ModelInferRequest serialized once and sent as bytes through a generic
  unary-unary call on ``/inference.GRPCInferenceService/ModelInfer`` (identity serializers), so the
  client spends almost no CPU on protobuf. Every ``--check-every``-th response (and the first) is
  parsed and checked: the expected outputs are there, with the right shape and byte size.
* HTTP: aiohttp POST of a pre-built JSON body to ``/v2/models/{m}/infer``; ``--http-binary`` uses the
  binary tensor data extension for inputs and outputs instead.

Input names, datatypes and shapes come from the server's ModelMetadata (gRPC) or
``GET /v2/models/{m}`` (HTTP); variable dimensions become ``--batch`` for the first one and 1 for
the others unless ``--shape NAME:d0,d1,...`` says otherwise. Data is random.

Run from the repository root::

    python -m load_tests.loadgen --url localhost:8001 --protocol grpc --model simple \\
        --concurrency 16 --duration 10 --warmup 2 --batch 1 --json out.json
    python -m load_tests.loadgen --url localhost:8000 --protocol http --http-binary --model simple

It prints one summary line and, with ``--json``, writes the report (see :func:`run`). The exit status
is 0 when every measured request succeeded, 1 when any failed or none completed, 2 when the model
could not be queried at all.

As a library::

    from load_tests.loadgen import LoadConfig, run
    report = run(LoadConfig(url="localhost:8001", concurrency=4, duration=1.0))
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime as _dt
import itertools
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np

from dl_inference.protocol.datatypes import V2_DATATYPES, element_size, numpy_dtype

MODEL_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
MODEL_METADATA_PATH = "/inference.GRPCInferenceService/ModelMetadata"
MAX_MESSAGE_BYTES = 2**31 - 1
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}


# A send function returns None on success or an error key ("UNAVAILABLE", "HTTP 503", "BAD_RESPONSE"...),
# and may store a human-readable message for that key through the ``note`` callback.
SendFn = Callable[[bool], Awaitable["str | None"]]


class LoadgenError(RuntimeError):
    """The target could not be queried (connection, metadata, unsupported model)."""


@dataclasses.dataclass
class LoadConfig:
    """What to load and how; field names match the CLI options."""

    url: str | None = None  # host:port (gRPC) or [http://]host:port (HTTP); default localhost:8001/8000
    protocol: str = "grpc"  # "grpc" | "http"
    model: str = "simple"
    model_version: str = ""
    concurrency: int = 16
    duration: float = 10.0  # measured seconds
    warmup: float = 2.0  # seconds of load before measuring
    batch: int = 1
    http_binary: bool = False
    check_every: int = 100  # parse and check one response in this many (and the first)
    shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # input shape overrides
    request_timeout: float = 30.0
    connect_timeout: float = 10.0
    seed: int = 0
    use_uvloop: bool = True
    # Rows to send for these inputs instead of random data (perf_analyzer's --input-data), first dimension
    # = rows: request i carries rows [i*batch, (i+1)*batch), the requests cycling through them.
    input_data: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # gRPC only: tensors in "system" or "cuda" shared memory (perf_analyzer's --shared-memory); "": inline
    shared_memory: str = ""
    # gRPC: TCP connections the requests take turns on (a server with several frontend processes
    # spreads connections, not the calls of one HTTP/2 connection)
    connections: int = 1
    latencies_out: str = ""  # also write the measured latencies (ms, .npy): how --processes merges

    def target(self) -> str:
        url = self.url or f"localhost:{DEFAULT_PORTS[self.protocol]}"
        if self.protocol == "http":
            return url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"
        return url.split("://", 1)[-1].rstrip("/")


@dataclasses.dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # from metadata; -1 = variable


@dataclasses.dataclass
class Workload:
    """The request to send, what to expect back, and how it was derived."""

    inputs: list[TensorSpec]  # with concrete shapes
    arrays: list[np.ndarray]  # one per input (object arrays of bytes for BYTES)
    outputs: list[TensorSpec]  # expected shapes: -1 where any size is fine
    # with cfg.input_data: the arrays of each distinct request, sent in turn (``arrays`` is the first)
    variants: list[list[np.ndarray]] = dataclasses.field(default_factory=list)

    def requests(self) -> list[list[np.ndarray]]:
        return self.variants or [self.arrays]


# ---------------------------------------------------------------------------------------------
# workload construction


def concrete_shape(meta_shape: list[int], batch: int) -> list[int]:
    """Metadata shape -> the shape to send: first variable dim = batch, other variable dims = 1."""
    out: list[int] = []
    for i, d in enumerate(meta_shape):
        out.append(d if d >= 0 else (batch if i == 0 else 1))
    return out


def random_array(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """Random data of a V2 datatype (values small enough for any model to accept)."""
    if datatype == "BYTES":
        flat = [bytes(rng.integers(97, 123, size=8, dtype=np.uint8)) for _ in range(math.prod(shape))]
        arr = np.empty(len(flat), dtype=np.object_)
        arr[:] = flat
        return arr.reshape(shape)
    if datatype == "BF16":
        raise LoadgenError("BF16 inputs are not supported by loadgen")
    if datatype not in V2_DATATYPES:
        raise LoadgenError(f"unknown datatype {datatype}")
    dtype = numpy_dtype(datatype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 8, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def raw_bytes(datatype: str, array: np.ndarray) -> bytes:
    """V2 raw encoding: row-major; BYTES as 4-byte little-endian length + bytes per element."""
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            b = item if isinstance(item, bytes) else str(item).encode()
            parts.append(len(b).to_bytes(4, "little") + b)
        return b"".join(parts)
    return np.ascontiguousarray(array).tobytes()


def json_data(datatype: str, array: np.ndarray) -> list[Any]:
    if datatype == "BYTES":
        return [b.decode("utf-8", "replace") for b in array.reshape(-1)]
    return array.reshape(-1).tolist()


def build_workload(inputs: list[TensorSpec], outputs: list[TensorSpec], cfg: LoadConfig) -> Workload:
    if not inputs:
        raise LoadgenError(f"model '{cfg.model}' has no inputs in its metadata")
    unknown = set(cfg.shapes) - {t.name for t in inputs}
    if unknown:
        raise LoadgenError(f"--shape names unknown inputs {sorted(unknown)}; inputs: {[t.name for t in inputs]}")
    unknown = set(cfg.input_data) - {t.name for t in inputs}
    if unknown:
        raise LoadgenError(f"input data names unknown inputs {sorted(unknown)}; inputs: {[t.name for t in inputs]}")
    rng = np.random.default_rng(cfg.seed)
    batched = any(t.shape and t.shape[0] < 0 for t in inputs) and not cfg.shapes
    sent: list[TensorSpec] = []
    arrays: list[np.ndarray] = []
    for t in inputs:
        shape = list(cfg.shapes.get(t.name) or concrete_shape(t.shape, cfg.batch))
        if t.name in cfg.input_data:
            shape = _input_data_shape(t, cfg.input_data[t.name], cfg.batch)
        sent.append(TensorSpec(t.name, t.datatype, shape))
        arrays.append(random_array(t.datatype, shape, rng) if t.name not in cfg.input_data else np.empty(0))
    variants: list[list[np.ndarray]] = []
    if cfg.input_data:
        count = min(len(rows) for rows in cfg.input_data.values()) // cfg.batch
        for i in range(count):
            lo, hi = i * cfg.batch, (i + 1) * cfg.batch
            variants.append(
                [
                    cfg.input_data[t.name][lo:hi] if t.name in cfg.input_data else a
                    for t, a in zip(inputs, arrays, strict=True)
                ]
            )
        arrays = variants[0]
    expected: list[TensorSpec] = []
    for t in outputs:
        shape = [-1] * len(t.shape) if cfg.shapes else list(t.shape)
        if batched and shape and shape[0] < 0:
            shape[0] = cfg.batch
        expected.append(TensorSpec(t.name, t.datatype, shape))
    return Workload(sent, arrays, expected, variants)


def _input_data_shape(t: TensorSpec, rows: np.ndarray, batch: int) -> list[int]:
    """The shape of ``batch`` rows of ``rows`` for input ``t``; LoadgenError when they do not fit it."""
    if not t.shape or t.shape[0] >= 0:
        raise LoadgenError(f"input data for '{t.name}' needs a batching model (metadata shape {t.shape})")
    if len(rows) < batch:
        raise LoadgenError(f"input data for '{t.name}' has {len(rows)} rows, fewer than the batch of {batch}")
    dims = list(rows.shape[1:])
    want = t.shape[1:]
    if len(dims) != len(want) or any(w >= 0 and w != d for w, d in zip(want, dims, strict=True)):
        raise LoadgenError(f"input data for '{t.name}': rows of shape {dims}, the model takes {want} (-1 = any)")
    return [batch, *dims]


def check_output(
    spec: TensorSpec, datatype: str, shape: list[int], n_elements: int | None, n_bytes: int | None
) -> str | None:
    """None if an output matches what is expected, else why not."""
    if datatype != spec.datatype:
        return f"output '{spec.name}': datatype {datatype}, expected {spec.datatype}"
    if spec.shape and (
        len(shape) != len(spec.shape) or any(e >= 0 and e != s for e, s in zip(spec.shape, shape, strict=True))
    ):
        return f"output '{spec.name}': shape {shape}, expected {spec.shape} (-1 = any)"
    count = math.prod(shape)
    if n_elements is not None and n_elements != count:
        return f"output '{spec.name}': {n_elements} elements for shape {shape}"
    size = element_size(datatype) if datatype in V2_DATATYPES else None
    if n_bytes is not None and size is not None and n_bytes != count * size:
        return f"output '{spec.name}': {n_bytes} raw bytes for shape {shape} {datatype}"
    return None


# ---------------------------------------------------------------------------------------------
# gRPC


def _pb() -> Any:
    from dl_inference.protocol.generated import grpc_service_pb2

    return grpc_service_pb2


def grpc_request_bytes(cfg: LoadConfig, work: Workload) -> bytes:
    pb = _pb()
    request = pb.ModelInferRequest(model_name=cfg.model, model_version=cfg.model_version)
    for spec, array in zip(work.inputs, work.arrays, strict=True):
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        request.raw_input_contents.append(raw_bytes(spec.datatype, array))
    return request.SerializeToString()


def check_grpc_response(data: bytes, cfg: LoadConfig, work: Workload) -> str | None:
    """None if a serialized ModelInferResponse carries the expected outputs, else why not."""
    pb = _pb()
    try:
        response = pb.ModelInferResponse.FromString(data)
    except Exception as exc:  # protobuf DecodeError
        return f"response does not parse as ModelInferResponse: {exc}"
    if response.model_name and response.model_name != cfg.model:
        return f"response model_name '{response.model_name}', expected '{cfg.model}'"
    got = {t.name: i for i, t in enumerate(response.outputs)}
    missing = [s.name for s in work.outputs if s.name not in got]
    if missing:
        return f"outputs {missing} missing; got {sorted(got)}"
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        return f"{len(response.outputs)} outputs but {len(raw)} raw_output_contents"
    for spec in work.outputs:
        i = got[spec.name]
        tensor = response.outputs[i]
        if raw:
            n_bytes: int | None = len(raw[i])
            n_elements: int | None = None
        else:
            n_bytes = None
            n_elements = sum(len(getattr(tensor.contents, f.name)) for f, _ in tensor.contents.ListFields())
        problem = check_output(spec, tensor.datatype, list(tensor.shape), n_elements, n_bytes)
        if problem:
            return problem
    return None


async def grpc_metadata(channel: Any, cfg: LoadConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    pb = _pb()
    call = channel.unary_unary(
        MODEL_METADATA_PATH,
        request_serializer=pb.ModelMetadataRequest.SerializeToString,
        response_deserializer=pb.ModelMetadataResponse.FromString,
    )
    meta = await call(pb.ModelMetadataRequest(name=cfg.model, version=cfg.model_version), timeout=cfg.connect_timeout)
    inputs = [TensorSpec(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
    outputs = [TensorSpec(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
    return inputs, outputs


async def grpc_setup(cfg: LoadConfig, note: Callable[[str, str], None]) -> tuple[SendFn, Workload, Any]:
    import grpc

    target = cfg.target()
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.use_local_subchannel_pool", 1),  # each channel its own connection
    ]
    channel = grpc.aio.insecure_channel(target, options=options)
    try:
        await asyncio.wait_for(channel.channel_ready(), cfg.connect_timeout)
        inputs, outputs = await grpc_metadata(channel, cfg)
    except TimeoutError:
        await channel.close()
        raise LoadgenError(f"cannot connect to gRPC {target} within {cfg.connect_timeout} s") from None
    except grpc.aio.AioRpcError as exc:
        await channel.close()
        raise LoadgenError(f"ModelMetadata('{cfg.model}') on {target}: {exc.code().name} {exc.details()}") from None
    work = build_workload(inputs, outputs, cfg)
    if cfg.shared_memory:
        return await _shared_memory_setup(cfg, channel, work, note)
    bodies = [grpc_request_bytes(cfg, dataclasses.replace(work, arrays=a)) for a in work.requests()]
    turn = itertools.cycle(bodies)
    channels = [channel, *(grpc.aio.insecure_channel(target, options=options) for _ in range(cfg.connections - 1))]
    for extra in channels[1:]:
        try:
            await asyncio.wait_for(extra.channel_ready(), cfg.connect_timeout)
        except TimeoutError:
            await asyncio.gather(*(c.close() for c in channels))
            raise LoadgenError(f"cannot open {cfg.connections} connections to {target}") from None
    # no serializers: bytes in, bytes out; calls take the connections in turn
    infers = itertools.cycle([c.unary_unary(MODEL_INFER_PATH) for c in channels])
    timeout = cfg.request_timeout

    async def close_all() -> None:
        await asyncio.gather(*(c.close() for c in channels))

    async def send(verify: bool) -> str | None:
        try:
            data = await next(infers)(next(turn), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            key = exc.code().name
            note(key, exc.details() or "")
            return key
        if verify:
            problem = check_grpc_response(data, cfg, work)
            if problem:
                note("BAD_RESPONSE", problem)
                return "BAD_RESPONSE"
        return None

    return send, work, close_all


async def _shared_memory_setup(
    cfg: LoadConfig, channel: Any, work: Workload, note: Callable[[str, str], None]
) -> tuple[SendFn, Workload, Any]:
    """One input and one output region per concurrent request (load_tests/shm_client.py)."""
    import grpc

    from load_tests.shm_client import SharedMemorySlots, fixed_nbytes

    try:
        outputs = [(s.name, fixed_nbytes(s.datatype, s.shape)) for s in work.outputs]
    except ValueError as exc:
        await channel.close()
        raise LoadgenError(f"--shared-memory: {exc}") from None
    inputs = [
        (s.name, s.datatype, s.shape, raw_bytes(s.datatype, a)) for s, a in zip(work.inputs, work.arrays, strict=True)
    ]
    slots = SharedMemorySlots(channel, cfg.shared_memory)
    try:
        await slots.add(cfg.concurrency, cfg.model, cfg.model_version, inputs, outputs)
    except grpc.aio.AioRpcError as exc:
        await slots.close()
        await channel.close()
        raise LoadgenError(f"registering shared memory: {exc.code().name} {exc.details()}") from None
    infer = channel.unary_unary(MODEL_INFER_PATH)
    pb = _pb()

    async def send(verify: bool) -> str | None:
        slot = await slots.free.get()
        try:
            data = await infer(slot.request, timeout=cfg.request_timeout)
        except grpc.aio.AioRpcError as exc:
            note(exc.code().name, exc.details() or "")
            return exc.code().name
        finally:
            slots.free.put_nowait(slot)
        if verify:
            response = pb.ModelInferResponse.FromString(data)
            got = [t.name for t in response.outputs]
            if sorted(got) != sorted(name for name, _ in outputs) or any(response.raw_output_contents):
                note("BAD_RESPONSE", f"outputs {got}, raw bytes {[len(r) for r in response.raw_output_contents]}")
                return "BAD_RESPONSE"
        return None

    async def close() -> None:
        await slots.close()
        await channel.close()

    return send, work, close


# ---------------------------------------------------------------------------------------------
# HTTP


def http_request(cfg: LoadConfig, work: Workload) -> tuple[bytes, dict[str, str]]:
    """The infer body and headers (JSON, or JSON header + binary tensors with ``http_binary``)."""
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for spec, array in zip(work.inputs, work.arrays, strict=True):
        entry: dict[str, Any] = {"name": spec.name, "shape": spec.shape, "datatype": spec.datatype}
        if cfg.http_binary:
            blob = raw_bytes(spec.datatype, array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_data(spec.datatype, array)
        inputs.append(entry)
    doc: dict[str, Any] = {"inputs": inputs}
    if cfg.http_binary:
        doc["outputs"] = [{"name": o.name, "parameters": {"binary_data": True}} for o in work.outputs]
        header = json.dumps(doc, separators=(",", ":")).encode()
        return header + b"".join(blobs), {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
    return json.dumps(doc, separators=(",", ":")).encode(), {"Content-Type": "application/json"}


def check_http_response(body: bytes, header_length: str | None, work: Workload) -> str | None:
    """None if an HTTP infer response carries the expected outputs, else why not."""
    n_json = int(header_length) if header_length else len(body)
    try:
        doc = json.loads(body[:n_json])
    except ValueError as exc:
        return f"response header is not JSON: {exc}"
    got = {o.get("name"): o for o in doc.get("outputs", [])}
    missing = [s.name for s in work.outputs if s.name not in got]
    if missing:
        return f"outputs {missing} missing; got {sorted(map(str, got))}"
    offset = n_json
    for out in doc["outputs"]:  # binary sections come in the order of the outputs
        size = (out.get("parameters") or {}).get("binary_data_size")
        out["_bytes"] = None
        if size is not None:
            out["_bytes"] = int(size)
            offset += int(size)
    if offset != len(body):
        return f"binary sections add up to {offset - n_json} bytes but {len(body) - n_json} follow the header"
    for spec in work.outputs:
        out = got[spec.name]
        n_bytes = out["_bytes"]
        n_elements = None if n_bytes is not None else int(np.asarray(out.get("data", [])).size)
        problem = check_output(spec, out.get("datatype", ""), list(out.get("shape", [])), n_elements, n_bytes)
        if problem:
            return problem
    return None


async def http_setup(cfg: LoadConfig, note: Callable[[str, str], None]) -> tuple[SendFn, Workload, Any]:
    import aiohttp

    base = cfg.target()
    model_path = f"{base}/v2/models/{cfg.model}" + (f"/versions/{cfg.model_version}" if cfg.model_version else "")
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(cfg.concurrency, 1), ttl_dns_cache=None),
        timeout=aiohttp.ClientTimeout(total=cfg.request_timeout),
        auto_decompress=False,
    )
    try:
        async with session.get(model_path, timeout=aiohttp.ClientTimeout(total=cfg.connect_timeout)) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise LoadgenError(f"GET {model_path}: HTTP {resp.status} {text[:300]}")
            meta = json.loads(text)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        await session.close()
        raise LoadgenError(f"GET {model_path}: {type(exc).__name__} {exc}") from None
    except LoadgenError:
        await session.close()
        raise

    def specs(key: str) -> list[TensorSpec]:
        return [TensorSpec(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta.get(key, [])]

    work = build_workload(specs("inputs"), specs("outputs"), cfg)
    turn = itertools.cycle([http_request(cfg, dataclasses.replace(work, arrays=a)) for a in work.requests()])
    infer_url = f"{model_path}/infer"

    async def send(verify: bool) -> str | None:
        body, headers = next(turn)
        try:
            async with session.post(infer_url, data=body, headers=headers) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    key = f"HTTP {resp.status}"
                    note(key, payload[:300].decode("utf-8", "replace"))
                    return key
                if verify:
                    problem = check_http_response(payload, resp.headers.get("Inference-Header-Content-Length"), work)
                    if problem:
                        note("BAD_RESPONSE", problem)
                        return "BAD_RESPONSE"
        except TimeoutError:
            note("TIMEOUT", f"no answer within {cfg.request_timeout} s")
            return "TIMEOUT"
        except aiohttp.ClientError as exc:
            key = type(exc).__name__
            note(key, str(exc))
            return key
        return None

    return send, work, session.close


# ---------------------------------------------------------------------------------------------
# the load loop


class _State:
    def __init__(self, check_every: int) -> None:
        self.check_every = max(1, check_every)
        self.sent = 0
        self.checked = 0
        self.latencies: list[float] = []  # seconds, successful measured requests
        self.errors: collections.Counter[str] = collections.Counter()
        self.warmup_errors: collections.Counter[str] = collections.Counter()
        self.samples: dict[str, str] = {}
        self.cpu_window: list[float] = []  # process CPU seconds at window start and end

    def note(self, key: str, message: str) -> None:
        self.samples.setdefault(key, message[:500])


async def _worker(send: SendFn, state: _State, t_start: float, t_end: float) -> None:
    clock = time.perf_counter
    latencies = state.latencies
    every = state.check_every
    while True:
        t0 = clock()
        if t0 >= t_end:
            return
        verify = state.sent % every == 0
        state.sent += 1
        if verify:
            state.checked += 1
        try:
            error = await send(verify)
        except Exception as exc:  # a transport error we did not foresee still counts, never kills the run
            error = type(exc).__name__
            state.note(error, str(exc))
        t1 = clock()
        if t0 < t_start:
            if error:
                state.warmup_errors[error] += 1
            continue
        if t1 > t_end:
            continue
        if error:
            state.errors[error] += 1
        else:
            latencies.append(t1 - t0)


async def _cpu_probe(state: _State, t_start: float, t_end: float) -> None:
    """Note the client's CPU time (all its threads) when the measured window opens and closes."""
    for t in (t_start, t_end):
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        state.cpu_window.append(time.process_time())


def latency_summary(lat_ms: np.ndarray) -> dict[str, float | None]:
    """The report's ``latency_ms``: percentiles, max, min and mean of the latencies (ms); None when empty."""
    if not lat_ms.size:
        return dict.fromkeys(("p50", "p90", "p95", "p99", "max", "min", "mean"))
    p50, p90, p95, p99 = (float(v) for v in np.percentile(lat_ms, [50, 90, 95, 99]))
    return {
        "p50": p50,
        "p90": p90,
        "p95": p95,
        "p99": p99,
        "max": float(lat_ms.max()),
        "min": float(lat_ms.min()),
        "mean": float(lat_ms.mean()),
    }


def summarize(state: _State, cfg: LoadConfig, work: Workload, loop_name: str, measured: float) -> dict[str, Any]:
    lat_ms = np.asarray(state.latencies, dtype=np.float64) * 1000.0
    latency = latency_summary(lat_ms)
    if cfg.latencies_out:
        np.save(cfg.latencies_out, lat_ms)
    n_ok = int(lat_ms.size)
    n_err = int(sum(state.errors.values()))
    rps = n_ok / measured if measured > 0 else 0.0
    return {
        "protocol": cfg.protocol
        + ("+binary" if cfg.protocol == "http" and cfg.http_binary else "")
        + (f"+{cfg.shared_memory}_shm" if cfg.shared_memory else ""),
        "url": cfg.target(),
        "model": cfg.model,
        "model_version": cfg.model_version,
        "concurrency": cfg.concurrency,
        "connections": cfg.connections,
        "batch": cfg.batch,
        "warmup_s": cfg.warmup,
        "duration_s": measured,
        "requests": n_ok,
        "errors": n_err,
        "errors_by_status": dict(state.errors),
        "warmup_errors_by_status": dict(state.warmup_errors),
        "error_samples": dict(state.samples),
        "throughput_rps": rps,
        "inferences_per_s": rps * cfg.batch,
        "latency_ms": latency,
        "checked_responses": state.checked,
        "client_cpu_util": (
            (state.cpu_window[1] - state.cpu_window[0]) / measured if len(state.cpu_window) == 2 else None
        ),
        "inputs": [dataclasses.asdict(t) for t in work.inputs],
        "client": {"event_loop": loop_name, "python": platform.python_version()},
        "started_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


async def run_async(cfg: LoadConfig) -> dict[str, Any]:
    """Run one load test on the current event loop and return the report (see :func:`run`)."""
    if cfg.protocol not in ("grpc", "http"):
        raise LoadgenError(f"protocol must be grpc or http, not {cfg.protocol!r}")
    if cfg.concurrency < 1 or cfg.batch < 1 or cfg.duration <= 0 or cfg.warmup < 0:
        raise LoadgenError("concurrency and batch must be >= 1, duration > 0, warmup >= 0")
    state = _State(cfg.check_every)
    setup = grpc_setup if cfg.protocol == "grpc" else http_setup
    send, work, close = await setup(cfg, state.note)
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    try:
        t_begin = time.perf_counter()
        t_start = t_begin + cfg.warmup
        t_end = t_start + cfg.duration
        await asyncio.gather(
            _cpu_probe(state, t_start, t_end),
            *(_worker(send, state, t_start, t_end) for _ in range(cfg.concurrency)),
        )
    finally:
        await close()
    return summarize(state, cfg, work, loop_name, cfg.duration)


def run_coroutine(coro: Coroutine[Any, Any, Any], use_uvloop: bool = True) -> Any:
    """Run a coroutine on a fresh loop: uvloop when installed and wanted, else asyncio's."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def run(cfg: LoadConfig) -> dict[str, Any]:
    """Run one load test on a new event loop and return the report.

    Report keys: protocol, url, model, concurrency, batch, warmup_s, duration_s, requests (successful,
    measured), errors, errors_by_status, warmup_errors_by_status, error_samples (first message per
    status), throughput_rps, inferences_per_s, latency_ms {p50, p90, p95, p99, max, min, mean} (None
    when nothing succeeded), checked_responses, inputs (what was sent), client, started_at.
    Raises :class:`LoadgenError` when the target cannot be queried.
    """
    return run_coroutine(run_async(cfg), cfg.use_uvloop)


def summary_line(report: dict[str, Any]) -> str:
    lat = report["latency_ms"]

    def ms(key: str) -> str:
        return "-" if lat[key] is None else f"{lat[key]:.3f}"

    errors = f"errors {report['errors']}"
    if report["errors"]:
        errors += " " + ", ".join(f"{k}={v}" for k, v in sorted(report["errors_by_status"].items()))
    return (
        f"{report['protocol']} {report['url']} {report['model']} c={report['concurrency']} "
        f"b={report['batch']}: {report['throughput_rps']:.1f} req/s  p50 {ms('p50')} ms  "
        f"p90 {ms('p90')}  p95 {ms('p95')}  p99 {ms('p99')}  max {ms('max')} ms  "
        f"{errors}  ({report['requests']} ok in {report['duration_s']:.1f} s)"
    )


def _parse_shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--shape wants NAME:d0,d1,..., got {text!r}")
    try:
        return name, [int(d) for d in dims.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape dims must be integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.loadgen",
        description="Closed-loop KServe V2 load generator (gRPC or HTTP).",
    )
    p.add_argument("--url", default=None, help="host:port (default localhost:8001 gRPC, localhost:8000 HTTP)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--model", default="simple")
    p.add_argument("--model-version", default="")
    p.add_argument("--concurrency", "-c", type=int, default=16, help="concurrent closed-loop workers")
    p.add_argument("--duration", "-d", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--batch", "-b", type=int, default=1, help="size of the first variable dimension")
    p.add_argument("--http-binary", action="store_true", help="HTTP: binary tensor data extension")
    p.add_argument("--check-every", type=int, default=100, help="check one response in N (1 = all)")
    p.add_argument(
        "--shape",
        action="append",
        type=_parse_shape,
        default=[],
        metavar="NAME:D0,D1",
        help="input shape override (repeatable)",
    )
    p.add_argument("--connections", type=int, default=1, help="gRPC: connections the requests take turns on")
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop")
    p.add_argument(
        "--shared-memory",
        choices=("system", "cuda"),
        default=None,
        help="gRPC: send tensors through system or CUDA shared memory (one region pair per concurrent request)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="client processes (the concurrency shared among them; one Python process tops out near a core)",
    )
    p.add_argument("--latencies-out", default="", help=argparse.SUPPRESS)  # a --processes child's latencies
    return p


def run_processes(argv: list[str], processes: int, concurrency: int, seed: int, work: Path) -> dict[str, Any]:
    """This command in ``processes`` processes at once (the concurrency shared), one merged report:
    counts and rates summed, latency percentiles from every measured request. The processes start
    within a second of each other, so their measured windows nearly coincide."""
    children = []
    for i in range(processes):
        share = concurrency // processes + (1 if i < concurrency % processes else 0)
        out, lat = work / f"p{i}.json", work / f"p{i}.npy"
        cmd = [sys.executable, "-m", "load_tests.loadgen", *argv, "--processes", "1", "--concurrency", str(share),
               "--seed", str(seed + i), "--json", str(out), "--latencies-out", str(lat)]  # fmt: skip
        children.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out, lat))
    reports, latencies = [], []
    for proc, out, lat in children:
        _, err = proc.communicate()
        if not out.exists():
            raise LoadgenError(f"a client process failed (status {proc.returncode}): {err.strip()[-500:]}")
        reports.append(json.loads(out.read_text()))
        latencies.append(np.load(lat))
    merged = dict(reports[0])
    for key in ("requests", "errors", "throughput_rps", "inferences_per_s", "checked_responses"):
        if key in merged:
            merged[key] = sum(r[key] for r in reports)
    for key in ("errors_by_status", "warmup_errors_by_status"):
        if key in merged:
            merged[key] = dict(sum((collections.Counter(r[key]) for r in reports), collections.Counter()))
    merged["error_samples"] = {k: v for r in reports for k, v in r.get("error_samples", {}).items()}
    merged["latency_ms"] = latency_summary(np.concatenate(latencies))
    merged["concurrency"] = concurrency
    merged["processes"] = processes
    return merged


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.processes > 1:
        if args.concurrency < args.processes:
            print("loadgen: --processes N needs --concurrency >= N", file=sys.stderr)
            return 2
        raw = list(sys.argv[1:] if argv is None else argv)
        for flag in ("--processes", "--json", "--concurrency", "-c", "--seed"):  # set per child
            while flag in raw:
                i = raw.index(flag)
                del raw[i : i + 2]
        with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
            try:
                report = run_processes(raw, args.processes, args.concurrency, args.seed, Path(tmp))
            except LoadgenError as exc:
                print(f"loadgen: {exc}", file=sys.stderr)
                return 2
        print(summary_line(report) + f"  [{args.processes} processes]", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0 if report["errors"] == 0 and report["requests"] > 0 else 1
    cfg = LoadConfig(
        url=args.url,
        protocol=args.protocol,
        model=args.model,
        model_version=args.model_version,
        concurrency=args.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        batch=args.batch,
        http_binary=args.http_binary,
        check_every=args.check_every,
        shapes=dict(args.shape),
        request_timeout=args.request_timeout,
        connect_timeout=args.connect_timeout,
        seed=args.seed,
        use_uvloop=not args.no_uvloop,
        shared_memory=args.shared_memory or "",
        connections=args.connections,
        latencies_out=args.latencies_out,
    )
    if cfg.connections < 1 or (cfg.connections > 1 and (cfg.protocol != "grpc" or cfg.shared_memory)):
        print("loadgen: --connections N > 1 is for gRPC requests without shared memory", file=sys.stderr)
        return 2
    try:
        report = run(cfg)
    except LoadgenError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadgen: interrupted", file=sys.stderr)
        return 130
    print(summary_line(report), flush=True)
    for key, message in report["error_samples"].items():
        print(f"  {key}: {message}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["errors"] == 0 and report["requests"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
