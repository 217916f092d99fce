"""ResNet-50 on the PyTorch backend: fp32, fp16 and fp16 + torch.compile (CUDA graphs), served and in-process.

What it does:

1. writes a model repository (a temp dir, or ``--repo DIR``) with three copies of a ResNet-50
   (``load_tests/resnet50_torch.py``: the torchvision architecture, written here, random weights
   from a fixed seed), each ``1/model.py`` (that file, verbatim) + ``1/model.safetensors`` + a
   ``config.pbtxt`` (backend ``pytorch``, ``input__0`` FP32 [3,224,224] -> ``output__0`` FP32
   [1000], max_batch_size 64, ``dynamic_batching { max_queue_delay_microseconds: 1000 }``, one
   KIND_GPU instance on GPU 0 — KIND_CPU with ``--device cpu``):

   - ``resnet50_fp32``: precision fp32, compile off;
   - ``resnet50_fp16``: precision fp16, compile off;
   - ``resnet50_fp16_compiled``: precision fp16, compile reduce-overhead (CUDA graphs),
     compile_batch_sizes 1,2,4,8,16,32,64 (each compiled and captured before the model is ready);
   - ``resnet50_fp16_compiled_u8``: the same, clients sending UINT8 pixels;
   - ``resnet50_jpeg`` and ``resnet50_jpeg_cpu`` (only with ``--models``: JPEG mode): the fp16
     compiled network behind the example handler ``dl_inference/example_handlers/resnet50_jpeg.py``;
     clients send ``image`` (BYTES, one JPEG per row) and get the top 5 (``labels`` BYTES
     ``"score:index:label"``, ``indices`` INT64, ``scores`` FP32). ``resnet50_jpeg`` decodes with
     nvJPEG on the GPU (``decode gpu``: the load fails without torchvision), ``resnet50_jpeg_cpu``
     with Pillow (``decode cpu``); ``model_warmup`` samples (one per compile batch size, a JPEG in
     ``warmup/image.bin``) compile and capture through the handler before the model is ready. The
     load cycles through 256 distinct synthetic photo-like JPEGs (``load_tests/synthetic_jpeg.py``),
     ``--image`` square, quality 90, sent as BYTES over gRPC; the in-process ceiling then adds
     "jpeg, GPU decode" and "jpeg, CPU decode" (the handler's preprocessing + the fp16 compiled
     network + top 5, at the ceiling batch), and the report the JPEG ratios (target: >= 5,000
     images/s with GPU decode at the highest concurrency);

2. starts ONE ``dl-inference serve --model-control-mode explicit`` on free ports and, model by
   model, loads it (``POST /v2/repository/models/{m}/load``; the compiled one prints its
   per-batch-size progress from the server log), runs ``load_tests.loadgen`` over gRPC, one image
   per request, at each ``--concurrency`` (default 1, 16, 64), reads ``GET /v2/models/{m}/stats``
   before and after each run (average executed batch size = delta inference_count / delta
   execution_count), then unloads it so the next one has the GPU to itself;
3. with the server stopped, in a subprocess of its own (its own CUDA context), times the same
   network in-process at batch ``--ceiling-batch`` (default max_batch_size): fp32 eager, fp16
   eager and fp16 ``torch.compile(mode="reduce-overhead")``, each (a) compute only, on an input
   already on the GPU, and (b) with what a server must do besides: the FP32 numpy batch copied
   to the GPU and cast there, the output copied back as FP32 numpy; plus (c) the way the
   backend does it (a copy into a reused page-locked buffer, an asynchronous transfer, the cast
   on the GPU), (d) (b) through a fresh page-locked buffer and, for fp16, (e) casting while
   copying into the page-locked buffer (half the bytes to send; slower on the H200 machine, see
   results/bench_pytorch_gpu.txt). Median of ``--ceiling-repeats`` timed repeats after warm-up,
   synchronized;
4. prints the table (model | conc | images/s | p50 ms | p99 ms | avg batch), the ceiling lines and
   the ratios: fp16_compiled / fp32 throughput at the highest concurrency (target >= 3.2), and
   fp16_compiled served / in-process ceiling with transfers (target >= 0.5) and / compute only;
   writes ``<out-dir>/bench_pytorch_gpu.json`` and a ``.txt`` copy of everything printed (both
   rewritten as the run goes, so a run cut short by a time limit leaves what it measured; the
   server log is copied there too when the bench fails).

On the GPU machine (about 6-8 minutes with the defaults; the compiled model's load, 7 batch sizes
compiled and captured, is most of the rest beyond the 9 x 13 s of load)::

    python3 -m load_tests.bench_pytorch_gpu --out-dir "$OUT"        # from the repository root
    python3 -m load_tests.bench_pytorch_gpu --duration 6 --warmup 2   # about a minute shorter
    python3 -m load_tests.bench_pytorch_gpu --models resnet50_fp16_compiled --no-ceiling

JPEG mode, GPU decode against Pillow decode (about 4 minutes: two compiled loads, no eager ceiling)::

    python3 -m load_tests.bench_pytorch_gpu --models resnet50_jpeg,resnet50_jpeg_cpu --concurrency 64 \
        --name bench_pytorch_gpu_jpeg --out-dir "$OUT"

CPU smoke test (64x64 images, max batch 4, compile "default", concurrency 1 and 4; ~80 s)::

    .venv/bin/python -m load_tests.bench_pytorch_gpu --device cpu --quick

It writes ``bench_pytorch_cpu_quick.{json,txt}`` then, so GPU results are not overwritten. The
server is always stopped (its process group; workers exit when the gateway's socket closes), on
errors and Ctrl-C too; on errors the temp dir with the server log is kept and named.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.lib.load import run_loadgen
from load_tests.lib.report import int_list, machine_info, num, ratio
from load_tests.lib.server import (
    REPO_ROOT,
    BenchError,
    Server,
    free_port,
    log_tail,
    ours_command,
    sigterm_as_interrupt,
    start_server,
    stop_server,
    wait_ready,
)
from load_tests.loadgen import LoadConfig, LoadgenError, summary_line
from load_tests.loadgen import run as run_load

RESNET_SOURCE = Path(__file__).with_name("resnet50_torch.py")
JPEG_HANDLER = REPO_ROOT / "dl_inference" / "example_handlers" / "resnet50_jpeg.py"
FP32, FP16, COMPILED = "resnet50_fp32", "resnet50_fp16", "resnet50_fp16_compiled"
COMPILED_U8 = "resnet50_fp16_compiled_u8"  # clients send UINT8 pixels (4x fewer bytes); scaled on the GPU
# Clients send JPEG bytes; the handler decodes them on the GPU (nvJPEG) or, for the _cpu copy, with Pillow.
JPEG, JPEG_CPU = "resnet50_jpeg", "resnet50_jpeg_cpu"
JPEG_MODELS = (JPEG, JPEG_CPU)
MODELS = (FP32, FP16, COMPILED, COMPILED_U8, JPEG, JPEG_CPU)
DEFAULT_MODELS = (FP32, FP16, COMPILED, COMPILED_U8)  # the JPEG pair: --models resnet50_jpeg,resnet50_jpeg_cpu
JPEG_QUALITY = 90
JPEG_POOL = 256  # distinct images the JPEG load cycles through
JPEG_TARGET = 5000.0  # resnet50_jpeg served images/s at the highest concurrency (issue 19): at least this
# model.py of the UINT8 variant: the same network (same state_dict names), pixels / 255 on the device.
U8_WRAPPER = """

