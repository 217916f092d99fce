"""Side by side: ``dl-inference serve`` and MLServer on the same ONNX models, loaded by the same client.

What it does:

1. builds the models into a temp dir (no downloads, fixed seeds): ``simple`` (the example tiny MLP,
   x FP32 [-1,16] -> y FP32 [-1,4]), ``cnn`` (``load_tests.models.make_resnet_like``: ResNet-18-shaped,
   image FP32 [-1,3,64,64] -> logits FP32 [-1,10], ~6.5 ms per image on one core), ``large`` (y = 2x,
   FP32 [-1,262144]: 1 MiB in and 1 MiB out per request) and ``bytes`` (Identity on a BYTES/string
   tensor [-1,16]). One directory tree for ours (Triton layout, ``config.pbtxt``: one KIND_CPU
   instance, no dynamic batching) and one per MLServer variant (``settings.json`` and one
   ``model-settings.json`` per model, pointing at the same ``model.onnx`` files, served by
   ``load_tests/mlserver_runtime.py``);
2. starts, on free ports, ``dl-inference serve`` (our venv) and MLServer (``.venv-mlserver``, see
   ``make mlserver-env``) in two configurations: ``mlserver-pw1`` (``parallel_workers: 1``, MLServer's
   default: a front process plus one inference worker process, like our gateway plus one worker per
   model instance) and ``mlserver-pw0`` (``parallel_workers: 0``: inference inline in the front
   process, no inter-process hop); waits for gRPC ServerReady and ModelReady of every model;
3. checks once per model that the same input gives the same outputs from every server and from
   onnxruntime in-process, over gRPC (raw tensors) and HTTP (JSON);
4. measures with ``load_tests.loadgen.run`` (in this process, same client code for every server) each
   model x protocol (gRPC, HTTP JSON) x concurrency, for ``--rounds`` rounds, alternating the servers
   inside every cell (ours, pw1, pw0, then the next round starts with the next one) so that drift on
   the machine hits all of them. All servers stay up, and only one is loaded at a time; the CPU each
   idle server burns during another's run is measured from /proc and reported (``idle cores``);
5. prints medians across rounds per server (req/s, p50, p99, CPU cores the loaded server used, CPU of
   the client) and the ratios ours/MLServer (req/s: > 1 is ours ahead; p50, p99: < 1 is ours ahead);
   writes everything (per-round runs, settings, versions, correctness) to
   ``load_tests/results/compare_mlserver.json`` and the printed report to a ``.txt`` beside it.

Run from the repository root with our venv (``make bench-mlserver`` does both steps)::

    make mlserver-env                                   # once: .venv-mlserver with mlserver, onnxruntime
    .venv/bin/python -m load_tests.compare_mlserver     # defaults: --rounds 3 --duration 2 --warmup 1, ~10 min
    .venv/bin/python -m load_tests.compare_mlserver --models simple --protocols grpc --rounds 1   # quick look

Servers are always stopped (their whole process group), on errors, Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.lib.procs import tree_cpu_seconds
from load_tests.lib.report import int_list, machine_info, median, num, ratio, round_medians, write_json
from load_tests.lib.server import (
    BenchError,
    Server,
    free_port,
    ours_command,
    run_in_workdir,
    start_server,
    stop_server,
    wait_ready,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
MLSERVER_VENV = REPO_ROOT / ".venv-mlserver"
RUNTIME = "load_tests.mlserver_runtime.OnnxRuntimeModel"
LARGE_ELEMENTS = 262_144  # FP32 elements per row of the large-tensor model: 1 MiB
BYTES_WIDTH = 16  # strings per row of the BYTES model
TARGETS = ("ours", "mlserver-pw1", "mlserver-pw0")
PARALLEL_WORKERS = {"mlserver-pw1": 1, "mlserver-pw0": 0}
BUSY_LOADAVG = 0.5


@dataclass(frozen=True)
class ModelSpec:
    name: str
    what: str
    concurrency: tuple[int, ...]  # default concurrencies (``--concurrency`` overrides)
    min_duration: float = 0.0  # measured seconds at least, whatever ``--duration`` says


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("simple", "tiny MLP, x FP32 [-1,16] -> y FP32 [-1,4] (per-request overhead)", (1, 16)),
        ModelSpec("cnn", "ResNet-18-like CNN, image FP32 [-1,3,64,64] -> logits FP32 [-1,10]", (1, 8)),
        # loadgen counts only requests that start and end inside the window: with latencies near a
        # second (HTTP JSON at c=4) a 2 s window would undercount the slower server much more
        ModelSpec("large", f"y = 2x, FP32 [-1,{LARGE_ELEMENTS}] (1 MiB in, 1 MiB out)", (1, 4), min_duration=4.0),
        ModelSpec("bytes", f"Identity, BYTES [-1,{BYTES_WIDTH}] -> BYTES (8-byte strings)", (1, 16)),
    )
}


# ---------------------------------------------------------------------------------------------
# models and repositories


def _onnx_model(graph: Any) -> Any:
    import onnx
    from onnx import helper

    from dl_inference.examples import IR_VERSION, OPSET

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="compare_mlserver")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _write_config(model_dir: Path, name: str, datatype: int, in_name: str, out_name: str, dims: list[int]) -> None:
    from google.protobuf import text_format

    from dl_inference.protocol.generated import model_config_pb2 as mc

    config = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=8)
    config.input.add(name=in_name, data_type=datatype, dims=dims)
    config.output.add(name=out_name, data_type=datatype, dims=dims)
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")


def _make_large(root: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from dl_inference.protocol.generated import model_config_pb2 as mc

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"], name="mul")],
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", LARGE_ELEMENTS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", LARGE_ELEMENTS])],
        initializer=[numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")],
    )
    model_dir = root / "large"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(_onnx_model(graph).SerializeToString())
    _write_config(model_dir, "large", mc.TYPE_FP32, "x", "y", [LARGE_ELEMENTS])


def _make_bytes(root: Path) -> None:
    from onnx import TensorProto, helper

    from dl_inference.protocol.generated import model_config_pb2 as mc

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"], name="identity")],
        "bytes",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", BYTES_WIDTH])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch", BYTES_WIDTH])],
    )
    model_dir = root / "bytes"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(_onnx_model(graph).SerializeToString())
    _write_config(model_dir, "bytes", mc.TYPE_STRING, "text", "echo", [BYTES_WIDTH])


def build_ours_repository(root: Path, models: list[str]) -> dict[str, Path]:
    """Write the models in our (Triton) layout under ``root``; {model: path of its model.onnx}."""
    from dl_inference.examples import make_example_repository
    from load_tests.models import write_model_repo

    root.mkdir(parents=True, exist_ok=True)
    for name in models:
        if name == "simple":
            examples = root.parent / "all_examples"
            make_example_repository(examples)
            shutil.copytree(examples / "simple", root / "simple")
            shutil.rmtree(examples)
        elif name == "cnn":
            write_model_repo(root, "cnn", batching=False, max_batch_size=8)
        elif name == "large":
            _make_large(root)
        elif name == "bytes":
            _make_bytes(root)
        else:
            raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return {name: root / name / "1" / "model.onnx" for name in models}


def mlserver_settings(http_port: int, grpc_port: int, metrics_port: int, parallel_workers: int, state: Path) -> dict:
    """MLServer's server-wide ``settings.json``.

    ``debug: false`` turns off the per-request access logs of its REST and gRPC servers (ours logs no
    request either); ``gzip_enabled: false`` because the client accepts gzip and ours never
    compresses; metrics stay on (ours keeps its Prometheus metrics too). The gRPC message limit is
    raised to ours (96 MiB)."""
    return {
        "debug": False,
        "parallel_workers": parallel_workers,
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "grpc_max_message_length": 96 * 1024 * 1024,
        "gzip_enabled": False,
        "metrics_dir": str(state / ".metrics"),
        "environments_dir": str(state / ".envs"),
    }


def model_settings(name: str, model_path: Path) -> dict:
    """MLServer's ``model-settings.json`` for one ONNX model served by ``load_tests.mlserver_runtime``.

    No adaptive batching (``max_batch_size`` 0, the default), like ours without ``dynamic_batching``;
    inputs and outputs are not listed: the runtime publishes them from the ONNX file on load."""
    return {"name": name, "implementation": RUNTIME, "parameters": {"uri": str(model_path.resolve())}}


def write_mlserver_repository(
    root: Path, model_paths: dict[str, Path], ports: tuple[int, int, int], parallel_workers: int
) -> dict:
    """``root/settings.json`` and ``root/models/<name>/model-settings.json``; the settings written."""
    settings = mlserver_settings(*ports, parallel_workers=parallel_workers, state=root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    for name, path in model_paths.items():
        model_dir = root / "models" / name
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "model-settings.json").write_text(json.dumps(model_settings(name, path), indent=2) + "\n")
    return settings


def mlserver_versions(venv: Path) -> dict[str, str]:
    """Versions of the packages that matter inside MLServer's venv."""
    code = (
        "import json, platform, importlib.metadata as m\n"
        "names = ['mlserver', 'onnxruntime', 'numpy', 'uvloop', 'grpcio', 'fastapi', 'uvicorn', 'pydantic', 'orjson']\n"
        "out = {'python': platform.python_version()}\n"
        "for n in names:\n"
        "    try:\n"
        "        out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError:\n"
        "        out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"cannot query {venv}: {proc.stderr[-1000:]}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# CPU of a server's process group


def servers_cpu(servers: dict[str, Server]) -> dict[str, float]:
    """{target: CPU seconds its processes have used so far}."""
    by_pid = tree_cpu_seconds([s.proc.pid for s in servers.values()])
    return {k: by_pid[s.proc.pid] for k, s in servers.items()}


# ---------------------------------------------------------------------------------------------
# correctness


def _sample_inputs(name: str, batch: int = 2) -> list[tuple[str, str, np.ndarray]]:
    rng = np.random.default_rng(7)
    if name == "simple":
        return [("x", "FP32", rng.standard_normal((batch, 16)).astype(np.float32))]
    if name == "cnn":
        return [("image", "FP32", rng.standard_normal((batch, 3, 64, 64)).astype(np.float32))]
    if name == "large":
        return [("x", "FP32", rng.standard_normal((batch, LARGE_ELEMENTS)).astype(np.float32))]
    words = np.empty((batch, BYTES_WIDTH), dtype=object)
    words.flat[:] = [f"w{i}-{'é' if i % 5 == 0 else 'x'}{rng.integers(1000)}".encode() for i in range(words.size)]
    return [("text", "BYTES", words)]


def _raw(datatype: str, array: np.ndarray) -> bytes:
    from load_tests.loadgen import raw_bytes

    return raw_bytes(datatype, array)


def decode_raw(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """V2 raw tensor bytes -> numpy array (BYTES: object array of bytes)."""
    from dl_inference.protocol.datatypes import numpy_dtype

    if datatype != "BYTES":
        return np.frombuffer(raw, dtype=numpy_dtype(datatype)).reshape(shape)
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        size = int.from_bytes(raw[offset : offset + 4], "little")
        items.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


def infer_grpc(url: str, model: str, inputs: list[tuple[str, str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One ModelInfer with raw inputs; {output name: array}."""
    import grpc

    from dl_inference.protocol.generated import grpc_service_pb2 as pb
    from dl_inference.protocol.generated import grpc_service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name=model)
    for name, datatype, array in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(_raw(datatype, array))
    options = [("grpc.max_receive_message_length", 2**31 - 1), ("grpc.max_send_message_length", 2**31 - 1)]
    with grpc.insecure_channel(url, options=options) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if response.raw_output_contents:
            out[tensor.name] = decode_raw(tensor.datatype, shape, response.raw_output_contents[i])
        else:
            contents = tensor.contents
            values = next((list(v) for _, v in contents.ListFields()), [])
            out[tensor.name] = _from_list(tensor.datatype, shape, values)
    return out


def _from_list(datatype: str, shape: list[int], values: list[Any]) -> np.ndarray:
    from dl_inference.protocol.datatypes import numpy_dtype

    if datatype == "BYTES":
        arr = np.empty(len(values), dtype=object)
        arr[:] = [v.encode() if isinstance(v, str) else v for v in values]
        return arr.reshape(shape)
    return np.asarray(values, dtype=numpy_dtype(datatype)).reshape(shape)


def infer_http(url: str, model: str, inputs: list[tuple[str, str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One JSON POST /v2/models/{model}/infer; {output name: array}."""
    doc = {
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": list(array.shape),
                "data": [b.decode() for b in array.reshape(-1)] if datatype == "BYTES" else array.reshape(-1).tolist(),
            }
            for name, datatype, array in inputs
        ]
    }
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/infer",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        body = json.loads(resp.read())
    return {o["name"]: _from_list(o["datatype"], list(o["shape"]), _flat(o["data"])) for o in body["outputs"]}


def _flat(data: Any) -> list[Any]:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [v for row in data for v in _flat(row)]
    return list(data)


def compare_outputs(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[bool, str]:
    """Same output names, shapes and values (floats within rtol 1e-5, atol 1e-5; BYTES exactly)."""
    if set(expected) != set(got):
        return False, f"outputs {sorted(got)}, expected {sorted(expected)}"
    worst = 0.0
    for name, want in expected.items():
        have = got[name]
        if list(have.shape) != list(want.shape):
            return False, f"output '{name}': shape {list(have.shape)}, expected {list(want.shape)}"
        if want.dtype == object:
            if [bytes(v) for v in have.reshape(-1)] != [bytes(v) for v in want.reshape(-1)]:
                return False, f"output '{name}': BYTES differ"
            continue
        have_f, want_f = have.astype(np.float64), want.astype(np.float64)
        if not np.allclose(have_f, want_f, rtol=1e-5, atol=1e-5):
            return False, f"output '{name}': max abs diff {np.abs(have_f - want_f).max():.3g}"
        worst = max(worst, float(np.abs(have_f - want_f).max()) if want.size else 0.0)
    return True, f"max abs diff {worst:.3g}"


def reference_outputs(model_path: Path, inputs: list[tuple[str, str, np.ndarray]]) -> dict[str, np.ndarray]:
    """onnxruntime in-process with the workers' session options; BYTES outputs as UTF-8 bytes."""
    from load_tests.bare_server import make_session

    session = make_session(model_path)
    feeds = {}
    for name, datatype, array in inputs:
        if datatype == "BYTES":
            text = np.empty(array.shape, dtype=object)
            text.flat[:] = [b.decode() for b in array.reshape(-1)]
            feeds[name] = text
        else:
            feeds[name] = array
    names = [o.name for o in session.get_outputs()]
    out = {}
    for name, value in zip(names, session.run(names, feeds), strict=True):
        value = np.asarray(value)
        if value.dtype == object:
            enc = np.empty(value.shape, dtype=object)
            enc.flat[:] = [v.encode() if isinstance(v, str) else v for v in value.reshape(-1)]
            value = enc
        out[name] = value
    return out


def check_correctness(servers: dict[str, Server], model_paths: dict[str, Path]) -> list[dict[str, Any]]:
    """Per model, server and protocol: does the answer match onnxruntime in-process?"""
    checks: list[dict[str, Any]] = []
    for model, path in model_paths.items():
        inputs = _sample_inputs(model)
        expected = reference_outputs(path, inputs)
        for target, server in servers.items():
            for protocol in ("grpc", "http"):
                try:
                    if protocol == "grpc":
                        got = infer_grpc(server.grpc_url, model, inputs)
                    else:
                        assert server.http_url is not None
                        got = infer_http(server.http_url, model, inputs)
                    ok, detail = compare_outputs(expected, got)
                except Exception as exc:  # a server error is a failed check, reported, not a crash
                    ok, detail = False, f"{type(exc).__name__}: {str(exc)[:300]}"
                checks.append({"model": model, "target": target, "protocol": protocol, "ok": ok, "detail": detail})
    return checks


# ---------------------------------------------------------------------------------------------
# measuring


def measure(
    servers: dict[str, Server], target: str, model: str, protocol: str, conc: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One loadgen run against ``target``; the report plus the CPU every server used meanwhile."""
    from load_tests.loadgen import LoadConfig, LoadgenError
    from load_tests.loadgen import run as run_load

    server = servers[target]
    url = server.grpc_url if protocol == "grpc" else server.http_url
    cfg = LoadConfig(
        url=url,
        protocol=protocol,
        model=model,
        concurrency=conc,
        duration=max(args.duration, MODELS[model].min_duration),
        warmup=args.warmup,
        batch=1,
        seed=0,
    )
    before = servers_cpu(servers)
    t0 = time.monotonic()
    try:
        report = run_load(cfg)
    except LoadgenError as exc:
        raise BenchError(f"loadgen could not run on {target} {model} {protocol}: {exc}") from None
    wall = time.monotonic() - t0
    after = servers_cpu(servers)
    cores = {k: (after[k] - before[k]) / wall for k in servers}
    report.update(
        target=target,
        server_cpu_cores=cores[target],  # averaged over warm-up + window (same load throughout)
        idle_servers_cpu_cores={k: v for k, v in cores.items() if k != target},
    )
    return report


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, protocol, concurrency, target): medians across rounds."""
    cells: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["model"], r["protocol"], r["concurrency"], r["target"]), []).append(r)
    rows = []
    for (model, protocol, conc, target), reps in cells.items():
        rows.append(
            {
                "model": model,
                "protocol": protocol,
                "concurrency": conc,
                "target": target,
                **round_medians(reps),
                "server_cpu_cores": median([r.get("server_cpu_cores") for r in reps]),
                "server_cpu_ms_per_request": median([_cpu_ms_per_request(r) for r in reps]),
                "client_cpu_cores": median([r.get("client_cpu_util") for r in reps]),
                "max_idle_cpu_cores": max(
                    (v for r in reps for v in r.get("idle_servers_cpu_cores", {}).values()), default=None
                ),
                "errors": sum(r["errors"] for r in reps),
                "throughput_rps_each": [round(r["throughput_rps"], 1) for r in reps],
            }
        )
    return rows


def _cpu_ms_per_request(run: dict[str, Any]) -> float | None:
    """Server CPU milliseconds per completed request (cores x 1000 / req/s)."""
    cores, rps = run.get("server_cpu_cores"), run.get("throughput_rps")
    return cores * 1000.0 / rps if cores is not None and rps else None


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ours / each MLServer target per cell: throughput (> 1: ours ahead), p50 and p99 (< 1: ours ahead)."""
    cell = {(r["model"], r["protocol"], r["concurrency"], r["target"]): r for r in rows}
    out = []
    for (model, protocol, conc, target), theirs in cell.items():
        ours = cell.get((model, protocol, conc, "ours"))
        if target == "ours" or ours is None:
            continue

        def div(key: str, ours: dict[str, Any] = ours, theirs: dict[str, Any] = theirs) -> float | None:
            return ratio(ours[key], theirs[key])

        out.append(
            {
                "model": model,
                "protocol": protocol,
                "concurrency": conc,
                "vs": target,
                "throughput": div("throughput_rps"),
                "p50": div("p50_ms"),
                "p99": div("p99_ms"),
            }
        )
    return out


def format_tables(rows: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], models: list[str]) -> str:
    order = {t: i for i, t in enumerate(TARGETS)}
    morder = {m: i for i, m in enumerate(models)}
    rows = sorted(rows, key=lambda r: (morder[r["model"]], r["protocol"], r["concurrency"], order[r["target"]]))
    head = (
        f"{'model':<6} | {'proto':<5} | {'conc':>4} | {'server':<12} | {'req/s':>8} | {'p50 ms':>8} | "
        f"{'p99 ms':>8} | {'srv cores':>9} | {'srv CPU ms/req':>14} | {'cli cores':>9} | {'errors':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<6} | {r['protocol']:<5} | {r['concurrency']:>4} | {r['target']:<12} | "
            f"{num(r['throughput_rps'], '8.1f')} | {num(r['p50_ms'], '8.3f')} | {num(r['p99_ms'], '8.3f')} | "
            f"{num(r['server_cpu_cores'], '9.2f')} | {num(r.get('server_cpu_ms_per_request'), '14.3f')} | "
            f"{num(r['client_cpu_cores'], '9.2f')} | {r['errors']:>6}"
        )
    vs = [t for t in TARGETS if t != "ours" and any(r["vs"] == t for r in ratio_rows)]
    if vs:
        lines.append("")
        lines.append("ours / MLServer (req/s: > 1 means ours is ahead; p50, p99: < 1 means ours is ahead)")
        head2 = f"{'model':<6} | {'proto':<5} | {'conc':>4} | " + " | ".join(
            f"{'vs ' + t + ': req/s   p50   p99':<33}" for t in vs
        )
        lines.append(head2)
        lines.append("-" * len(head2))
        by = {(r["model"], r["protocol"], r["concurrency"], r["vs"]): r for r in ratio_rows}
        keys = sorted(
            {(r["model"], r["protocol"], r["concurrency"]) for r in ratio_rows},
            key=lambda k: (morder[k[0]], k[1], k[2]),
        )
        for model, protocol, conc in keys:
            parts = []
            for t in vs:
                r = by.get((model, protocol, conc, t))
                if r is None:
                    parts.append(f"{'-':<33}")
                else:
                    parts.append(
                        f"{'':<16}{num(r['throughput'], '5.2f')} {num(r['p50'], '5.2f')} {num(r['p99'], '5.2f')}"
                    )
            lines.append(f"{model:<6} | {protocol:<5} | {conc:>4} | " + " | ".join(parts))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the run


def _mlserver_exe(venv: Path) -> Path:
    exe = venv / "bin" / "mlserver"
    if not exe.exists():
        raise BenchError(f"{exe} not found: run `make mlserver-env` first (creates {venv.name} with MLServer)")
    return exe


def compare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    models: list[str] = args.models
    targets: list[str] = args.targets
    mls_targets = [t for t in targets if t != "ours"]
    result: dict[str, Any] = {
        "machine": machine_info(),
        "config": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "models": {m: MODELS[m].what for m in models},
            "protocols": args.protocols,
            "concurrency": {m: list(args.concurrency or MODELS[m].concurrency) for m in models},
            "duration_s_per_model": {m: max(args.duration, MODELS[m].min_duration) for m in models},
            "targets": targets,
            "servers_up": "all servers up for the whole run; one loaded at a time (idle CPU measured)",
        },
        "runs": [],
    }
    if mls_targets:
        exe = _mlserver_exe(args.mlserver_venv)
        result["machine"]["mlserver_venv"] = mlserver_versions(args.mlserver_venv)
    model_paths = build_ours_repository(workdir / "ours_repo", models)
    servers: dict[str, Server] = {}
    try:
        settings: dict[str, Any] = {}
        for target in targets:
            if target == "ours":
                grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
                servers[target] = start_server(
                    "dl-inference serve",
                    ours_command(workdir / "ours_repo", grpc_port, http_port, metrics_port),
                    workdir / "ours.log",
                    f"127.0.0.1:{grpc_port}",
                    f"127.0.0.1:{http_port}",
                )
            else:
                http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
                root = workdir / target
                settings[target] = write_mlserver_repository(
                    root, model_paths, (http_port, grpc_port, metrics_port), PARALLEL_WORKERS[target]
                )
                env_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
                servers[target] = start_server(
                    target,
                    ["env", f"PYTHONPATH={env_path}", str(exe), "start", str(root)],
                    workdir / f"{target}.log",
                    f"127.0.0.1:{grpc_port}",
                    f"127.0.0.1:{http_port}",
                )
        result["mlserver_settings"] = settings
        result["mlserver_model_settings"] = {m: model_settings(m, p) for m, p in model_paths.items()}
        startup: dict[str, float] = {}
        for target, server in servers.items():
            took = wait_ready(server, args.ready_timeout, tuple(models))
            startup[target] = round(took, 2)
            print(f"{target} ready in {took:.1f} s (gRPC {server.grpc_url}, HTTP {server.http_url})", flush=True)
        result["startup_s"] = startup

        print("correctness (same input to every server, against onnxruntime in-process):", flush=True)
        checks = check_correctness(servers, model_paths)
        result["correctness"] = checks
        for c in checks:
            verdict = "ok" if c["ok"] else "MISMATCH"
            print(f"  {c['model']:<6} {c['target']:<12} {c['protocol']:<4} {verdict}  {c['detail']}")

        time.sleep(1.0)
        idle = servers_cpu(servers)
        time.sleep(3.0)
        idle_after = servers_cpu(servers)
        result["idle_cpu_cores_unloaded"] = {k: round((idle_after[k] - idle[k]) / 3.0, 4) for k in servers}
        print(f"CPU of the servers when none is loaded (cores): {result['idle_cpu_cores_unloaded']}", flush=True)

        cells = [(m, p, c) for m in models for p in args.protocols for c in (args.concurrency or MODELS[m].concurrency)]
        n_runs = len(cells) * len(targets) * args.rounds
        seconds = sum(
            (args.warmup + max(args.duration, MODELS[m].min_duration) + 0.3) * len(targets) * args.rounds
            for m, _, _ in cells
        )
        print(f"{n_runs} runs, ~{seconds / 60:.1f} min", flush=True)
        for rnd in range(args.rounds):
            for i, (model, protocol, conc) in enumerate(cells):
                shift = (rnd + i) % len(targets)  # who goes first rotates from cell to cell and round to round
                for target in targets[shift:] + targets[:shift]:
                    rep = measure(servers, target, model, protocol, conc, args)
                    rep["round"] = rnd + 1
                    result["runs"].append(rep)
                    print(f"  round {rnd + 1} {model:<6} {target:<12} {_short(rep)}", flush=True)
    finally:
        for server in servers.values():
            stop_server(server)

    rows = summarize(result["runs"])
    result["summary"] = rows
    result["ratios_ours_over_mlserver"] = ratios(rows)
    result["machine"]["loadavg_end"] = os.getloadavg()
    return result


def _short(rep: dict[str, Any]) -> str:
    lat = rep["latency_ms"]
    return (
        f"{rep['protocol']:<4} c={rep['concurrency']:<3} {rep['throughput_rps']:8.1f} req/s  "
        f"p50 {num(lat['p50'], '.3f')} ms  p99 {num(lat['p99'], '.3f')} ms  errors {rep['errors']}  "
        f"srv {rep['server_cpu_cores']:.2f} cli {num(rep.get('client_cpu_util'), '.2f')} cores"
    )


def report_text(result: dict[str, Any], command: str) -> str:
    machine = result["machine"]
    mls = machine.get("mlserver_venv", {})
    lines = [
        f"$ {command}",
        f"{machine.get('cpu', '?')}, {machine.get('cpu_count')} cores; client and servers share them",
        f"ours: dl_inference (git {str(machine.get('git_commit', '?'))[:10]}"
        f"{', dirty tree' if machine.get('git_dirty') else ''}), onnxruntime {machine.get('onnxruntime')}, "
        f"grpcio {machine.get('grpcio')}, python {machine.get('python')}",
    ]
    if mls:
        lines.append(
            f"MLServer {mls.get('mlserver')}: onnxruntime {mls.get('onnxruntime')}, grpcio {mls.get('grpcio')}, "
            f"uvloop {mls.get('uvloop')}, fastapi {mls.get('fastapi')}, uvicorn {mls.get('uvicorn')}, "
            f"python {mls.get('python')}"
        )
    cfg = result["config"]
    longer = {m: d for m, d in cfg["duration_s_per_model"].items() if d != cfg["duration_s"]}
    lines.append(
        f"{cfg['rounds']} alternating rounds of {cfg['warmup_s']:g} s warm-up + {cfg['duration_s']:g} s measured"
        + "".join(f" ({m}: {d:g} s)" for m, d in longer.items())
        + "; "
        "medians; srv cores = CPU of the loaded server's processes (all of them), srv CPU ms/req = that per "
        "request, cli cores = CPU of the load generator"
    )
    bad = [c for c in result.get("correctness", []) if not c["ok"]]
    checks = result.get("correctness", [])
    lines.append(
        f"correctness: {len(checks) - len(bad)}/{len(checks)} (model, server, protocol) answers match onnxruntime "
        "in-process"
        + (
            ""
            if not bad
            else "; MISMATCHES: " + "; ".join(f"{c['model']} {c['target']} {c['protocol']}: {c['detail']}" for c in bad)
        )
    )
    if "startup_s" in result:
        lines.append("startup to ready (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["startup_s"].items()))
    idle = [r["max_idle_cpu_cores"] for r in result["summary"] if r["max_idle_cpu_cores"] is not None]
    if idle:
        lines.append(f"idle servers during another's run: at most {max(idle):.3f} cores")
    lines += ["", format_tables(result["summary"], result["ratios_ours_over_mlserver"], list(cfg["models"]))]
    load = machine["loadavg_start"][0]
    lines.append("")
    lines.append(f"1-min load average {load:.2f} at start, {machine['loadavg_end'][0]:.2f} at end")
    if load > BUSY_LOADAVG:
        lines.append("WARNING: the machine was busy when the run started; numbers are noisy")
    return "\n".join(lines)


def _choices(valid: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        bad = set(names) - set(valid)
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {','.join(valid)}; got {text!r}")
        return [n for n in valid if n in names]

    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.compare_mlserver", description="dl-inference serve vs MLServer, same models"
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--duration", type=float, default=2.0, help="measured seconds per run (default 2)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run (default 1)")
    p.add_argument(
        "--models", type=_choices(tuple(MODELS)), default=list(MODELS), help="default all: " + ",".join(MODELS)
    )
    p.add_argument("--protocols", type=_choices(("grpc", "http")), default=["grpc", "http"], help="default grpc,http")
    p.add_argument("--concurrency", type=int_list, default=None, help="comma list for every model (default per model)")
    p.add_argument("--targets", type=_choices(TARGETS), default=list(TARGETS), help="default " + ",".join(TARGETS))
    p.add_argument("--mlserver-venv", type=Path, default=MLSERVER_VENV, help="venv with mlserver (make mlserver-env)")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for each server")
    p.add_argument("--json", type=Path, default=REPO_ROOT / "load_tests" / "results" / "compare_mlserver.json")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the server logs (kept on errors)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--rounds >= 1, --duration > 0, --warmup >= 0")
    args.mlserver_venv = args.mlserver_venv.resolve()  # servers start with the repository root as cwd

    command = "python -m load_tests.compare_mlserver " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run_in_workdir("compare_mlserver", args.keep_logs, lambda workdir: compare(args, workdir))
    if result is None:
        return 2
    text = report_text(result, command.strip())
    print("\n" + text)
    write_json(result, args.json)
    args.json.with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {args.json.with_suffix('.txt')}")
    return 1 if any(not c["ok"] for c in result.get("correctness", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
