"""perf: a perf_analyzer-style load generator for KServe V2 servers (dl_inference, Triton) and TF-Serving.

Run from the repository root (``load_tests`` is not installed as a package)::

    python -m load_tests.perf --url localhost:8001 --model simple --concurrency 1,4,16
    python -m load_tests.perf --protocol http-binary --url localhost:8000 --rate 100,200,400 --arrival poisson
    python -m load_tests.perf --scenario image_bytes --concurrency 1,4 --csv out.csv --json out.json --plot out.png
    python -m load_tests.perf --scenario resnet_cnn --make-repo /tmp/repo     # write the models it needs

Load:

* **closed loop** (``--concurrency 1,4,16``): N workers each send a request, wait for the answer,
  send the next. Latency is measured from the send.
* **open loop** (``--rate 100,200`` requests/s, ``--arrival constant|poisson``): requests are sent
  on a schedule fixed in advance, whether or not earlier ones have returned (at most
  ``--max-outstanding`` in flight). Latency is measured from each request's *intended* send time, so
  a server that stalls cannot hide it by slowing the client down (coordinated omission): requests
  the schedule wanted sent during a stall carry the stall in their latency, even when the
  outstanding cap held them back (counted as ``delayed``).

Measurement: after ``--warmup`` seconds of load (not measured) the load stops until nothing is in
flight, the server's V2 statistics are read, and measurement runs in windows of ``--window-ms``
until the last 3 windows' throughput and p99 are within ``--stability-pct`` of their mean (stable)
or ``--max-windows`` were measured (``stable: false``). The report covers the last 3 windows; the
server's statistics are read again once the last window closed and its requests drained, so their
deltas cover all measured windows. Latencies go into an HDR histogram (``load_tests.histogram``).

Protocols: ``grpc`` (a pre-serialized ModelInferRequest through a generic call), ``http`` (JSON),
``http-binary`` (binary tensor data extension), ``tfs-rest`` (TF-Serving ``POST
/v1/models/{m}:predict``) and ``tfs-grpc`` (TF-Serving PredictionService/Predict; needs the
``tensorflow-serving-api`` package). Only standard endpoints are used.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import csv
import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from load_tests.histogram import Histogram
from load_tests.lib.load import arrival_times
from load_tests.loadgen import (
    MAX_MESSAGE_BYTES,
    MODEL_INFER_PATH,
    LoadConfig,
    LoadgenError,
    TensorSpec,
    Workload,
    check_grpc_response,
    check_http_response,
    concrete_shape,
    grpc_metadata,
    raw_bytes,
    run_coroutine,
)
from load_tests.scenarios import (
    DataSource,
    InputDecl,
    Scenario,
    ScenarioError,
    available_scenarios,
    load_scenario,
    make_array,
    make_repository,
    parse_data_source,
)

PROTOCOLS = ("grpc", "http", "http-binary", "tfs-rest", "tfs-grpc")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000, "http-binary": 8000, "tfs-rest": 8501, "tfs-grpc": 8500}
MODEL_STATISTICS_PATH = "/inference.GRPCInferenceService/ModelStatistics"
TFS_PREDICT_PATH = "/tensorflow.serving.PredictionService/Predict"
PERCENTILES = (50, 90, 95, 99)
STAT_KEYS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")

# infer() returns (error key or None, send seconds, receive seconds, decode seconds): see Target.
Outcome = tuple["str | None", float, float, float]
clock = time.perf_counter


class PerfError(RuntimeError):
    """The run cannot start (bad options, unreachable server, unsupported model or protocol)."""


# ---------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class PerfConfig:
    """Everything a sweep needs; field names match the CLI's long options."""

    url: str | None = None
    protocol: str = "grpc"
    model: str = "simple"
    model_version: str = ""
    batch: int = 1
    concurrency: list[int] = dataclasses.field(default_factory=list)
    rate: list[float] = dataclasses.field(default_factory=list)
    arrival: str = "constant"  # constant | poisson (open loop)
    max_outstanding: int = 256  # open loop: requests in flight at most
    window_ms: float = 5000.0
    stability_pct: float = 10.0
    stability_windows: int = 3
    max_windows: int = 10
    warmup: float = 1.0  # seconds of load before measuring each point
    inputs: list[InputDecl] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    pool: int = 1  # distinct requests cycled through
    serialize: str = "once"  # once: bodies pre-built | each: serialized per request (inside the latency)
    check_every: int = 100  # parse and check one response in N (and the first); 1 = all
    tfs_format: str = "instances"  # tfs-rest: instances (row) | inputs (columnar)
    tfs_signature: str = ""
    stats_url: str | None = None  # V2 HTTP host:port for server statistics (default: the target, V2 only)
    server_stats: bool = True
    late_ms: float = 5.0  # open loop: a request sent this much after its intended time counts as late
    request_timeout: float = 30.0
    connect_timeout: float = 10.0
    seed: int = 0
    use_uvloop: bool = True
    quiet: bool = False
    progress: bool | None = None  # None: when stderr is a TTY and not quiet
    scenario: str | None = None
    shared_memory: str = ""  # grpc: tensors in "system" or "cuda" shared memory (perf_analyzer's option)

    def target(self) -> str:
        url = (self.url or f"localhost:{DEFAULT_PORTS[self.protocol]}").rstrip("/")
        if self.protocol in ("http", "http-binary", "tfs-rest"):
            return url if "://" in url else f"http://{url}"
        return url.split("://", 1)[-1]

    def points(self) -> list[Point]:
        pts = [Point("concurrency", c) for c in self.concurrency]
        pts += [Point("rate", r) for r in self.rate]
        return pts or [Point("concurrency", 1)]

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise PerfError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}")
        if self.batch < 1:
            raise PerfError("--batch must be >= 1")
        if any(c < 1 for c in self.concurrency):
            raise PerfError("--concurrency values must be >= 1")
        if any(not r > 0 for r in self.rate):
            raise PerfError("--rate values must be > 0")
        if self.arrival not in ("constant", "poisson"):
            raise PerfError("--arrival must be constant or poisson")
        if self.max_outstanding < 1:
            raise PerfError("--max-outstanding must be >= 1")
        if self.window_ms <= 0 or self.stability_pct <= 0 or self.stability_windows < 1:
            raise PerfError("--window-ms and --stability-pct must be > 0, stability windows >= 1")
        if self.max_windows < 1:
            raise PerfError("--max-windows must be >= 1")
        if self.warmup < 0 or self.pool < 1 or self.check_every < 1:
            raise PerfError("--warmup must be >= 0, --pool and --check-every >= 1")
        if self.serialize not in ("once", "each"):
            raise PerfError("--serialize must be once or each")
        if self.tfs_format not in ("instances", "inputs"):
            raise PerfError("--tfs-format must be instances or inputs")
        if self.shared_memory not in ("", "system", "cuda"):
            raise PerfError("--shared-memory must be system or cuda")
        if self.shared_memory and self.protocol != "grpc":
            raise PerfError("--shared-memory works with --protocol grpc only")


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: closed loop at a concurrency, or open loop at a rate (requests/s)."""

    mode: str  # concurrency | rate
    value: float

    def label(self) -> str:
        if self.mode == "concurrency":
            return f"c={int(self.value)}"
        return f"r={self.value:g}/s"


# ---------------------------------------------------------------------------------------------
# the request: specs, data, encodings


@dataclasses.dataclass
class Prepared:
    """What is sent and what is expected back."""

    inputs: list[TensorSpec]  # concrete shapes
    sources: list[DataSource]
    pool: list[list[np.ndarray]]  # pool[i][j]: input j of request i
    outputs: list[TensorSpec]  # expected (-1 = any size); empty when unknown (TF-Serving)
    requested: list[str]  # outputs named in the request (empty: the server's default, all)


def resolve_inputs(
    meta_inputs: list[TensorSpec] | None, decls: list[InputDecl], batch: int
) -> list[tuple[TensorSpec, DataSource]]:
    """Merge declared inputs with the model's metadata into concrete specs (first -1 = batch, others 1)."""
    by_name = {d.name: d for d in decls}
    out: list[tuple[TensorSpec, DataSource]] = []
    if meta_inputs is None:  # no metadata (TF-Serving): the declarations must be complete
        if not decls:
            raise PerfError(
                "this protocol has no V2 metadata: declare the inputs (--input NAME:DATATYPE:D0,D1 or a scenario)"
            )
        for d in decls:
            if d.datatype is None or d.shape is None:
                raise PerfError(f"input '{d.name}': give its datatype and shape (--input NAME:DATATYPE:D0,D1)")
            out.append((TensorSpec(d.name, d.datatype, concrete_shape(d.shape, batch)), d.data))
        return out
    known = {t.name for t in meta_inputs}
    unknown = [n for n in by_name if n not in known]
    if unknown:
        raise PerfError(f"inputs {unknown} are not inputs of the model; its inputs: {sorted(known)}")
    for t in meta_inputs:
        d = by_name.get(t.name, InputDecl(t.name))
        if d.datatype is not None and d.datatype != t.datatype:
            raise PerfError(f"input '{t.name}': declared {d.datatype}, the model says {t.datatype}")
        shape = d.shape if d.shape is not None else t.shape
        out.append((TensorSpec(t.name, t.datatype, concrete_shape(shape, batch)), d.data))
    return out