class ResNet50U8(ResNet50):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.conv1.weight.dtype) * (1.0 / 255.0))


def create_model() -> nn.Module:  # noqa: F811 - replaces the FP32-input factory above
    return ResNet50U8()
"""
INPUT, OUTPUT = "input__0", "output__0"
NUM_CLASSES = 1000
SPEEDUP_TARGET = 3.2  # fp16_compiled / fp32 served images/s at the highest concurrency: at least this
CEILING_TARGET = 0.5  # fp16_compiled served / in-process fp16 compiled with transfers: at least this
GPU_DEFAULTS = {
    "image": 224,
    "max_batch_size": 64,
    "compile_mode": "reduce-overhead",
    "compile_batch_sizes": "1,2,4,8,16,32,64",
    "concurrency": "1,16,64",
    "duration": 10.0,
    "warmup": 3.0,
    "ceiling_seconds": 0.5,
    "ceiling_repeats": 5,
    "request_batch": 8,
}
QUICK_DEFAULTS = {  # smoke test: everything small
    "image": 64,
    "max_batch_size": 4,
    "compile_mode": "reduce-overhead",  # "default" on CPU: reduce-overhead is CUDA graphs
    "compile_batch_sizes": "4",
    "concurrency": "1,4",
    "duration": 3.0,
    "warmup": 1.0,
    "ceiling_seconds": 0.3,
    "ceiling_repeats": 3,
    "request_batch": 1,
}


class Output:
    """print(..., flush=True), keep every line for the .txt copy, and save the partial results as they
    come (a run cut short by a time limit still leaves what it measured)."""

    def __init__(self, json_path: Path | None = None, txt_path: Path | None = None) -> None:
        self.lines: list[str] = []
        self.t0 = time.monotonic()
        self.json_path = json_path
        self.txt_path = txt_path
        if txt_path is not None:
            txt_path.parent.mkdir(parents=True, exist_ok=True)
            txt_path.write_text("")

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.extend(text.split("\n"))
        if self.txt_path is not None:  # written as it goes: a run killed at a time limit leaves its lines
            with self.txt_path.open("a") as f:
                f.write(text + "\n")

    def progress(self, text: str) -> None:
        """A progress line, stamped with the seconds since the start."""
        self(f"[{time.monotonic() - self.t0:5.0f} s] {text}")

    def save(self, result: dict[str, Any], complete: bool) -> None:
        if self.json_path is None or self.txt_path is None:
            return
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(dict(result, complete=complete), indent=2) + "\n")
        self.txt_path.write_text("\n".join(self.lines) + "\n")


def run_bench(
    tool: str,
    out_dir: Path,
    name: str,
    keep: bool,
    bench_fn: Callable[[Path, Output], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
) -> tuple[int, dict[str, Any] | None]:
    """A benchmark's main: ``bench_fn(workdir, say)`` in a temporary work directory, its report printed
    and saved as ``out_dir/name.{json,txt}``. Returns (0, result), or (2, None) when it failed (the
    server log is copied beside the results: a remote run's temporary directory does not come back;
    the work directory is kept), or (130, None) when interrupted (SIGTERM too: the server is stopped)."""
    say = Output(out_dir / f"{name}.json", out_dir / f"{name}.txt")
    workdir = Path(tempfile.mkdtemp(prefix=f"{tool}_"))
    try:
        with sigterm_as_interrupt():
            result = bench_fn(workdir, say)
    except BenchError as exc:
        say(f"FAILED: {exc}")
        if (workdir / "server.log").exists():
            shutil.copyfile(workdir / "server.log", out_dir / f"{name}.server.log")
            print(f"{tool}: server log copied to {out_dir / (name + '.server.log')}", file=sys.stderr, flush=True)
        keep = True
        return 2, None
    except KeyboardInterrupt:
        print(f"{tool}: interrupted; server stopped", file=sys.stderr, flush=True)
        return 130, None
    finally:
        if keep:
            print(f"{tool}: work directory (server log, repository) kept in {workdir}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say(report(result))
    say.save(result, complete=True)
    print(f"wrote {say.json_path} and {say.txt_path}", flush=True)
    return 0, result


# ---------------------------------------------------------------------------------------------
# model repository


def model_parameters(model: str, compile_mode: str, compile_batch_sizes: str) -> dict[str, str]:
    """The config ``parameters`` of each served model (the PyTorch backend's names)."""
    if model == FP32:
        return {"precision": "fp32", "compile": "off"}
    if model == FP16:
        return {"precision": "fp16", "compile": "off"}
    if model in (COMPILED, COMPILED_U8, *JPEG_MODELS):
        params = {"precision": "fp16", "compile": compile_mode}
        if compile_mode != "off" and compile_batch_sizes:
            params["compile_batch_sizes"] = compile_batch_sizes
        return params
    raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")


def config_text(
    name: str,
    parameters: dict[str, str],
    image: int = 224,
    max_batch_size: int = 64,
    delay_us: int = 1000,
    device: str = "gpu",
    gpu: int = 0,
    input_type: str = "TYPE_FP32",
    tensors: str | None = None,
    instances: int = 1,
) -> str:
    """Triton ``config.pbtxt`` text for one ResNet-50 copy; ``tensors``: its input/output lines, when not
    the network's own (a model behind a handler)."""
    if device == "gpu":
        group = f"instance_group [ {{ kind: KIND_GPU count: {instances} gpus: [ {gpu} ] }} ]"
    else:
        group = f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]"
    params = "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in parameters.items())
    if tensors is None:
        tensors = (
            f'input [ {{ name: "{INPUT}" data_type: {input_type} dims: [ 3, {image}, {image} ] }} ]\n'
            f'output [ {{ name: "{OUTPUT}" data_type: TYPE_FP32 dims: [ {NUM_CLASSES} ] }} ]\n'
        )
    return f"""name: "{name}"
backend: "pytorch"
max_batch_size: {max_batch_size}
{tensors}dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
{group}
{params}
"""


def jpeg_config_text(
    name: str,
    parameters: dict[str, str],
    image: int = 224,
    max_batch_size: int = 64,
    delay_us: int = 1000,
    device: str = "gpu",
    gpu: int = 0,
    warmup_batch_sizes: tuple[int, ...] = (1,),
    warmup_count: int = 1,
    instances: int = 1,
) -> str:
    """``config.pbtxt`` of a JPEG model: what clients see (``image`` BYTES in, top-k out; the handler
    turns them into the network's pixels and back), and one warm-up sample per batch size, through the
    handler, so that the compiled graphs exist before the model is ready (the backend cannot warm up a
    model whose inputs only the handler knows)."""
    tensors = (
        'input [ { name: "image" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
        'output [ { name: "labels" data_type: TYPE_STRING dims: [ -1 ] },\n'
        '         { name: "indices" data_type: TYPE_INT64 dims: [ -1 ] },\n'
        '         { name: "scores" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
    )
    warmups = "".join(
        f'model_warmup {{ name: "jpeg_batch_{b}" batch_size: {b} count: {warmup_count} inputs {{ key: "image" '
        f'value {{ data_type: TYPE_STRING dims: [ 1 ] input_data_file: "image.bin" }} }} }}\n'
        for b in warmup_batch_sizes
    )
    text = config_text(
        name, parameters, image, max_batch_size, delay_us, device, gpu, tensors=tensors, instances=instances
    )
    return text + warmups


def jpeg_parameters(model: str, device: str, image: int, compile_mode: str, compile_batch_sizes: str) -> dict[str, str]:
    """A JPEG model's parameters: the network's (as resnet50_fp16_compiled) and the handler's."""
    params = model_parameters(model, compile_mode, compile_batch_sizes)
    # gpu, not auto: a GPU run without torchvision must fail, not measure Pillow under the GPU's name
    params["decode"] = "gpu" if model == JPEG and device == "gpu" else "cpu"
    params["image_size"] = str(image)
    params["top_k"] = "5"
    return params


def write_repository(
    root: Path,
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
    image: int = 224,
    max_batch_size: int = 64,
    delay_us: int = 1000,
    device: str = "gpu",
    compile_mode: str = "reduce-overhead",
    compile_batch_sizes: str = "1,2,4,8,16,32,64",
    seed: int = 0,
    instances: int = 1,
) -> Path:
    """``root/<model>/{config.pbtxt, 1/model.py, 1/model.safetensors}`` for each model; the weights
    file (~100 MB, the same for all: ResNet-50 under ``torch.manual_seed(seed)``) is written once
    and hard-linked (copied where links fail). Returns the weights file."""
    from safetensors.torch import save_file

    from load_tests.resnet50_torch import random_state_dict

    root.mkdir(parents=True, exist_ok=True)
    source = RESNET_SOURCE.read_text()
    weights: Path | None = None
    for name in models:
        version = root / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        u8 = name == COMPILED_U8
        (version / "model.py").write_text(source + (U8_WRAPPER if u8 else ""))
        if name in JPEG_MODELS:
            text = write_jpeg_extras(
                root / name, name, image, max_batch_size, delay_us, device, compile_mode, compile_batch_sizes, seed,
                instances,
            )  # fmt: skip
        else:
            params = model_parameters(name, compile_mode, compile_batch_sizes)
            text = config_text(
                name, params, image, max_batch_size, delay_us, device,
                input_type="TYPE_UINT8" if u8 else "TYPE_FP32", instances=instances,
            )  # fmt: skip
        (root / name / "config.pbtxt").write_text(text)
        target = version / "model.safetensors"
        target.unlink(missing_ok=True)
        if weights is None:
            save_file(random_state_dict(seed), str(target), metadata={"seed": str(seed), "arch": "resnet50"})
            weights = target
        else:
            try:
                os.link(weights, target)
            except OSError:
                shutil.copyfile(weights, target)
    if weights is None:
        raise ValueError("no model to write")
    return weights


def write_jpeg_extras(
    model_dir: Path,
    name: str,
    image: int,
    max_batch_size: int,
    delay_us: int,
    device: str,
    compile_mode: str,
    compile_batch_sizes: str,
    seed: int,
    instances: int = 1,
) -> str:
    """A JPEG model's handler.py (the example handler, verbatim) and warm-up image; its config text."""
    from load_tests.synthetic_jpeg import synthetic_jpegs

    shutil.copyfile(JPEG_HANDLER, model_dir / "handler.py")
    (model_dir / "warmup").mkdir(exist_ok=True)
    jpeg = synthetic_jpegs(1, image, JPEG_QUALITY, seed + 1)[0]
    (model_dir / "warmup" / "image.bin").write_bytes(len(jpeg).to_bytes(4, "little") + jpeg)  # V2 BYTES element
    params = jpeg_parameters(name, device, image, compile_mode, compile_batch_sizes)
    compiled = params["compile"] != "off"
    sizes = tuple(int_list(params["compile_batch_sizes"])) if compiled and "compile_batch_sizes" in params else (1,)
    count = 3 if params["compile"] in ("reduce-overhead", "max-autotune") else 1  # as the backend's own warm-up
    return jpeg_config_text(name, params, image, max_batch_size, delay_us, device, 0, sizes, count, instances)


def jpeg_pool(image: int, count: int = JPEG_POOL, seed: int = 0) -> np.ndarray:
    """The JPEG load's rows: ``count`` distinct photo-like images, BYTES [count, 1]."""
    from load_tests.synthetic_jpeg import synthetic_jpegs

    rows = np.empty((count, 1), dtype=object)
    for i, data in enumerate(synthetic_jpegs(count, image, JPEG_QUALITY, seed)):
        rows[i, 0] = data
    return rows


# ---------------------------------------------------------------------------------------------
# server control (HTTP)