def expected_outputs(
    meta_inputs: list[TensorSpec] | None, meta_outputs: list[TensorSpec] | None, sent: list[TensorSpec], batch: int
) -> list[TensorSpec]:
    """Output specs to check responses against: fixed dims from metadata, the batch when the model batches."""
    if not meta_outputs:
        return []
    batched = bool(meta_inputs) and all(t.shape and t.shape[0] < 0 for t in meta_inputs or [])
    batched = batched and all(s.shape and s.shape[0] == batch for s in sent)
    out = []
    for t in meta_outputs:
        shape = list(t.shape)
        if batched and shape and shape[0] < 0:
            shape[0] = batch
        out.append(TensorSpec(t.name, t.datatype, shape))
    return out


def prepare(
    cfg: PerfConfig, meta: tuple[list[TensorSpec], list[TensorSpec]] | None, rng: np.random.Generator
) -> Prepared:
    meta_in, meta_out = meta if meta else (None, None)
    resolved = resolve_inputs(meta_in, cfg.inputs, cfg.batch)
    specs = [s for s, _ in resolved]
    sources = [d for _, d in resolved]
    pool: list[list[np.ndarray]] = []
    try:
        for i in range(cfg.pool):
            pool.append([make_array(s.name, s.datatype, s.shape, d, rng, i) for s, d in resolved])
    except (ScenarioError, LoadgenError) as exc:
        raise PerfError(str(exc)) from None
    expected = expected_outputs(meta_in, meta_out, specs, cfg.batch)
    if cfg.outputs:
        names = {t.name for t in expected}
        missing = [o for o in cfg.outputs if expected and o not in names]
        if missing:
            raise PerfError(f"outputs {missing} are not outputs of the model; its outputs: {sorted(names)}")
        expected = [t for t in expected if t.name in cfg.outputs]
    return Prepared(specs, sources, pool, expected, list(cfg.outputs))