def http(method: str, url: str, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def load_model(server: Server, model: str, timeout: float, say: Output) -> float:
    """POST .../load (it answers once the model is ready); meanwhile echo the compile progress the
    server logs and a line every 30 s. Seconds it took. BenchError on failure."""
    outcome: dict[str, Any] = {}

    def post() -> None:
        try:
            outcome["status"], outcome["body"] = http(
                "POST", f"{server.http_url}/v2/repository/models/{model}/load", timeout + 30
            )
        except Exception as exc:  # connection reset, timeout
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    say.progress(f"loading {model} ...")
    offset = server.log.stat().st_size if server.log.exists() else 0
    t0 = time.monotonic()
    thread = threading.Thread(target=post, name=f"load-{model}", daemon=True)
    thread.start()
    next_note = t0 + 30
    while thread.is_alive():
        thread.join(0.5)
        offset = _echo_progress(server.log, offset, say)
        if server.proc.poll() is not None:
            raise BenchError(f"the server exited while loading {model}; its log ends with:\n{log_tail(server.log)}")
        if time.monotonic() >= next_note:
            say.progress(f"  ... {model} still loading, {time.monotonic() - t0:.0f} s")
            next_note += 30
    _echo_progress(server.log, offset, say)
    took = time.monotonic() - t0
    if "error" in outcome or outcome.get("status") != 200:
        why = (
            outcome.get("error") or f"HTTP {outcome.get('status')}: {outcome.get('body', b'').decode(errors='replace')}"
        )
        raise BenchError(f"loading {model} failed after {took:.0f} s: {why}\nserver log:\n{log_tail(server.log)}")
    status, _ = http("GET", f"{server.http_url}/v2/models/{model}/ready", 10)
    if status != 200:
        raise BenchError(f"{model} loaded but /ready answers {status}")
    say.progress(f"loading {model} ... ready in {took:.1f} s")
    return took


def _echo_progress(log: Path, offset: int, say: Output) -> int:
    """Print the server log's new 'compiled for batch size' lines; the new offset."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset
    end = data.rfind(b"\n") + 1  # whole lines only
    for line in data[:end].decode(errors="replace").splitlines():
        wanted = ("compiled for batch size", "JPEG decoding", " warmup 'jpeg_batch_")
        if any(w in line for w in wanted) or ("precision" in line and "compile" in line):
            at = line.find("model '")
            say.progress("  server: " + (line[at:] if at >= 0 else line).strip())
    return offset + end


def unload_model(server: Server, model: str, timeout: float) -> float:
    t0 = time.monotonic()
    status, body = http("POST", f"{server.http_url}/v2/repository/models/{model}/unload", timeout)
    if status != 200:
        raise BenchError(f"unloading {model}: HTTP {status} {body.decode(errors='replace')}")
    return time.monotonic() - t0


def model_stats(server: Server, model: str) -> dict[str, Any]:
    """Counters from GET /v2/models/{m}/stats, all versions summed."""
    status, body = http("GET", f"{server.http_url}/v2/models/{model}/stats", 10)
    if status != 200:
        raise BenchError(f"stats of {model}: HTTP {status} {body.decode(errors='replace')}")
    out: dict[str, Any] = {"inference_count": 0, "execution_count": 0, "queue_ns": 0, "queue_count": 0}
    batches: dict[int, int] = {}
    for s in json.loads(body).get("model_stats", []):
        out["inference_count"] += int(s.get("inference_count", 0))
        out["execution_count"] += int(s.get("execution_count", 0))
        queue = (s.get("inference_stats") or {}).get("queue") or {}
        out["queue_ns"] += int(queue.get("ns", 0))
        out["queue_count"] += int(queue.get("count", 0))
        for b in s.get("batch_stats", []):
            size = int(b["batch_size"])
            batches[size] = batches.get(size, 0) + int((b.get("compute_infer") or {}).get("count", 0))
    out["batch_executions"] = batches
    return out


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """after - before; avg_batch = sum(batch_size x count) / executions (= inferences / executions)."""
    delta: dict[str, Any] = {k: after[k] - before[k] for k in after if k != "batch_executions"}
    hist = {
        size: n - before["batch_executions"].get(size, 0)
        for size, n in sorted(after["batch_executions"].items())
        if n - before["batch_executions"].get(size, 0)
    }
    delta["batch_executions"] = {str(k): v for k, v in hist.items()}
    executions = sum(hist.values()) or delta["execution_count"]
    rows = sum(k * v for k, v in hist.items()) or delta["inference_count"]
    delta["avg_batch"] = rows / executions if executions else None
    delta["queue_ms_per_request"] = delta["queue_ns"] / delta["queue_count"] / 1e6 if delta["queue_count"] else None
    return delta


def measure(
    server: Server,
    model: str,
    concurrency: int,
    args: argparse.Namespace,
    request_batch: int = 1,
    input_data: dict[str, np.ndarray] | None = None,
    shared_memory: str = "",
) -> dict[str, Any]:
    """One loadgen run (gRPC, ``request_batch`` images per request; ``input_data``: the rows to send,
    cycled, instead of random tensors) with the stats delta around it as ``server_stats``."""
    connections, processes = args.connections, args.client_processes
    cfg = LoadConfig(
        url=server.grpc_url,
        protocol="grpc",
        model=model,
        concurrency=concurrency,
        duration=args.duration,
        warmup=args.warmup,
        batch=request_batch,
        request_timeout=args.request_timeout,
        input_data=input_data or {},
        shared_memory=shared_memory,
        connections=1 if shared_memory else connections,
    )
    before = model_stats(server, model)
    if processes > 1 and not input_data and not shared_memory:
        extra = ("--processes", str(processes), "--connections", str(connections),
                 "--batch", str(request_batch), "--request-timeout", str(args.request_timeout))  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
            report = run_loadgen(server.grpc_url, "grpc", concurrency, args.duration, args.warmup,
                                 Path(tmp) / "load.json", model, extra)  # fmt: skip
    else:
        try:
            report = run_load(cfg)
        except LoadgenError as exc:
            raise BenchError(f"loadgen could not run on {model}: {exc}") from None
    report["server_stats"] = stats_delta(before, model_stats(server, model))
    if report["requests"] == 0:
        raise BenchError(f"no request to {model} succeeded at c={concurrency}: {report['error_samples']}")
    return report


def gpu_memory_used() -> str | None:
    """nvidia-smi's memory.used of GPU 0, or None without nvidia-smi."""
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None


# ---------------------------------------------------------------------------------------------
# environment


def nvidia_smi() -> dict[str, str] | None:
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = proc.stdout.strip().splitlines()[:1]
    if proc.returncode != 0 or not first:
        return None
    parts = [p.strip() for p in first[0].split(",")]
    return dict(zip(("name", "driver", "memory_total"), parts))


TORCH_PROBE = """
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    info["cudnn"] = torch.backends.cudnn.version()
print(json.dumps(info))
"""


def torch_info() -> dict[str, Any]:
    """torch version and GPU name, from a subprocess (this process keeps no CUDA context)."""
    proc = subprocess.run([sys.executable, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise BenchError(f"cannot import torch: {proc.stderr[-2000:]}")
    info: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        import grpc

        info["grpcio"] = grpc.__version__
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------------------------------------
# in-process ceiling (runs in a subprocess: python -m load_tests.bench_pytorch_gpu --ceiling-worker SPEC)


def ceiling_worker(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    rows = in_process_ceiling(spec, lambda text: print(text, flush=True))
    Path(spec["out"]).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def in_process_ceiling(spec: dict[str, Any], say: Callable[[str], None]) -> list[dict[str, Any]]:
    """images/s of the network in this process at batch ``spec['batch']``, per variant and mode."""
    import gc

    import torch

    from load_tests.resnet50_torch import ResNet50

    gpu = spec["device"] == "gpu"
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if not gpu:
        torch.set_num_threads(spec.get("cpu_threads", 1))  # what a KIND_CPU instance gets by default
    batch, image = spec["batch"], spec["image"]
    if spec.get("weights"):
        from safetensors.torch import load_file

        state = load_file(spec["weights"])
    else:
        from load_tests.resnet50_torch import random_state_dict

        state = random_state_dict(spec.get("seed", 0))

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize(device)

    x_np = np.random.default_rng(0).standard_normal((batch, 3, image, image)).astype(np.float32)
    staging = torch.empty(x_np.shape, dtype=torch.float32, pin_memory=True) if gpu else None
    rows: list[dict[str, Any]] = []
    variants = spec.get("variants") or ["fp32 eager", "fp16 eager", "fp16 compiled"]
    for variant, dtype, mode in (
        ("fp32 eager", torch.float32, "off"),
        ("fp16 eager", torch.float16, "off"),
        ("fp16 compiled", torch.float16, spec["compile_mode"]),
    ):
        if variant not in variants:
            continue
        net = ResNet50()
        net.load_state_dict(state)
        net = net.eval().to(device).to(dtype)
        fn: Callable[[torch.Tensor], torch.Tensor] = net
        if mode != "off":
            fn = torch.compile(net, mode=None if mode == "default" else mode, dynamic=False)
        modes = ceiling_modes(fn, dtype, x_np, device, staging)
        if spec.get("jpeg") and variant == "fp16 compiled":
            modes += jpeg_ceiling_modes(fn, dtype, batch, image, device, say)
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(3):
                modes[1][1]()  # with transfers
            sync()
            first_s = time.perf_counter() - t0
            say(
                f"  ceiling {variant} (batch {batch}, {image}x{image}): warm-up {first_s:.1f} s"
                + (f" (torch.compile mode {mode})" if mode != "off" else "")
            )
            for what, call in modes:
                row = time_calls(call, sync, batch, spec["seconds"], spec["repeats"])
                row.update({"variant": variant, "mode": what, "batch": batch, "compile": mode})
                rows.append(row)
                say(
                    f"  ceiling {variant:<13} {what:<19} {row['images_per_s']:9.1f} images/s  "
                    f"{row['ms_per_batch']:8.2f} ms/batch (median of {row['repeats']} x {row['calls_per_repeat']})"
                )
        del fn, net, modes
        gc.collect()
        if gpu:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    return rows


def ceiling_modes(
    fn: Callable[..., Any], dtype: Any, x_np: np.ndarray, device: Any, staging: Any
) -> list[tuple[str, Callable[[], Any]]]:
    """The ways one batch is timed: (name, call). ``staging``: a page-locked FP32 buffer (GPU only)."""
    import torch

    gpu = device.type == "cuda"
    x_dev = torch.from_numpy(x_np).to(device).to(dtype)

    def compute_only() -> None:
        fn(x_dev)

    def with_transfers() -> np.ndarray:
        x = torch.from_numpy(x_np).to(device, non_blocking=gpu).to(dtype)  # copy FP32, cast on the device
        return fn(x).float().cpu().numpy()

    host = torch.empty(x_np.shape, dtype=torch.from_numpy(x_np).dtype, pin_memory=gpu)

    def as_backend() -> np.ndarray:
        host.copy_(torch.from_numpy(x_np))  # PyTorchBackend: page-locked copy, async transfer, cast on the GPU
        out = fn(host.to(device, non_blocking=gpu).to(dtype)).detach().cpu().numpy()
        return out.astype(np.float32) if out.dtype != np.float32 else out

    host_cast = torch.empty(x_np.shape, dtype=dtype, pin_memory=gpu)

    def host_cast_pinned() -> np.ndarray:
        host_cast.copy_(torch.from_numpy(x_np))  # cast while copying into a page-locked buffer: half the bytes
        return fn(host_cast.to(device, non_blocking=gpu)).float().cpu().numpy()

    def pinned() -> np.ndarray:
        staging.copy_(torch.from_numpy(x_np))  # numpy -> page-locked buffer, then an async copy
        x = staging.to(device, non_blocking=True).to(dtype)
        return fn(x).float().cpu().numpy()

    modes: list[tuple[str, Callable[[], Any]]] = [
        ("compute only", compute_only),
        ("with transfers", with_transfers),
        ("as the backend does", as_backend),
    ]
    if gpu and staging is not None:
        modes.append(("pinned transfers", pinned))
    if gpu and dtype != torch.float32:
        modes.append(("pinned, host cast", host_cast_pinned))
    return modes


def jpeg_ceiling_modes(
    fn: Callable[..., Any], dtype: Any, batch: int, image: int, device: Any, say: Callable[[str], None]
) -> list[tuple[str, Callable[[], Any]]]:
    """The JPEG models' work in process, on ``batch`` distinct photo-like JPEGs: the handler's decode +
    resize + normalize (nvJPEG on the GPU; Pillow with the handler's default threads on the CPU), the
    network, the logits back to the host and their top 5. What the served models do, minus the server."""
    import torch

    from dl_inference.example_handlers import resnet50_jpeg as handler

    rows = [row[0] for row in jpeg_pool(image, batch, seed=1)]
    modes: list[tuple[str, Callable[[], Any]]] = []
    gpu = device.type == "cuda"
    why_not = handler.gpu_decode_unavailable("gpu" if gpu else "cpu")
    if why_not is None:

        def gpu_decode() -> Any:
            pixels = handler.preprocess_gpu(rows, image, device)
            return handler.top_k(fn(pixels.to(dtype)).float().cpu().numpy(), 5)

        modes.append(("jpeg, GPU decode", gpu_decode))
    else:
        say(f"  ceiling jpeg, GPU decode: skipped, {why_not}")
    threads = min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def cpu_decode() -> Any:
        pixels = torch.from_numpy(handler.preprocess_cpu(rows, image, pool))
        return handler.top_k(fn(pixels.to(device, non_blocking=False).to(dtype)).float().cpu().numpy(), 5)

    modes.append(("jpeg, CPU decode", cpu_decode))
    return modes


def time_calls(
    call: Callable[[], Any], sync: Callable[[], None], batch: int, seconds: float, repeats: int
) -> dict[str, Any]:
    """Median images/s over ``repeats`` timed repeats of N calls each (N sized to ~``seconds``), synchronized."""
    call()
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, min(1000, round(seconds / one)))
    rates: list[float] = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        sync()
        rates.append(batch * n / (time.perf_counter() - t0))
    med = statistics.median(rates)
    return {
        "images_per_s": med,
        "ms_per_batch": batch / med * 1000.0,
        "images_per_s_each": [round(r, 1) for r in rates],
        "repeats": repeats,
        "calls_per_repeat": n,
    }


def run_ceiling(spec: dict[str, Any], workdir: Path, say: Output) -> list[dict[str, Any]]:
    """in_process_ceiling in a fresh process (own CUDA context, freed at exit), its lines echoed."""
    out = workdir / "ceiling.json"
    spec = dict(spec, out=str(out))
    spec_path = workdir / "ceiling_spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "load_tests.bench_pytorch_gpu", "--ceiling-worker", str(spec_path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tail: list[str] = []
    with subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("  ceiling "):
                say.progress(line.strip())
            else:
                tail = [*tail[-40:], line]
    if proc.returncode != 0 or not out.exists():
        raise BenchError(f"the in-process ceiling failed (status {proc.returncode}):\n" + "\n".join(tail))
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    return rows


# ---------------------------------------------------------------------------------------------
# report


def summary_row(model: str, concurrency: int, rep: dict[str, Any], frontends: int = 1) -> dict[str, Any]:
    return {
        "model": model,
        "frontends": frontends,
        "concurrency": concurrency,
        "request_batch": rep["batch"],
        "images_per_s": rep["throughput_rps"] * rep["batch"],
        "p50_ms": rep["latency_ms"]["p50"],
        "p99_ms": rep["latency_ms"]["p99"],
        "avg_batch": rep["server_stats"]["avg_batch"],
        "queue_ms_per_request": rep["server_stats"]["queue_ms_per_request"],
        "errors": rep["errors"],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'model':<25} | {'frontends':>9} | {'conc':>4} | {'img/req':>7} | {'images/s':>9} | {'p50 ms':>8} | "
        f"{'p99 ms':>8} | {'avg batch':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<25} | {r.get('frontends', 1):>9} | {r['concurrency']:>4} | {r.get('request_batch', 1):>7} | "
            f"{num(r['images_per_s'], '9.1f')} | "
            f"{num(r['p50_ms'], '8.2f')} | {num(r['p99_ms'], '8.2f')} | {num(r['avg_batch'], '9.2f')}"
            + (f"   errors {r['errors']}" if r["errors"] else "")
        )
    return "\n".join(lines)


def format_ceiling(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        lines.append(
            f"in-process {r['variant']:<13} b={r['batch']:<3} {r['mode']:<19} {r['images_per_s']:9.1f} images/s "
            f"({r['ms_per_batch']:.2f} ms/batch)"
        )
    return "\n".join(lines)


# issue 19: served through shared memory / the in-process compute-only ceiling, at the highest concurrency
SHM_TARGETS = {"system": 0.5, "cuda": 0.7}


# issue 18: served images/s at the highest concurrency with several frontends (today's 1,432 x 4 for FP32 input)
FRONTENDS_TARGETS = {COMPILED: 4 * 1432.0, COMPILED_U8: 10000.0}


def ratios(rows: list[dict[str, Any]], ceiling: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets and comparisons, over the rows of the server with the most frontends, and (with
    several servers) each model's images/s with the most frontends / with the fewest."""
    if not rows:
        return {}
    most = max(r.get("frontends", 1) for r in rows)
    fewest = min(r.get("frontends", 1) for r in rows)
    out = single_server_ratios([r for r in rows if r.get("frontends", 1) == most], ceiling)
    hi = max(r["concurrency"] for r in rows if r.get("request_batch", 1) == 1)
    cell = {
        (r["model"], r.get("frontends", 1)): r["images_per_s"]
        for r in rows
        if r["concurrency"] == hi and r.get("request_batch", 1) == 1
    }
    for model in MODELS:
        if most > 1 and model in FRONTENDS_TARGETS and (model, most) in cell:
            out[f"{model}_frontends{most}"] = {
                "what": f"{model} served images/s at c={hi} with --frontends {most}",
                "value": cell[(model, most)],
                "target": f">= {FRONTENDS_TARGETS[model]:g}",
                "met": cell[(model, most)] >= FRONTENDS_TARGETS[model],
            }
        if most != fewest and (model, most) in cell and (model, fewest) in cell:
            out[f"{model}_frontends{most}_over_{fewest}"] = {
                "what": f"{model} at c={hi}: --frontends {most} / --frontends {fewest}",
                "value": ratio(cell[(model, most)], cell[(model, fewest)]),
                "target": "info",
                "met": True,
            }
    return out


def single_server_ratios(rows: list[dict[str, Any]], ceiling: list[dict[str, Any]]) -> dict[str, Any]:
    single = [r for r in rows if r.get("request_batch", 1) == 1]
    hi = max(r["concurrency"] for r in single)
    cell = {(r["model"], r["concurrency"]): r for r in single}
    ips = {m: (cell[(m, hi)]["images_per_s"] if (m, hi) in cell else None) for m in MODELS}
    ceil = {(c["variant"], c["mode"]): c["images_per_s"] for c in ceiling}
    out: dict[str, Any] = {}

    def add(key: str, what: str, value: float | None, target: float | None) -> None:
        out[key] = {
            "what": what,
            "value": value,
            "target": f">= {target}" if target is not None else "info",
            "met": True if target is None else (value is not None and value >= target),
        }

    add(
        "fp16_compiled_over_fp32",
        f"served images/s {COMPILED} / {FP32} at c={hi}",
        ratio(ips[COMPILED], ips[FP32]),
        SPEEDUP_TARGET,
    )
    add("fp16_over_fp32", f"served images/s {FP16} / {FP32} at c={hi}", ratio(ips[FP16], ips[FP32]), None)
    add(
        "u8_over_fp32",
        f"served images/s {COMPILED_U8} (UINT8 pixels) / {FP32} at c={hi}",
        ratio(ips[COMPILED_U8], ips[FP32]),
        None,
    )
    batched = {(r["model"], r["concurrency"]): r["images_per_s"] for r in rows if r.get("request_batch", 1) > 1}
    for (model, conc), value in sorted(batched.items()):
        if model != FP32 and (FP32, conc) in batched:
            add(
                f"batched_{model}_over_fp32_c{conc}",
                f"served images/s {model} / {FP32}, c={conc} with several images per request",
                ratio(value, batched[(FP32, conc)]),
                None,
            )
    add(
        "compiled_over_fp16",
        f"served images/s {COMPILED} / {FP16} at c={hi}",
        ratio(ips[COMPILED], ips[FP16]),
        None,
    )
    if ceiling:
        add(
            "served_over_ceiling_transfers",
            f"{COMPILED} served at c={hi} / in-process fp16 compiled with transfers",
            ratio(ips[COMPILED], ceil.get(("fp16 compiled", "with transfers"))),
            CEILING_TARGET,
        )
        add(
            "served_over_ceiling_compute",
            f"{COMPILED} served at c={hi} / in-process fp16 compiled compute only",
            ratio(ips[COMPILED], ceil.get(("fp16 compiled", "compute only"))),
            None,
        )
        add(
            "served_over_ceiling_as_backend",
            f"{COMPILED} served at c={hi} / in-process fp16 compiled, transfers as the backend does them",
            ratio(ips[COMPILED], ceil.get(("fp16 compiled", "as the backend does"))),
            None,
        )
        add(
            "ceiling_compiled_over_fp32",
            "in-process compute only: fp16 compiled / fp32 eager",
            ratio(ceil.get(("fp16 compiled", "compute only")), ceil.get(("fp32 eager", "compute only"))),
            None,
        )
    compute = ceil.get(("fp16 compiled", "compute only"))
    for kind, target in SHM_TARGETS.items():  # tensors through shared memory, best images per request
        shm_rows = [r for r in rows if r["model"] == f"{COMPILED}+{kind}_shm" and r["concurrency"] == hi]
        if shm_rows and compute:
            best = max(shm_rows, key=lambda r: r["images_per_s"])
            add(
                f"{kind}_shm_over_compute",
                f"{COMPILED} through {kind} shared memory at c={hi}, {best['request_batch']} images/request / "
                "in-process fp16 compiled compute only",
                ratio(best["images_per_s"], compute),
                target,
            )
    ran = {r["model"] for r in rows}
    if ran <= set(JPEG_MODELS):  # a JPEG-only run: the ratios above have nothing to compare
        out.clear()
    if JPEG in ran:
        add("jpeg_gpu_images_per_s", f"{JPEG} (GPU decode) served images/s at c={hi}", ips[JPEG], JPEG_TARGET)
        add(
            "jpeg_over_ceiling",
            f"{JPEG} served at c={hi} / in-process fp16 compiled with GPU JPEG decode",
            ratio(ips[JPEG], ceil.get(("fp16 compiled", "jpeg, GPU decode"))),
            None,
        )
        add(
            "jpeg_over_compute",
            f"{JPEG} served at c={hi} / in-process fp16 compiled compute only",
            ratio(ips[JPEG], ceil.get(("fp16 compiled", "compute only"))),
            None,
        )
    if JPEG_CPU in ran:
        add(
            "jpeg_cpu_over_ceiling",
            f"{JPEG_CPU} served at c={hi} / in-process fp16 compiled with Pillow JPEG decode",
            ratio(ips[JPEG_CPU], ceil.get(("fp16 compiled", "jpeg, CPU decode"))),
            None,
        )
    if JPEG in ran and JPEG_CPU in ran:
        add(
            "jpeg_gpu_over_cpu_decode",
            f"served images/s {JPEG} / {JPEG_CPU} at c={hi}",
            ratio(ips[JPEG], ips[JPEG_CPU]),
            None,
        )
    return out


def report_text(result: dict[str, Any]) -> str:
    env = result["environment"]
    cfg = result["config"]
    lines = [
        "",
        f"device: {env.get('gpu') or env.get('cpu') or '?'} | torch {env.get('torch')} (CUDA {env.get('cuda')}) | "
        f"driver {env.get('driver') or '-'} | grpcio {env.get('grpcio', '?')} | python {env.get('python')}",
        f"ResNet-50 {cfg['image']}x{cfg['image']}, max_batch_size {cfg['max_batch_size']}, "
        f"max_queue_delay {cfg['delay_us']} us, compile {cfg['compile_mode']} "
        f"(batch sizes {cfg['compile_batch_sizes']}), {cfg['duration_s']:g} s per point after "
        f"{cfg['warmup_s']:g} s warm-up, gRPC, one image per request",
        "",
        format_table(result["summary"]),
    ]
    jpeg = cfg.get("jpeg")
    if jpeg:
        lines.insert(
            -2,
            f"JPEG models: {jpeg['images']} distinct {jpeg['what']} {cfg['image']}x{cfg['image']} images, quality "
            f"{jpeg['quality']}, {jpeg['mean_bytes'] / 1000:.1f} KB on average, one BYTES row per image",
        )
    if result["ceiling"]:
        lines += ["", format_ceiling(result["ceiling"])]
    if result["load_seconds"]:
        lines += ["", "load (until ready): " + ", ".join(f"{m} {s:.1f} s" for m, s in result["load_seconds"].items())]
    lines.append("")
    for r in result["ratios"].values():
        value = "-" if r["value"] is None else f"{r['value']:.2f}"
        verdict = "" if r["target"] == "info" else f" (target {r['target']}: {'met' if r['met'] else 'MISSED'})"
        lines.append(f"{r['what']}: {value}{verdict}")
    if cfg["device"] != "gpu" or cfg["quick"]:
        lines.append("(the targets are for the GPU defaults; a CPU or --quick run only shows the bench works)")
    lines.append(f"total {result['elapsed_s']:.0f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main


def report_progress(say: Output, rep: dict[str, Any]) -> None:
    st = rep["server_stats"]
    say.progress(
        f"  {summary_line(rep)}\n"
        f"      avg batch {num(st['avg_batch'], '.2f')}  "
        f"queue {num(st['queue_ms_per_request'], '.2f')} ms/req  "
        f"executions by batch size {st['batch_executions']}  "
        f"client cpu {num(rep.get('client_cpu_util'), '.2f')} cores"
    )


def bench(args: argparse.Namespace, workdir: Path, say: Output) -> dict[str, Any]:
    t_start = time.monotonic()
    env = torch_info()
    smi = nvidia_smi()
    info = machine_info()
    env.update(python=info["python"], cpu=info.get("cpu"), cpu_count=info["cpu_count"])
    if smi:
        env["driver"] = smi["driver"]
        env["gpu_memory_total"] = smi["memory_total"]
        env.setdefault("gpu", smi["name"])
    say(
        f"GPU {env.get('gpu', '-')} (capability {env.get('capability', '-')}), driver {env.get('driver', '-')}, "
        f"torch {env['torch']} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn', '-')}), grpcio {env.get('grpcio')}, "
        f"python {env['python']}, {env['cpu_count']} CPUs"
    )
    if args.device == "gpu" and not env["cuda_available"]:
        raise BenchError(f"--device gpu but torch {env['torch']} sees no CUDA device (use --device cpu)")

    repo = args.repo or workdir / "repo"
    t0 = time.monotonic()
    weights = write_repository(
        repo,
        args.models,
        image=args.image,
        max_batch_size=args.max_batch_size,
        delay_us=args.delay_us,
        device=args.device,
        compile_mode=args.compile_mode,
        compile_batch_sizes=args.compile_batch_sizes,
        seed=args.seed,
        instances=args.instances,
    )
    say.progress(f"wrote {len(args.models)} models to {repo} in {time.monotonic() - t0:.1f} s")

    result: dict[str, Any] = {
        "machine": info,
        "environment": env,
        "config": {
            "device": args.device,
            "quick": args.quick,
            "models": list(args.models),
            "image": args.image,
            "max_batch_size": args.max_batch_size,
            "delay_us": args.delay_us,
            "instances": args.instances,
            "frontends": args.frontends,
            "connections": args.connections,
            "client_processes": args.client_processes,
            "compile_mode": args.compile_mode,
            "compile_batch_sizes": args.compile_batch_sizes,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "protocol": "grpc",
            "request_batch": 1,
            "batched_points": {"request_batch": args.request_batch, "concurrency": args.batched_concurrency},
            "ceiling_batch": args.ceiling_batch,
            "seed": args.seed,
        },
        "load_seconds": {},
        "runs": [],
        "summary": [],
        "ceiling": [],
    }

    def finish(complete: bool) -> dict[str, Any]:
        result["ratios"] = ratios(result["summary"], result["ceiling"])
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["elapsed_s"] = time.monotonic() - t_start
        say.save(result, complete)
        return result

    for frontends in [] if args.ceiling_only else sorted(args.frontends, reverse=True):
        serve_and_measure(args, frontends, repo, workdir, say, result, finish)
    if args.ceiling:
        say.progress(f"in-process ceiling at batch {args.ceiling_batch} (subprocess) ...")
        spec = {
            "device": args.device,
            "batch": args.ceiling_batch,
            "image": args.image,
            "compile_mode": args.compile_mode,
            "weights": str(weights),
            "seconds": args.ceiling_seconds,
            "repeats": args.ceiling_repeats,
            "seed": args.seed,
            "variants": ceiling_variants(args.models),
            "jpeg": bool(set(args.models) & set(JPEG_MODELS)),
        }
        result["ceiling"] = run_ceiling(spec, workdir, say)
    return finish(complete=False)


def serve_and_measure(
    args: argparse.Namespace,
    frontends: int,
    repo: Path,
    workdir: Path,
    say: Output,
    result: dict[str, Any],
    finish: Callable[[bool], Any],
) -> None:
    """One server (``serve --frontends frontends``): each model loaded, measured and unloaded in turn."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    settings = workdir / "server.yaml"
    settings.write_text(f"load_timeout_s: {args.load_timeout}\nlog_level: INFO\n")
    cmd = [
        *ours_command(repo, grpc_port, http_port, metrics_port),
        "--model-control-mode",
        "explicit",
        "--host",
        "127.0.0.1",
        "--config",
        str(settings),
        "--frontends",
        str(frontends),
    ]
    server = start_server(
        f"dl-inference serve --frontends {frontends}",
        cmd,
        workdir / f"server_frontends{frontends}.log",
        f"127.0.0.1:{grpc_port}",
        f"http://127.0.0.1:{http_port}",
    )
    try:
        took = wait_ready(server, args.ready_timeout, ())
        say.progress(
            f"server (--frontends {frontends}) ready in {took:.1f} s (gRPC {server.grpc_url}, "
            f"HTTP {server.http_url}, pid {server.proc.pid})"
        )
        jpegs = jpeg_pool(args.image, seed=args.seed) if set(args.models) & set(JPEG_MODELS) else None
        if jpegs is not None:
            sizes = [len(row[0]) for row in jpegs]
            result["config"]["jpeg"] = {
                "images": len(sizes),
                "quality": JPEG_QUALITY,
                "mean_bytes": sum(sizes) / len(sizes),
                "what": "synthetic photo-like (load_tests/synthetic_jpeg.py)",
            }

        def record(name: str, conc: int, rep: dict[str, Any]) -> None:
            rep["model_name"], rep["frontends"] = name, frontends
            result["runs"].append(rep)
            result["summary"].append(summary_row(name, conc, rep, frontends))
            report_progress(say, rep)

        for model in args.models:
            data = {"image": jpegs} if model in JPEG_MODELS and jpegs is not None else None
            key = model if len(args.frontends) == 1 else f"{model} (--frontends {frontends})"
            result["load_seconds"][key] = load_model(server, model, args.load_timeout, say)
            for conc in args.concurrency:
                record(model, conc, measure(server, model, conc, args, input_data=data))
            for kind in [] if data is not None else args.shared_memory:  # tensors through shared memory
                for conc in args.concurrency:
                    for batch in sorted({1, args.request_batch}):
                        rep = measure(server, model, conc, args, request_batch=batch, shared_memory=kind)
                        record(f"{model}+{kind}_shm", conc, rep)
            if args.request_batch > 1:
                for conc in args.batched_concurrency:
                    record(
                        model,
                        conc,
                        measure(server, model, conc, args, request_batch=args.request_batch, input_data=data),
                    )
            took = unload_model(server, model, args.load_timeout)
            mem = gpu_memory_used() if args.device == "gpu" else None
            say.progress(f"unloaded {model} in {took:.1f} s" + (f" (GPU memory used now {mem})" if mem else ""))
            finish(False)  # partial results on disk, in case the run is cut short
    finally:
        stop_server(server)


def ceiling_variants(models: list[str] | tuple[str, ...]) -> list[str]:
    """The in-process variants a run compares against: all three, or only fp16 compiled when every model
    is a JPEG one (they run the fp16 compiled network; the eager ones would only cost minutes)."""
    if models and all(m in JPEG_MODELS for m in models):
        return ["fp16 compiled"]
    return ["fp32 eager", "fp16 eager", "fp16 compiled"]


def _models(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in MODELS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"models are {', '.join(MODELS)}; got {text!r}")
    return [m for m in MODELS if m in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.bench_pytorch_gpu",
        description="ResNet-50 fp32 / fp16 / fp16 compiled served by the PyTorch backend, and in-process ceilings",
    )
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="KIND_GPU (default) or KIND_CPU")
    p.add_argument("--quick", action="store_true", help="small and short (64x64, max batch 4, conc 1,4, 3 s)")
    p.add_argument(
        "--models",
        type=_models,
        default=list(DEFAULT_MODELS),
        help=f"comma list of {', '.join(MODELS)} (default {','.join(DEFAULT_MODELS)})",
    )
    p.add_argument("--concurrency", type=int_list, default=None, help="comma list (default 1,16,64; quick 1,4)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per point (default 10; quick 3)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per point (default 3; quick 1)")
    p.add_argument("--image", type=int, default=None, help="input height = width (default 224; quick 64)")
    p.add_argument("--max-batch-size", type=int, default=None, help="default 64; quick 4")
    p.add_argument("--delay-us", type=int, default=1000, help="max_queue_delay_microseconds (default 1000)")
    p.add_argument("--instances", type=int, default=1, help="instances of each model (instance_group count)")
    p.add_argument(
        "--frontends",
        type=int_list,
        default=[1],
        help="serve --frontends (processes on the ports); a comma list runs one server after another, "
        "most frontends first, in one report",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=1,
        help="gRPC connections the requests of each client process take turns on",
    )
    p.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="load from this many loadgen processes (the concurrency shared; one Python client tops out "
        "near a core); inline tensors only",
    )
    p.add_argument(
        "--request-batch",
        type=int,
        default=None,
        help="images per request of the extra points run after each sweep (default 8; quick 1 = none)",
    )
    p.add_argument(
        "--batched-concurrency", type=int_list, default=[16], help="concurrency of those points (default 16)"
    )
    p.add_argument(
        "--compile-mode",
        choices=("off", "default", "reduce-overhead", "max-autotune"),
        default=None,
        help="resnet50_fp16_compiled's compile parameter (default reduce-overhead; cpu: default)",
    )
    p.add_argument(
        "--compile-batch-sizes", default=None, help="its compile_batch_sizes (default 1,2,4,8,16,32,64; quick 4)"
    )
    p.add_argument("--ceiling-batch", type=int, default=None, help="in-process batch size (default max batch size)")
    p.add_argument("--ceiling-seconds", type=float, default=None, help="seconds per timed repeat (default 0.5)")
    p.add_argument("--ceiling-repeats", type=int, default=None, help="timed repeats, median taken (default 5)")
    p.add_argument("--no-ceiling", dest="ceiling", action="store_false", help="skip the in-process ceiling")
    p.add_argument(
        "--shared-memory",
        type=lambda text: [k for k in text.split(",") if k],
        default=[],
        help="also load each model through these shared-memory kinds (comma list of system, cuda), at each "
        "concurrency with 1 and --request-batch images per request",
    )
    p.add_argument("--ceiling-only", action="store_true", help="only the in-process ceiling (no server)")
    p.add_argument("--repo", type=Path, default=None, help="write the model repository here (default a temp dir)")
    p.add_argument("--load-timeout", type=float, default=900.0, help="seconds a model may take to load")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for the server to start")
    p.add_argument("--request-timeout", type=float, default=120.0, help="loadgen's per-request deadline, seconds")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "load_tests" / "results")
    p.add_argument("--name", default=None, help="file stem (default bench_pytorch_gpu; cpu/quick runs differ)")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the server log (kept on errors)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--ceiling-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what was not given from the GPU or the quick defaults."""
    base = dict(QUICK_DEFAULTS if args.quick else GPU_DEFAULTS)
    if args.device == "cpu":
        base["compile_mode"] = "default"  # reduce-overhead is CUDA graphs
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, int_list(str(value)) if key == "concurrency" else value)
    if args.ceiling_batch is None:
        args.ceiling_batch = args.max_batch_size
    args.request_batch = min(args.request_batch, args.max_batch_size)
    if args.name is None:
        args.name = "bench_pytorch_" + ("cpu" if args.device == "cpu" else "gpu") + ("_quick" if args.quick else "")
    return args


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ceiling_worker is not None:
        return ceiling_worker(args.ceiling_worker)
    args = resolve_defaults(args)
    status, result = run_bench(
        "bench_pytorch_gpu", args.out_dir, args.name, args.keep_logs, lambda w, say: bench(args, w, say), report_text
    )
    if result is None:
        return status
    missed = [k for k, r in result["ratios"].items() if not r["met"]]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