def _set_param(param: Any, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def _pb() -> Any:
    from dl_inference.protocol.generated import grpc_service_pb2

    return grpc_service_pb2


def encode_grpc(cfg: PerfConfig, prep: Prepared, arrays: list[np.ndarray]) -> bytes:
    """A serialized V2 ModelInferRequest with raw input contents."""
    pb = _pb()
    request = pb.ModelInferRequest(model_name=cfg.model, model_version=cfg.model_version)
    for key, value in cfg.parameters.items():
        _set_param(request.parameters[key], value)
    for spec, array in zip(prep.inputs, arrays, strict=True):
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        request.raw_input_contents.append(raw_bytes(spec.datatype, array))
    for name in prep.requested:
        request.outputs.add(name=name)
    return request.SerializeToString()


def _json_bytes_data(name: str, array: np.ndarray) -> list[str]:
    out = []
    for item in array.reshape(-1):
        try:
            out.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError:
            raise PerfError(
                f"input '{name}' holds binary BYTES that JSON cannot carry: use --protocol http-binary or grpc"
            ) from None
    return out


def encode_http(
    cfg: PerfConfig, prep: Prepared, arrays: list[np.ndarray], binary: bool
) -> tuple[bytes, dict[str, str]]:
    """V2 HTTP infer body and headers: JSON, or JSON header + raw tensors (binary tensor data extension)."""
    inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for spec, array in zip(prep.inputs, arrays, strict=True):
        entry: dict[str, Any] = {"name": spec.name, "shape": spec.shape, "datatype": spec.datatype}
        if binary:
            blob = raw_bytes(spec.datatype, array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif spec.datatype == "BYTES":
            entry["data"] = _json_bytes_data(spec.name, array)
        else:
            entry["data"] = array.reshape(-1).tolist()
        inputs.append(entry)
    doc: dict[str, Any] = {"inputs": inputs}
    if cfg.parameters:
        doc["parameters"] = dict(cfg.parameters)
    names = prep.requested or [t.name for t in prep.outputs]
    if binary:
        if names:
            doc["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in names]
        else:
            doc.setdefault("parameters", {})["binary_data_output"] = True
        header = json.dumps(doc, separators=(",", ":")).encode()
        return header + b"".join(blobs), {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
    if prep.requested:
        doc["outputs"] = [{"name": n} for n in prep.requested]
    return json.dumps(doc, separators=(",", ":")).encode(), {"Content-Type": "application/json"}


def _tfs_value(array: np.ndarray) -> Any:
    """Nested lists for TF-Serving JSON; BYTES as strings, or ``{"b64": ...}`` when not UTF-8."""
    if array.dtype != np.object_:
        return array.tolist()

    def one(item: Any) -> Any:
        data = bytes(item) if not isinstance(item, str) else item.encode()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(data).decode("ascii")}

    def nest(a: np.ndarray) -> Any:
        return [nest(x) for x in a] if a.ndim > 1 else [one(x) for x in a]

    return nest(array) if array.ndim else one(array.item())


def encode_tfs_rest(cfg: PerfConfig, prep: Prepared, arrays: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """TF-Serving REST predict body: ``{"instances": [row, ...]}`` or ``{"inputs": {name: tensor}}``."""
    doc: dict[str, Any] = {}
    if cfg.tfs_signature:
        doc["signature_name"] = cfg.tfs_signature
    if cfg.tfs_format == "inputs":
        doc["inputs"] = {s.name: _tfs_value(a) for s, a in zip(prep.inputs, arrays, strict=True)}
    else:
        rows = {len(a) if a.ndim else 1 for a in arrays}
        if len(rows) != 1 or any(a.ndim == 0 for a in arrays):
            raise PerfError("--tfs-format instances needs inputs with the same first (batch) dimension; use inputs")
        n = rows.pop()
        if len(arrays) == 1:
            doc["instances"] = [_tfs_value(arrays[0][i]) for i in range(n)]
        else:
            doc["instances"] = [
                {s.name: _tfs_value(a[i]) for s, a in zip(prep.inputs, arrays, strict=True)} for i in range(n)
            ]
    return json.dumps(doc, separators=(",", ":")).encode(), {"Content-Type": "application/json"}


def _tfs_modules() -> tuple[Any, Any, Any, Any]:
    try:
        from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorflow_serving.apis import predict_pb2
    except ImportError as exc:
        raise PerfError(
            "--protocol tfs-grpc needs the TF-Serving API protos: pip install tensorflow-serving-api "
            f"(not importable here: {exc}); --protocol tfs-rest needs nothing extra"
        ) from None
    return predict_pb2, tensor_pb2, tensor_shape_pb2, types_pb2


_TF_DTYPES = {
    "BOOL": "DT_BOOL",
    "UINT8": "DT_UINT8",
    "UINT16": "DT_UINT16",
    "UINT32": "DT_UINT32",
    "UINT64": "DT_UINT64",
    "INT8": "DT_INT8",
    "INT16": "DT_INT16",
    "INT32": "DT_INT32",
    "INT64": "DT_INT64",
    "FP16": "DT_HALF",
    "FP32": "DT_FLOAT",
    "FP64": "DT_DOUBLE",
    "BF16": "DT_BFLOAT16",
    "BYTES": "DT_STRING",
}


def encode_tfs_grpc(cfg: PerfConfig, prep: Prepared, arrays: list[np.ndarray]) -> bytes:
    predict_pb2, tensor_pb2, tensor_shape_pb2, types_pb2 = _tfs_modules()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = cfg.model
    if cfg.model_version:
        request.model_spec.version.value = int(cfg.model_version)
    if cfg.tfs_signature:
        request.model_spec.signature_name = cfg.tfs_signature
    for spec, array in zip(prep.inputs, arrays, strict=True):
        tensor = tensor_pb2.TensorProto(dtype=getattr(types_pb2, _TF_DTYPES[spec.datatype]))
        tensor.tensor_shape.CopyFrom(
            tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in spec.shape])
        )
        if spec.datatype == "BYTES":
            tensor.string_val.extend(bytes(x) for x in array.reshape(-1))
        else:
            tensor.tensor_content = np.ascontiguousarray(array).tobytes()
        request.inputs[spec.name].CopyFrom(tensor)
    for name in prep.requested:
        request.output_filter.append(name)
    return bytes(request.SerializeToString())


# ---------------------------------------------------------------------------------------------
# targets: one per protocol


class Target:
    """A connection to the server under test.

    ``connect()`` opens it and returns the model's (inputs, outputs) metadata, or None when the
    protocol has none; ``prepare()`` builds the request bodies; ``infer(i, verify)`` sends request
    ``i`` of the pool and returns ``(error, send_s, recv_s, decode_s)``: the error key (None when it
    succeeded; ``UNAVAILABLE``, ``HTTP 503``, ``BAD_RESPONSE``, ``TIMEOUT``...), the seconds spent
    serializing it inside the call (``--serialize each``), receiving the body after the response
    headers (HTTP), and parsing/checking the response (when ``verify``).
    """

    protocol = "?"

    def __init__(self, cfg: PerfConfig) -> None:
        self.cfg = cfg
        self.samples: dict[str, str] = {}
        self.prep: Prepared | None = None
        self.bodies: list[Any] = []
        self.serialize_us: float | None = None  # measured when building the pool
        self.request_bytes: int | None = None

    def note(self, key: str, message: str) -> None:
        self.samples.setdefault(key, message[:500])

    async def connect(self) -> tuple[list[TensorSpec], list[TensorSpec]] | None:
        return None

    def encode(self, arrays: list[np.ndarray]) -> Any:
        raise NotImplementedError

    def prepare(self, prep: Prepared) -> None:
        self.prep = prep
        self.bodies = [self.encode(arrays) for arrays in prep.pool]
        t = clock()
        self.encode(prep.pool[0])  # timed once more, warm (the first call pays for imports and caches)
        self.serialize_us = (clock() - t) * 1e6
        first = self.bodies[0]
        self.request_bytes = len(first[0] if isinstance(first, tuple) else first)

    def body(self, index: int) -> tuple[Any, float]:
        if self.cfg.serialize == "each":
            assert self.prep is not None
            t = clock()
            body = self.encode(self.prep.pool[index])
            return body, clock() - t
        return self.bodies[index], 0.0

    async def infer(self, index: int, verify: bool) -> Outcome:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class GrpcTarget(Target):
    protocol = "grpc"

    async def connect(self) -> tuple[list[TensorSpec], list[TensorSpec]] | None:
        import grpc

        target = self.cfg.target()
        self.channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self._rpc_error = grpc.aio.AioRpcError
        lcfg = LoadConfig(
            url=target, model=self.cfg.model, model_version=self.cfg.model_version,
            connect_timeout=self.cfg.connect_timeout,
        )  # fmt: skip
        try:
            await asyncio.wait_for(self.channel.channel_ready(), self.cfg.connect_timeout)
            meta = await self.metadata(lcfg)
        except TimeoutError:
            raise PerfError(f"cannot connect to gRPC {target} within {self.cfg.connect_timeout} s") from None
        except grpc.aio.AioRpcError as exc:
            raise PerfError(
                f"ModelMetadata('{self.cfg.model}') on {target}: {exc.code().name} {exc.details()}"
            ) from None
        self.call = self.channel.unary_unary(self.path)  # bytes in, bytes out
        return meta

    path = MODEL_INFER_PATH

    async def metadata(self, lcfg: LoadConfig) -> tuple[list[TensorSpec], list[TensorSpec]] | None:
        return await grpc_metadata(self.channel, lcfg)

    def encode(self, arrays: list[np.ndarray]) -> bytes:
        assert self.prep is not None
        return encode_grpc(self.cfg, self.prep, arrays)

    def check(self, data: bytes) -> str | None:
        assert self.prep is not None
        return check_grpc_response(
            data, LoadConfig(model=self.cfg.model), Workload(self.prep.inputs, [], self.prep.outputs)
        )

    async def infer(self, index: int, verify: bool) -> Outcome:
        body, send_s = self.body(index)
        try:
            data = await self.call(body, timeout=self.cfg.request_timeout)
        except self._rpc_error as exc:
            key = exc.code().name
            self.note(key, exc.details() or "")
            return key, send_s, 0.0, 0.0
        if not verify:
            return None, send_s, 0.0, 0.0
        t = clock()
        problem = self.check(data)
        decode_s = clock() - t
        if problem:
            self.note("BAD_RESPONSE", problem)
            return "BAD_RESPONSE", send_s, 0.0, decode_s
        return None, send_s, 0.0, decode_s

    async def close(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None:
            await channel.close()


class TfsGrpcTarget(GrpcTarget):
    protocol = "tfs-grpc"
    path = TFS_PREDICT_PATH

    async def connect(self) -> tuple[list[TensorSpec], list[TensorSpec]] | None:
        _tfs_modules()  # fail early and clearly when the package is missing
        return await super().connect()

    async def metadata(self, lcfg: LoadConfig) -> None:
        return None

    def encode(self, arrays: list[np.ndarray]) -> bytes:
        assert self.prep is not None
        return encode_tfs_grpc(self.cfg, self.prep, arrays)

    def check(self, data: bytes) -> str | None:
        predict_pb2 = _tfs_modules()[0]
        try:
            response = predict_pb2.PredictResponse.FromString(data)
        except Exception as exc:
            return f"response does not parse as PredictResponse: {exc}"
        if not response.outputs:
            return "PredictResponse has no outputs"
        missing = [n for n in (self.prep.requested if self.prep else []) if n not in response.outputs]
        return f"outputs {missing} missing; got {sorted(response.outputs)}" if missing else None


class HttpTarget(Target):
    """V2 HTTP (JSON or binary) and TF-Serving REST, over one aiohttp session."""

    def __init__(self, cfg: PerfConfig, connections: int) -> None:
        super().__init__(cfg)
        self.protocol = cfg.protocol
        self.connections = connections
        self.session: Any = None

    def model_path(self) -> str:
        base = self.cfg.target()
        version = f"/versions/{self.cfg.model_version}" if self.cfg.model_version else ""
        if self.protocol == "tfs-rest":
            return f"{base}/v1/models/{self.cfg.model}{version}"
        return f"{base}/v2/models/{self.cfg.model}{version}"

    async def connect(self) -> tuple[list[TensorSpec], list[TensorSpec]] | None:
        import aiohttp

        self._aiohttp = aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(self.connections, 1), ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=self.cfg.request_timeout),
            auto_decompress=False,
        )
        path = self.model_path()
        self.url = f"{path}:predict" if self.protocol == "tfs-rest" else f"{path}/infer"
        if self.protocol == "tfs-rest":
            return None
        try:
            async with self.session.get(path, timeout=aiohttp.ClientTimeout(total=self.cfg.connect_timeout)) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise PerfError(f"GET {path}: HTTP {resp.status} {text[:300]}")
                meta = json.loads(text)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise PerfError(f"GET {path}: {type(exc).__name__} {exc}") from None

        def specs(key: str) -> list[TensorSpec]:
            return [TensorSpec(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta.get(key, [])]

        return specs("inputs"), specs("outputs")

    def encode(self, arrays: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
        assert self.prep is not None
        if self.protocol == "tfs-rest":
            return encode_tfs_rest(self.cfg, self.prep, arrays)
        return encode_http(self.cfg, self.prep, arrays, binary=self.protocol == "http-binary")

    def check(self, payload: bytes, header_length: str | None) -> str | None:
        assert self.prep is not None
        if self.protocol != "tfs-rest":
            return check_http_response(payload, header_length, Workload(self.prep.inputs, [], self.prep.outputs))
        try:
            doc = json.loads(payload)
        except ValueError as exc:
            return f"response is not JSON: {exc}"
        if not isinstance(doc, dict) or not ("predictions" in doc or "outputs" in doc):
            return f"response has neither 'predictions' nor 'outputs': {str(doc)[:200]}"
        if self.cfg.tfs_format == "instances" and "predictions" in doc:
            rows = self.prep.inputs[0].shape[0] if self.prep.inputs and self.prep.inputs[0].shape else 1
            if not isinstance(doc["predictions"], list) or len(doc["predictions"]) != rows:
                return f"'predictions' should list {rows} rows"
        return None

    async def infer(self, index: int, verify: bool) -> Outcome:
        (body, headers), send_s = self.body(index)
        try:
            async with self.session.post(self.url, data=body, headers=headers) as resp:
                t_head = clock()
                payload = await resp.read()
                recv_s = clock() - t_head
                if resp.status != 200:
                    key = f"HTTP {resp.status}"
                    self.note(key, payload[:300].decode("utf-8", "replace"))
                    return key, send_s, recv_s, 0.0
                if not verify:
                    return None, send_s, recv_s, 0.0
                t = clock()
                problem = self.check(payload, resp.headers.get("Inference-Header-Content-Length"))
                decode_s = clock() - t
        except TimeoutError:
            self.note("TIMEOUT", f"no answer within {self.cfg.request_timeout} s")
            return "TIMEOUT", send_s, 0.0, 0.0
        except self._aiohttp.ClientError as exc:
            key = type(exc).__name__
            self.note(key, str(exc))
            return key, send_s, 0.0, 0.0
        if problem:
            self.note("BAD_RESPONSE", problem)
            return "BAD_RESPONSE", send_s, recv_s, decode_s
        return None, send_s, recv_s, decode_s

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class SharedMemoryGrpcTarget(GrpcTarget):
    """gRPC with the tensors in shared memory: one input and one output region per request in flight,
    registered on first use (load_tests/shm_client.py); a request waits for a free pair."""

    protocol = "grpc"

    def __init__(self, cfg: PerfConfig, in_flight: int) -> None:
        super().__init__(cfg)
        self.in_flight = in_flight
        self.slots: Any = None
        self._ready: asyncio.Lock | None = None

    async def _slots(self) -> Any:
        from load_tests.shm_client import SharedMemorySlots, fixed_nbytes

        if self._ready is None:
            self._ready = asyncio.Lock()
        async with self._ready:
            if self.slots is None:
                assert self.prep is not None
                try:
                    outputs = [(o.name, fixed_nbytes(o.datatype, o.shape)) for o in self.prep.outputs]
                except ValueError as exc:
                    raise PerfError(f"--shared-memory: {exc}") from None
                arrays = self.prep.pool[0]
                inputs = [
                    (t.name, t.datatype, t.shape, raw_bytes(t.datatype, a))
                    for t, a in zip(self.prep.inputs, arrays, strict=True)
                ]
                slots = SharedMemorySlots(self.channel, self.cfg.shared_memory)
                await slots.add(self.in_flight, self.cfg.model, self.cfg.model_version, inputs, outputs)
                self.slots = slots
        return self.slots

    async def infer(self, index: int, verify: bool) -> Outcome:
        slots = self.slots or await self._slots()
        slot = await slots.free.get()
        try:
            data = await self.call(slot.request, timeout=self.cfg.request_timeout)
        except self._rpc_error as exc:
            key = exc.code().name
            self.note(key, exc.details() or "")
            return key, 0.0, 0.0, 0.0
        finally:
            slots.free.put_nowait(slot)
        if verify and any(len(raw) for raw in _pb().ModelInferResponse.FromString(data).raw_output_contents):
            self.note("BAD_RESPONSE", "outputs in shared memory came back with bytes in the response")
            return "BAD_RESPONSE", 0.0, 0.0, 0.0
        return None, 0.0, 0.0, 0.0

    async def close(self) -> None:
        if self.slots is not None:
            await self.slots.close()
        await super().close()


def make_target(cfg: PerfConfig) -> Target:
    if cfg.protocol == "grpc" and cfg.shared_memory:
        return SharedMemoryGrpcTarget(cfg, max([*cfg.concurrency, *([cfg.max_outstanding] if cfg.rate else []), 1]))
    if cfg.protocol == "grpc":
        return GrpcTarget(cfg)
    if cfg.protocol == "tfs-grpc":
        return TfsGrpcTarget(cfg)
    connections = max([*cfg.concurrency, *([cfg.max_outstanding] if cfg.rate else []), 1])
    return HttpTarget(cfg, connections)


# ---------------------------------------------------------------------------------------------
# server statistics (V2 ModelStatistics), before and after the measurement


def normalize_stats(entries: Iterable[dict[str, Any]], model: str, version: str = "") -> dict[str, Any] | None:
    """Sum V2 ModelStatistics entries (JSON form) of ``model`` (and ``version`` when given)."""
    total: dict[str, Any] = {"inference_count": 0, "execution_count": 0, **{k: [0, 0] for k in STAT_KEYS}}
    found = False
    for entry in entries:
        if entry.get("name") != model or (version and str(entry.get("version", "")) != version):
            continue
        found = True
        total["inference_count"] += int(entry.get("inference_count", 0))
        total["execution_count"] += int(entry.get("execution_count", 0))
        stats = entry.get("inference_stats") or {}
        for key in STAT_KEYS:
            d = stats.get(key) or {}
            total[key][0] += int(d.get("count", 0))
            total[key][1] += int(d.get("ns", 0))
    return total if found else None


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Counters after - before, and per-request averages (delta ns / delta count) in microseconds."""
    delta: dict[str, Any] = {
        "inference_count": after["inference_count"] - before["inference_count"],
        "execution_count": after["execution_count"] - before["execution_count"],
    }
    per_request: dict[str, float | None] = {}
    for key in STAT_KEYS:
        count = after[key][0] - before[key][0]
        ns = after[key][1] - before[key][1]
        delta[f"{key}_count"] = count
        delta[f"{key}_ns"] = ns
        if key != "fail":
            per_request["request" if key == "success" else key] = ns / count / 1000.0 if count > 0 else None
    delta["avg_batch"] = delta["inference_count"] / delta["execution_count"] if delta["execution_count"] > 0 else None
    delta["per_request_us"] = per_request
    return delta


class StatsSource:
    """Reads V2 model statistics over gRPC (ModelStatistics) or HTTP (GET .../stats)."""

    def __init__(self, cfg: PerfConfig, kind: str, where: str, target: Target | None = None) -> None:
        self.cfg = cfg
        self.kind = kind  # grpc | http
        self.where = where
        self.target = target
        self.error: str | None = None
        self._session: Any = None

    async def snapshot(self) -> dict[str, Any] | None:
        try:
            entries = await (self._grpc() if self.kind == "grpc" else self._http())
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:300]
            return None
        snap = normalize_stats(entries, self.cfg.model, self.cfg.model_version)
        if snap is None:
            self.error = f"no statistics for model '{self.cfg.model}' from {self.where}"
        return snap

    async def _grpc(self) -> list[dict[str, Any]]:
        from google.protobuf import json_format

        pb = _pb()
        assert isinstance(self.target, GrpcTarget)
        call = self.target.channel.unary_unary(
            MODEL_STATISTICS_PATH,
            request_serializer=pb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=pb.ModelStatisticsResponse.FromString,
        )
        reply = await call(
            pb.ModelStatisticsRequest(name=self.cfg.model, version=self.cfg.model_version),
            timeout=self.cfg.connect_timeout,
        )
        return [
            json_format.MessageToDict(s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for s in reply.model_stats
        ]

    async def _http(self) -> list[dict[str, Any]]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.connect_timeout))
        version = f"/versions/{self.cfg.model_version}" if self.cfg.model_version else ""
        url = f"{self.where}/v2/models/{self.cfg.model}{version}/stats"
        async with self._session.get(url) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise PerfError(f"GET {url}: HTTP {resp.status} {text[:200]}")
        return list(json.loads(text).get("model_stats", []))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def make_stats_source(cfg: PerfConfig, target: Target) -> StatsSource | None:
    if not cfg.server_stats:
        return None
    if cfg.stats_url:
        url = cfg.stats_url.rstrip("/")
        return StatsSource(cfg, "http", url if "://" in url else f"http://{url}")
    if cfg.protocol == "grpc":
        return StatsSource(cfg, "grpc", cfg.target(), target)
    if cfg.protocol in ("http", "http-binary"):
        return StatsSource(cfg, "http", cfg.target())
    return None  # TF-Serving has no V2 statistics; --stats-url points at a V2 HTTP endpoint


# ---------------------------------------------------------------------------------------------
# measurement windows and the stability rule


class Window:
    """Requests that completed between ``t_open`` and ``t_close`` (perf_analyzer's rule: by end time)."""

    __slots__ = (
        "decode",
        "decoded",
        "delayed",
        "errors",
        "hist",
        "lag",
        "lag_hist",
        "lat",
        "late",
        "late_s",
        "open_loop",
        "recv",
        "send",
        "t_close",
        "t_open",
    )

    def __init__(self, t_open: float, open_loop: bool = False, late_s: float = 0.005) -> None:
        self.t_open = t_open
        self.t_close = t_open
        self.open_loop = open_loop
        self.late_s = late_s
        self.lat: list[int] = []  # ns, successful requests
        self.lag: list[int] = []  # ns, intended -> actual send (open loop)
        self.errors: collections.Counter[str] = collections.Counter()
        self.send = self.recv = self.decode = 0.0
        self.decoded = self.delayed = self.late = 0
        self.hist = Histogram()
        self.lag_hist = Histogram()

    def record(
        self, intended: float, started: float, done: float, error: str | None, send: float, recv: float, decode: float
    ) -> None:
        if error is None:
            self.lat.append(int((done - intended) * 1e9))
            self.send += send
            self.recv += recv
            if decode:
                self.decode += decode
                self.decoded += 1
        else:
            self.errors[error] += 1
        if self.open_loop:
            lag = started - intended
            self.lag.append(max(0, int(lag * 1e9)))
            if lag > self.late_s:
                self.late += 1

    def close(self, t: float) -> Window:
        self.t_close = t
        self.hist.record_many(np.asarray(self.lat, dtype=np.int64))
        self.lag_hist.record_many(np.asarray(self.lag, dtype=np.int64))
        self.lat, self.lag = [], []
        return self

    @property
    def duration(self) -> float:
        return self.t_close - self.t_open

    @property
    def requests(self) -> int:
        return self.hist.count

    @property
    def throughput(self) -> float:
        return self.requests / self.duration if self.duration > 0 else 0.0

    @property
    def p99_ms(self) -> float | None:
        v = self.hist.percentile(99)
        return None if v is None else v / 1e6


def is_stable(windows: Sequence[tuple[float, float | None]], n: int = 3, pct: float = 10.0) -> bool:
    """perf_analyzer's rule: the last ``n`` windows' throughput and p99 are each within ``pct`` % of
    their mean. ``windows`` are ``(throughput, p99)`` pairs; a window without requests is never stable."""
    if len(windows) < n:
        return False
    last = windows[-n:]
    if any(tp <= 0 or p99 is None for tp, p99 in last):
        return False
    for values in ([tp for tp, _ in last], [float(p99) for _, p99 in last if p99 is not None]):
        mean = sum(values) / n
        if mean <= 0 or any(abs(v - mean) > pct / 100.0 * mean for v in values):
            return False
    return True


class Progress:
    """One ``\\r`` line on stderr while a point runs; nothing when disabled."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        pad = max(0, self.width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self.width = len(text)

    def clear(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


class LoadRun:
    """Drives one phase of load (warm-up or measurement) against a target."""

    def __init__(self, target: Target, cfg: PerfConfig, point: Point, pool: int, seed: int) -> None:
        self.target = target
        self.cfg = cfg
        self.point = point
        self.pool = pool
        self.every = max(1, cfg.check_every)
        self.open_loop = point.mode == "rate"
        self.rng = np.random.default_rng(seed)
        self.window: Window | None = None
        self.warmup = False
        self.warmup_errors: collections.Counter[str] = collections.Counter()
        self.stop = False
        self.sent = 0
        self.checked = 0
        self.outstanding = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.slot = asyncio.Event()
        self.schedule: Any = None
        self.next_intended: float | None = None
        self.unsent = 0

    async def _one(self, intended: float | None) -> None:
        n = self.sent
        self.sent += 1
        verify = n % self.every == 0
        if verify:
            self.checked += 1
        started = clock()
        try:
            error, send, recv, decode = await self.target.infer(n % self.pool, verify)
        except Exception as exc:  # an unforeseen transport error counts, never kills the run
            error, send, recv, decode = type(exc).__name__, 0.0, 0.0, 0.0
            self.target.note(error, str(exc))
        done = clock()
        w = self.window
        if w is not None:
            w.record(started if intended is None else intended, started, done, error, send, recv, decode)
        elif self.warmup and error:
            self.warmup_errors[error] += 1

    async def _closed_worker(self) -> None:
        while not self.stop:
            await self._one(None)

    async def _fire(self, intended: float) -> None:
        try:
            await self._one(intended)
        finally:
            self.outstanding -= 1
            self.slot.set()

    async def _scheduler(self, t0: float) -> None:
        """Send on the schedule; cancelled by :meth:`finish` (``next_intended`` is then the first unsent)."""
        loop = asyncio.get_running_loop()
        limit = self.cfg.max_outstanding
        self.schedule = iter(arrival_times(self.point.value, self.cfg.arrival, t0, self.rng))
        self.next_intended = next(self.schedule)
        while not self.stop:
            intended = self.next_intended
            now = clock()
            if intended > now:
                await asyncio.sleep(intended - now)
                continue
            delayed = False
            while self.outstanding >= limit:
                delayed = True
                self.slot.clear()
                await self.slot.wait()
            if delayed and self.window is not None:
                self.window.delayed += 1
            self.outstanding += 1
            task = loop.create_task(self._fire(intended))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.next_intended = next(self.schedule)

    def start(self, t0: float) -> list[asyncio.Task[None]]:
        loop = asyncio.get_running_loop()
        if self.open_loop:
            return [loop.create_task(self._scheduler(t0))]
        return [loop.create_task(self._closed_worker()) for _ in range(int(self.point.value))]

    async def finish(self, drivers: list[asyncio.Task[None]], t_end: float) -> None:
        """Stop sending, drain what is in flight, and count what the schedule wanted sent by ``t_end`` but
        was not (open loop)."""
        self.stop = True
        if self.open_loop:
            for task in drivers:
                task.cancel()
            await asyncio.gather(*drivers, return_exceptions=True)
            waiting = list(self.tasks)
        else:
            waiting = list(drivers)
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=self.cfg.request_timeout + 5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.open_loop and self.next_intended is not None and self.schedule is not None:
            t = self.next_intended
            while t <= t_end:
                self.unsent += 1
                t = next(self.schedule)

    async def run_warmup(self, seconds: float) -> None:
        self.warmup = True
        t0 = clock()
        drivers = self.start(t0)
        await asyncio.sleep(seconds)
        await self.finish(drivers, t0 + seconds)

    async def measure(self, progress: Progress) -> tuple[list[Window], float, float]:
        """Windows until stable or ``max_windows``; returns (windows, client CPU seconds, wall seconds)."""
        cfg = self.cfg
        window_s = cfg.window_ms / 1000.0
        t0 = clock()
        late_s = cfg.late_ms / 1000.0
        self.window = Window(t0, self.open_loop, late_s)
        cpu0 = time.process_time()
        drivers = self.start(t0)
        windows: list[Window] = []
        label = self.point.label()
        while True:
            t_next = t0 + (len(windows) + 1) * window_s
            while True:
                now = clock()
                if now >= t_next:
                    break
                await asyncio.sleep(min(t_next - now, 0.5) if progress.enabled else t_next - now)
                w = self.window
                if progress.enabled and w is not None:
                    elapsed = clock() - w.t_open
                    rate = len(w.lat) / elapsed if elapsed > 0 else 0.0
                    progress.show(
                        f"[{label}] {clock() - t0:6.1f} s  window {len(windows) + 1}/{cfg.max_windows}  "
                        f"{rate:8.1f} req/s  errors {sum(w.errors.values())}"
                    )
            now = clock()
            closing = self.window
            assert closing is not None
            self.window = Window(now, self.open_loop, late_s)
            windows.append(closing.close(now))
            pairs = [(w.throughput, w.p99_ms) for w in windows]
            if is_stable(pairs, cfg.stability_windows, cfg.stability_pct) or len(windows) >= cfg.max_windows:
                break
        self.window = None
        cpu = time.process_time() - cpu0
        t_end = clock()
        # Unsent: due (by more than the lateness allowance) before the last window closed, never sent.
        await self.finish(drivers, windows[-1].t_close - late_s)
        progress.clear()
        return windows, cpu, t_end - t0


# ---------------------------------------------------------------------------------------------
# one sweep point -> report


def _ms(v: float | int | None) -> float | None:
    return None if v is None else v / 1e6


def summarize_point(
    cfg: PerfConfig,
    point: Point,
    windows: list[Window],
    server: dict[str, Any] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The report of one sweep point (see the README's key table)."""
    n = min(cfg.stability_windows, len(windows))
    used = windows[-n:]
    hist = Histogram.merged(w.hist for w in used)
    lag = Histogram.merged(w.lag_hist for w in used)
    duration = sum(w.duration for w in used)
    ok = hist.count
    errors: collections.Counter[str] = collections.Counter()
    for w in used:
        errors.update(w.errors)
    send = sum(w.send for w in used)
    recv = sum(w.recv for w in used)
    decode = sum(w.decode for w in used)
    decoded = sum(w.decoded for w in used)
    stable = is_stable([(w.throughput, w.p99_ms) for w in windows], cfg.stability_windows, cfg.stability_pct)
    rps = ok / duration if duration > 0 else 0.0
    mean_ms = _ms(hist.mean)
    latency: dict[str, float | None] = {f"p{p}": _ms(hist.percentile(p)) for p in PERCENTILES}
    latency.update(max=_ms(hist.max), min=_ms(hist.min), mean=mean_ms)
    lag_mean_us = (lag.mean or 0.0) / 1e3 if point.mode == "rate" else 0.0
    client: dict[str, float | None] = {"send": None, "recv": None, "decode": None, "network_server": None}
    if ok:
        client["send"] = send / ok * 1e6
        client["recv"] = (recv + decode) / ok * 1e6
        client["decode"] = decode / decoded * 1e6 if decoded else None
        assert mean_ms is not None
        client["network_server"] = mean_ms * 1e3 - lag_mean_us - client["send"] - client["recv"]  # type: ignore[operator]
    if server is not None and client["network_server"] is not None:
        request_us = server["per_request_us"].get("request")
        server["client_overhead_us"] = None if request_us is None else client["network_server"] - request_us
    total_ok = sum(w.requests for w in windows)
    total_err = sum(sum(w.errors.values()) for w in windows)
    report: dict[str, Any] = {
        "mode": point.mode,
        "label": point.label(),
        "concurrency": int(point.value) if point.mode == "concurrency" else None,
        "request_rate": point.value if point.mode == "rate" else None,
        "arrival": cfg.arrival if point.mode == "rate" else None,
        "max_outstanding": cfg.max_outstanding if point.mode == "rate" else None,
        "protocol": cfg.protocol,
        "url": cfg.target(),
        "model": cfg.model,
        "model_version": cfg.model_version,
        "batch": cfg.batch,
        "stable": stable,
        "windows": len(windows),
        "windows_reported": n,
        "window_ms": cfg.window_ms,
        "duration_s": duration,
        "requests": ok,
        "errors": sum(errors.values()),
        "errors_by_status": dict(errors),
        "throughput_rps": rps,
        "inferences_per_s": rps * cfg.batch,
        "latency_ms": latency,
        "latency_distribution_ms": [[p, v / 1e6] for p, v in hist.distribution()],
        "client_us": client,
        "send_lag_ms": (
            {"mean": _ms(lag.mean), "p50": _ms(lag.percentile(50)), "p99": _ms(lag.percentile(99)), "max": _ms(lag.max)}
            if point.mode == "rate"
            else None
        ),
        "delayed_requests": sum(w.delayed for w in used) if point.mode == "rate" else 0,
        "late_requests": sum(w.late for w in used) if point.mode == "rate" else 0,
        "server": server,
        "totals": {
            "requests": total_ok,
            "errors": total_err,
            "duration_s": sum(w.duration for w in windows),
            "delayed_requests": sum(w.delayed for w in windows),
        },
        "windows_detail": [
            {
                "duration_s": round(w.duration, 6),
                "requests": w.requests,
                "errors": sum(w.errors.values()),
                "throughput_rps": w.throughput,
                "p50_ms": _ms(w.hist.percentile(50)),
                "p99_ms": w.p99_ms,
            }
            for w in windows
        ],
        "latency_histogram": hist.to_dict(),
    }
    report.update(extra)
    return report


async def run_point(
    target: Target, cfg: PerfConfig, point: Point, index: int, stats: StatsSource | None, progress: Progress
) -> dict[str, Any]:
    pool = len(target.bodies) or cfg.pool
    seed = cfg.seed * 1000 + index
    warm = LoadRun(target, cfg, point, pool, seed)
    if cfg.warmup > 0:
        progress.show(f"[{point.label()}] warming up {cfg.warmup:g} s")
        await warm.run_warmup(cfg.warmup)
    before = await stats.snapshot() if stats else None
    run = LoadRun(target, cfg, point, pool, seed + 500)
    windows, cpu, wall = await run.measure(progress)
    after = await stats.snapshot() if stats and before is not None else None
    server = stats_delta(before, after) if before is not None and after is not None else None
    extra = {
        "warmup_s": cfg.warmup,
        "warmup_errors_by_status": dict(warm.warmup_errors),
        "unsent_requests": run.unsent if point.mode == "rate" else 0,
        "checked_responses": run.checked,
        "client_cpu_util": cpu / wall if wall > 0 else None,
        "server_stats_error": stats.error if stats and server is None else None,
        "error_samples": dict(target.samples),
    }
    return summarize_point(cfg, point, windows, server, extra)


# ---------------------------------------------------------------------------------------------
# output: table, CSV, JSON, plot


TABLE_COLUMNS = [
    ("load", 17, "s"),
    ("infer/s", 9, ".1f"),
    ("p50 ms", 8, ".3f"),
    ("p90 ms", 8, ".3f"),
    ("p95 ms", 8, ".3f"),
    ("p99 ms", 8, ".3f"),
    ("max ms", 8, ".3f"),
    ("avg ms", 8, ".3f"),
    ("errors", 6, "d"),
    ("delayed", 7, "d"),
    ("stable", 6, "s"),
]


def table_header() -> str:
    return " ".join(f"{name:>{w}}" if i else f"{name:<{w}}" for i, (name, w, _) in enumerate(TABLE_COLUMNS))


def _fmt(v: Any, spec: str, width: int, left: bool = False) -> str:
    text = "-" if v is None else (f"{v:{spec}}" if spec != "s" else str(v))
    return f"{text:<{width}}" if left else f"{text:>{width}}"


def table_row(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    load = r["label"] + (" poisson" if r.get("arrival") == "poisson" else "")
    values = [
        load,
        r["inferences_per_s"],
        lat["p50"],
        lat["p90"],
        lat["p95"],
        lat["p99"],
        lat["max"],
        lat["mean"],
        r["errors"],
        r["delayed_requests"],
        "yes" if r["stable"] else "NO",
    ]
    return " ".join(_fmt(v, spec, w, i == 0) for i, (v, (_, w, spec)) in enumerate(zip(values, TABLE_COLUMNS)))


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def breakdown_line(r: dict[str, Any]) -> str:
    c = r["client_us"]
    parts = [
        f"client: send {_us(c['send'])} us, recv {_us(c['recv'])} us, network+server {_us(c['network_server'])} us"
    ]
    s = r.get("server")
    if s is not None:
        pr = s["per_request_us"]
        batch = "-" if s["avg_batch"] is None else f"{s['avg_batch']:.2f}"
        parts.append(
            f"server/req: queue {_us(pr['queue'])}, input {_us(pr['compute_input'])}, "
            f"infer {_us(pr['compute_infer'])}, output {_us(pr['compute_output'])}, "
            f"total {_us(pr['request'])} us (batch {batch}, "
            f"{s['inference_count']} inferences)"
        )
    elif r.get("server_stats_error"):
        parts.append(f"server stats: {r['server_stats_error']}")
    if r.get("send_lag_ms"):
        lag = r["send_lag_ms"]
        p99 = "-" if lag["p99"] is None else f"{lag['p99']:.2f}"
        parts.append(f"send lag p99 {p99} ms, late {r['late_requests']}, unsent {r['unsent_requests']}")
    return " " * 12 + " | ".join(parts)


CSV_COLUMNS = [
    "mode",
    "concurrency",
    "request_rate",
    "arrival",
    "protocol",
    "model",
    "batch",
    "stable",
    "windows",
    "duration_s",
    "requests",
    "errors",
    "delayed_requests",
    "late_requests",
    "unsent_requests",
    "inferences_per_s",
    "throughput_rps",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "avg_ms",
    "send_lag_p99_ms",
    "client_send_us",
    "client_recv_us",
    "client_network_server_us",
    "server_queue_us",
    "server_compute_input_us",
    "server_compute_infer_us",
    "server_compute_output_us",
    "server_request_us",
    "server_inference_count",
    "server_execution_count",
    "server_avg_batch",
    "client_cpu_util",
]


def csv_row(r: dict[str, Any]) -> dict[str, Any]:
    lat = r["latency_ms"]
    s = r.get("server") or {}
    pr = s.get("per_request_us") or {}
    c = r["client_us"]
    row = {
        "mode": r["mode"],
        "concurrency": r["concurrency"],
        "request_rate": r["request_rate"],
        "arrival": r["arrival"],
        "protocol": r["protocol"],
        "model": r["model"],
        "batch": r["batch"],
        "stable": r["stable"],
        "windows": r["windows"],
        "duration_s": r["duration_s"],
        "requests": r["requests"],
        "errors": r["errors"],
        "delayed_requests": r["delayed_requests"],
        "late_requests": r["late_requests"],
        "unsent_requests": r.get("unsent_requests", 0),
        "inferences_per_s": r["inferences_per_s"],
        "throughput_rps": r["throughput_rps"],
        "p50_ms": lat["p50"],
        "p90_ms": lat["p90"],
        "p95_ms": lat["p95"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "avg_ms": lat["mean"],
        "send_lag_p99_ms": (r.get("send_lag_ms") or {}).get("p99"),
        "client_send_us": c["send"],
        "client_recv_us": c["recv"],
        "client_network_server_us": c["network_server"],
        "server_queue_us": pr.get("queue"),
        "server_compute_input_us": pr.get("compute_input"),
        "server_compute_infer_us": pr.get("compute_infer"),
        "server_compute_output_us": pr.get("compute_output"),
        "server_request_us": pr.get("request"),
        "server_inference_count": s.get("inference_count"),
        "server_execution_count": s.get("execution_count"),
        "server_avg_batch": s.get("avg_batch"),
        "client_cpu_util": r.get("client_cpu_util"),
    }
    return {k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in row.items()}


def write_csv(path: Path, points: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in points:
            writer.writerow(csv_row(r))


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_plot(path: Path, points: list[dict[str, Any]], title: str = "") -> None:
    """PNG of p50 and p99 latency against throughput, one line per load mode (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PerfError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, name, colour in (("concurrency", "closed loop", "tab:blue"), ("rate", "open loop", "tab:red")):
        pts = [r for r in points if r["mode"] == mode and r["requests"]]
        if not pts:
            continue
        x = [r["inferences_per_s"] for r in pts]
        for key, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, [r["latency_ms"][key] for r in pts], style, color=colour, label=f"{name} {key}")
        for r in pts:
            ax.annotate(r["label"], (r["inferences_per_s"], r["latency_ms"]["p99"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))  # fmt: skip
    ax.set_xlabel("throughput (inferences/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title or "latency vs throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    return info


def config_dict(cfg: PerfConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["inputs"] = [{"name": i.name, "datatype": i.datatype, "shape": i.shape, "data": i.data.kind} for i in cfg.inputs]
    return d


# ---------------------------------------------------------------------------------------------
# the sweep


async def run_sweep_async(cfg: PerfConfig, target: Target | None = None, out: TextIO | None = None) -> dict[str, Any]:
    """Connect, prepare the requests, run every sweep point; returns the whole report.

    ``target`` replaces the protocol client (tests pass a fake); ``out`` gets the table (None: stdout,
    nothing when ``cfg.quiet``)."""
    cfg.validate()
    stream = out if out is not None else sys.stdout
    progress = Progress(cfg.progress if cfg.progress is not None else (sys.stderr.isatty() and not cfg.quiet))
    target = target or make_target(cfg)
    stats: StatsSource | None = None
    machine_start = machine_info()
    points: list[dict[str, Any]] = []
    try:
        try:
            meta = await target.connect()
        except LoadgenError as exc:
            raise PerfError(str(exc)) from None
        prep = prepare(cfg, meta, np.random.default_rng(cfg.seed))
        target.prepare(prep)
        stats = make_stats_source(cfg, target)
        if not cfg.quiet:
            shapes = ", ".join(f"{s.name} {s.datatype} {s.shape}" for s in prep.inputs)
            print(
                f"perf: {cfg.protocol} {cfg.target()} model '{cfg.model}'"
                f"{' v' + cfg.model_version if cfg.model_version else ''} batch {cfg.batch}: {shapes}; "
                f"{target.request_bytes} request bytes, pool {len(prep.pool)}",
                file=stream,
            )
            print(
                f"      windows of {cfg.window_ms:g} ms, stable when the last {cfg.stability_windows} are within "
                f"{cfg.stability_pct:g}% (max {cfg.max_windows}); warm-up {cfg.warmup:g} s per point",
                file=stream,
            )
            print(table_header(), file=stream, flush=True)
        for i, point in enumerate(cfg.points()):
            report = await run_point(target, cfg, point, i, stats, progress)
            points.append(report)
            if not cfg.quiet:
                print(table_row(report), file=stream)
                print(breakdown_line(report), file=stream, flush=True)
    finally:
        progress.clear()
        await target.close()
        if stats is not None:
            await stats.close()
    machine = dict(machine_start, loadavg_end=machine_info().get("loadavg"))
    return {
        "tool": "load_tests.perf",
        "scenario": cfg.scenario,
        "started_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": config_dict(cfg),
        "request": {
            "inputs": [dataclasses.asdict(s) for s in prep.inputs],
            "outputs": [dataclasses.asdict(s) for s in prep.outputs],
            "request_bytes": target.request_bytes,
            "serialize_us": target.serialize_us,
        },
        "machine": machine,
        "points": points,
    }


def run_sweep(cfg: PerfConfig) -> dict[str, Any]:
    """Run a sweep on a new event loop (uvloop when installed and ``cfg.use_uvloop``)."""
    return run_coroutine(run_sweep_async(cfg), cfg.use_uvloop)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# command line

BUILTIN_DEFAULTS: dict[str, Any] = {
    f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc,operator]
    for f in dataclasses.fields(PerfConfig)
}


def _int_list(text: str | int | Sequence[Any]) -> list[int]:
    items = text.split(",") if isinstance(text, str) else ([text] if isinstance(text, int) else list(text))
    try:
        return [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16, got {text!r}") from None


def _float_list(text: str | float | Sequence[Any]) -> list[float]:
    items = text.split(",") if isinstance(text, str) else ([text] if isinstance(text, (int, float)) else list(text))
    try:
        return [float(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 100,200, got {text!r}") from None


def _parse_input(text: str) -> InputDecl:
    parts = text.split(":")
    if len(parts) != 3 or not parts[0]:
        raise argparse.ArgumentTypeError(f"--input wants NAME:DATATYPE:D0,D1,..., got {text!r}")
    try:
        shape = [int(d) for d in parts[2].split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input dims must be integers, got {text!r}") from None
    return InputDecl(parts[0], parts[1] or None, shape)


def _parse_shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--shape wants NAME:D0,D1,..., got {text!r}")
    try:
        return name, [int(d) for d in dims.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape dims must be integers, got {text!r}") from None


def _parse_data(text: str) -> tuple[str, DataSource]:
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--data wants NAME=random|zeros|jpeg|file:PATH, got {text!r}")
    try:
        if spec.startswith("file:"):
            return name, parse_data_source({"source": "file", "path": spec[5:]})
        if spec == "jpeg":
            return name, parse_data_source({"source": "jpeg"})
        return name, parse_data_source(spec)
    except ScenarioError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_parameter(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--parameter wants KEY=VALUE, got {text!r}")
    return key, _parse_value(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.perf",
        description="perf_analyzer-style load generator: closed-loop concurrency sweeps and open-loop request "
        "rates, coordinated-omission-corrected latencies, stability windows, server-side breakdown.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    S = argparse.SUPPRESS  # defaults come from the scenario, then PerfConfig
    g = p.add_argument_group("target")
    g.add_argument("--scenario", default=None, help="bundled scenario name or path to a YAML file")
    g.add_argument("--list-scenarios", action="store_true", help="list the bundled scenarios and exit")
    g.add_argument("--make-repo", type=Path, default=None, metavar="DIR", help="write the scenario's models and exit")
    g.add_argument(
        "-u", "--url", default=S, help="host:port (default per protocol: 8001 gRPC, 8000 HTTP, 8500/8501 TFS)"
    )
    g.add_argument("-i", "--protocol", choices=PROTOCOLS, default=S, help="(default grpc)")
    g.add_argument("-m", "--model", default=S, help="(default simple)")
    g.add_argument("-x", "--model-version", default=S)
    g.add_argument("-b", "--batch", type=int, default=S, help="size of the first variable dimension (default 1)")
    g.add_argument("--input", action="append", type=_parse_input, default=[], metavar="NAME:DATATYPE:D0,D1",
                   help="declare an input (needed for TF-Serving; -1 first dim = batch)")  # fmt: skip
    g.add_argument("--shape", action="append", type=_parse_shape, default=[], metavar="NAME:D0,D1",
                   help="input shape override")  # fmt: skip
    g.add_argument("--data", action="append", type=_parse_data, default=[], metavar="NAME=SOURCE",
                   help="input data: random | zeros | jpeg | file:PATH")  # fmt: skip
    g.add_argument("--output", action="append", default=[], metavar="NAME", help="request only these outputs")
    g.add_argument("--parameter", action="append", type=_parse_parameter, default=[], metavar="KEY=VALUE",
                   help="request parameter")  # fmt: skip
    g.add_argument("--pool", type=int, default=S, help="distinct requests to cycle through (default 1)")
    g.add_argument("--tfs-format", choices=("instances", "inputs"), default=S, help="TF-Serving REST body format")
    g.add_argument("--tfs-signature", default=S, help="TF-Serving signature_name")
    g = p.add_argument_group("load")
    g.add_argument("-c", "--concurrency", type=_int_list, default=S, help="closed loop: e.g. 1,4,16")
    g.add_argument("-r", "--rate", type=_float_list, default=S, help="open loop, requests/s: e.g. 100,200,400")
    g.add_argument("--arrival", choices=("constant", "poisson"), default=S, help="open-loop spacing (default constant)")
    g.add_argument("--max-outstanding", type=int, default=S, help="open loop: in flight at most (default 256)")
    g.add_argument("--late-ms", type=float, default=S, help="open loop: sent this late counts as late (default 5)")
    g.add_argument("--serialize", choices=("once", "each"), default=S,
                   help="once: bodies pre-built (default); each: serialized per request, in the latency")  # fmt: skip
    g.add_argument("--check-every", type=int, default=S, help="parse and check one response in N (default 100)")
    g.add_argument("--shared-memory", choices=("system", "cuda"), default=S,
                   help="grpc: tensors in system or CUDA shared memory (regions per request in flight)")  # fmt: skip
    g.add_argument("--request-timeout", type=float, default=S, help="seconds (default 30)")
    g.add_argument("--connect-timeout", type=float, default=S, help="seconds (default 10)")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--no-uvloop", action="store_true", help="asyncio's own event loop")
    g = p.add_argument_group("measurement")
    g.add_argument("--window-ms", type=float, default=S, help="measurement window (default 5000)")
    g.add_argument("--stability-pct", type=float, default=S, help="stable when within this %% (default 10)")
    g.add_argument("--stability-windows", type=int, default=S, help="over this many last windows (default 3)")
    g.add_argument("--max-windows", type=int, default=S, help="give up (stable: false) after (default 10)")
    g.add_argument("--warmup", type=float, default=S, help="seconds of unmeasured load per point (default 1)")
    g.add_argument("--stats-url", default=S, help="V2 HTTP host:port for server statistics (default: the target)")
    g.add_argument("--no-server-stats", action="store_true", help="do not read V2 model statistics")
    g = p.add_argument_group("output")
    g.add_argument("--csv", type=Path, default=None)
    g.add_argument("--json", type=Path, default=None)
    g.add_argument("--plot", type=Path, default=None, help="PNG of p50/p99 latency vs throughput (matplotlib)")
    g.add_argument("-q", "--quiet", action="store_true", help="no table, no progress line")
    g.add_argument("--from-json", type=Path, default=None, metavar="REPORT",
                   help="print the table of a saved --json report (and --csv/--plot from it); no load")  # fmt: skip
    g.add_argument("--progress", dest="progress", action="store_true", default=None, help="force the progress line")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(args: argparse.Namespace, scenario: Scenario | None) -> PerfConfig:
    """Built-in defaults < scenario < command line."""
    values = dict(BUILTIN_DEFAULTS)
    if scenario is not None:
        values.update(scenario.options)
        if scenario.pool is not None:
            values["pool"] = scenario.pool
        values["outputs"] = list(scenario.outputs)
        values["parameters"] = dict(scenario.parameters)
    for key in BUILTIN_DEFAULTS:
        if key in vars(args) and key not in ("inputs", "outputs", "parameters", "progress", "quiet", "scenario"):
            values[key] = getattr(args, key)
    values["concurrency"] = _int_list(values["concurrency"] or [])
    values["rate"] = _float_list(values["rate"] or [])
    if "concurrency" in vars(args) and "rate" not in vars(args):
        values["rate"] = []  # a sweep asked for on the command line replaces the scenario's
    if "rate" in vars(args) and "concurrency" not in vars(args):
        values["concurrency"] = []
    for key, kind in (("batch", int), ("max_windows", int), ("pool", int), ("check_every", int), ("seed", int),
                      ("max_outstanding", int), ("stability_windows", int), ("window_ms", float),
                      ("stability_pct", float), ("warmup", float), ("late_ms", float),
                      ("request_timeout", float), ("connect_timeout", float)):  # fmt: skip
        values[key] = kind(values[key])
    values["model_version"] = str(values["model_version"] or "")
    inputs = {d.name: dataclasses.replace(d) for d in (scenario.inputs if scenario else [])}
    for decl in args.input:
        inputs[decl.name] = decl
    for name, shape in args.shape:
        inputs.setdefault(name, InputDecl(name)).shape = shape
    for name, source in args.data:
        inputs.setdefault(name, InputDecl(name)).data = source
    values["inputs"] = list(inputs.values())
    if args.output:
        values["outputs"] = list(args.output)
    values["parameters"] = {**values["parameters"], **dict(args.parameter)}
    values["server_stats"] = not args.no_server_stats
    values["use_uvloop"] = not args.no_uvloop
    values["quiet"] = args.quiet
    values["progress"] = args.progress
    values["scenario"] = scenario.name if scenario else None
    return PerfConfig(**values)


def print_table(points: list[dict[str, Any]], stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    print(table_header(), file=stream)
    for r in points:
        print(table_row(r), file=stream)
        print(breakdown_line(r), file=stream)


def reprint(args: argparse.Namespace) -> int:
    """``--from-json``: the table (and --csv / --plot) of a saved report."""
    try:
        report = json.loads(args.from_json.read_text())
        points = report["points"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"perf: cannot read {args.from_json}: {exc}", file=sys.stderr)
        return 2
    print_table(points)
    if args.csv:
        write_csv(args.csv, points)
    if args.plot:
        cfg = report.get("config", {})
        write_plot(args.plot, points, f"{cfg.get('model', '')} over {cfg.get('protocol', '')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_scenarios:
        for name in available_scenarios():
            print(f"{name:14} {load_scenario(name).description}")
        return 0
    if args.from_json is not None:
        return reprint(args)
    try:
        scenario = load_scenario(args.scenario) if args.scenario else None
        if args.make_repo is not None:
            if scenario is None:
                raise PerfError("--make-repo needs --scenario")
            names = make_repository(scenario, args.make_repo)
            print(f"wrote {', '.join(names)} under {args.make_repo}")
            print(f"serve them: python -m dl_inference serve --model-repository {args.make_repo}")
            return 0
        cfg = config_from_args(args, scenario)
        cfg.validate()
        report = run_sweep(cfg)
    except (PerfError, ScenarioError) as exc:
        print(f"perf: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nperf: interrupted", file=sys.stderr)
        return 130
    points = report["points"]
    samples: dict[str, str] = {}
    for r in points:
        samples.update(r.get("error_samples") or {})
    for key, message in samples.items():
        print(f"  {key}: {message}", file=sys.stderr)
    unstable = [r["label"] for r in points if not r["stable"]]
    if unstable and not cfg.quiet:
        print(
            f"perf: not stable within {cfg.max_windows} windows: {', '.join(unstable)} "
            "(reported: the last windows; try a longer --window-ms or a larger --stability-pct)",
            file=sys.stderr,
        )
    if args.csv:
        write_csv(args.csv, points)
    if args.json:
        write_json(args.json, report)
    if args.plot:
        try:
            write_plot(args.plot, points, f"{cfg.model} over {cfg.protocol}")
        except PerfError as exc:
            print(f"perf: {exc}", file=sys.stderr)
    ok = all(r["requests"] > 0 and r["errors"] == 0 for r in points)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
