"""ResNet-50 (Keras architecture, random weights) as a SavedModel on CPU, served: stock TensorFlow, oneDNN
forced off and on, Intel Extension for TensorFlow, and the same model converted to ONNX Runtime.

What it does:

1. builds ``keras.applications.ResNet50(weights=None)`` with a fixed seed in a subprocess and saves it
   as a SavedModel whose ``serving_default`` signature takes ``images`` FP32 [-1,224,224,3] and gives
   ``probs`` FP32 [-1,1000]; converts it with ``dl-inference convert tf-to-onnx`` (parity-checked);
2. writes a repository with one model per variant, each ``max_batch_size: 8`` without dynamic batching
   (a request is a batch), KIND_CPU, ``--threads`` intra-op threads (default: every CPU this process
   may use) unless said otherwise:

   - ``tf_default``: TensorFlow as installed, oneDNN left to TensorFlow's own choice for this CPU;
   - ``tf_onednn_off`` / ``tf_onednn_on``: parameter ``onednn`` off / on (``TF_ENABLE_ONEDNN_OPTS``);
   - ``tf_itex``: ``worker_environment: itex``: the worker runs TensorFlow 2.15 + Intel Extension for
     TensorFlow from ``.venv-itex`` (``make itex-env``); left out, and said so, when it is missing;
   - ``onnxruntime``: the converted ``model.onnx`` on ONNX Runtime's CPU provider;
   - the CPU settings: ``tf_1thread`` (``intra_op_threads`` 1), ``tf_2x1thread`` (two instances of one
     thread each, at concurrency 2, against ``tf_default`` at concurrency 2) and ``tf_1thread_pinned``
     (one thread, ``cpu_affinity`` the last CPU);

3. starts one server (``--model-control-mode explicit``), loads every variant, then for ``--rounds``
   rounds, in an order rotated each round (so slow drift of this shared machine falls on all alike),
   runs ``load_tests.loadgen`` over gRPC: the first five at concurrency 1 with 1 and 8 images per
   request, the CPU-setting variants with 1 image per request;
4. prints the median table and the ratios (the first five against ``tf_onednn_off``, the closest thing
   here to the seed's "TensorFlow without MKL"; the settings against their reference); writes
   ``<out-dir>/bench_tensorflow_cpu.{json,txt}`` as it goes.

Run (about 15 minutes with the defaults on a 2-core VM)::

    make bench-tensorflow-cpu                                  # = python -m load_tests.bench_tensorflow_cpu
    python -m load_tests.bench_tensorflow_cpu --rounds 1 --duration 5 --variants tf_default,onnxruntime
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from load_tests.bench_pytorch_gpu import Output, format_table, load_model, measure, run_bench, summary_row
from load_tests.lib.report import machine_info, median, ratio
from load_tests.lib.server import REPO_ROOT, BenchError, free_port, ours_command, start_server, stop_server, wait_ready

# variant -> (config parameters, instances, (images per request, concurrency) points). "{threads}" is --threads.
# The first five are the comparison the issue asks for (one instance using every thread, concurrency 1);
# the rest measure the CPU settings against tf_default: one thread, two single-thread instances at
# concurrency 2, and one thread pinned to one CPU.
SPECS: dict[str, tuple[dict[str, str], int, tuple[tuple[int, int], ...]]] = {
    "tf_default": ({"intra_op_threads": "{threads}"}, 1, ((1, 1), (8, 1), (1, 2))),
    "tf_onednn_off": ({"intra_op_threads": "{threads}", "onednn": "off"}, 1, ((1, 1), (8, 1))),
    "tf_onednn_on": ({"intra_op_threads": "{threads}", "onednn": "on"}, 1, ((1, 1), (8, 1))),
    "tf_itex": ({"intra_op_threads": "{threads}", "worker_environment": "itex"}, 1, ((1, 1), (8, 1))),
    "onnxruntime": ({"intra_op_thread_count": "{threads}"}, 1, ((1, 1), (8, 1), (1, 8))),
    # OpenVINO (issue 27) on the converted model.onnx: f32, and bf16 (native on AMX / AVX-512 BF16 CPUs; elsewhere
    # OpenVINO runs f32 and the worker says so), at 1 and 8 images per request and at concurrency 8
    "openvino_f32": ({"num_threads": "{threads}", "precision": "f32"}, 1, ((1, 1), (8, 1), (1, 8))),
    "openvino_bf16": ({"num_threads": "{threads}", "precision": "bf16"}, 1, ((1, 1), (8, 1), (1, 8))),
    "tf_1thread": ({"intra_op_threads": "1"}, 1, ((1, 1),)),
    "tf_2x1thread": ({"intra_op_threads": "1"}, 2, ((1, 2),)),
    "tf_1thread_pinned": ({"intra_op_threads": "1", "cpu_affinity": "{last_cpu}"}, 1, ((1, 1),)),
}
VARIANTS = tuple(SPECS)
BASELINE = "tf_onednn_off"
# (variant, over, request batch, concurrency): the ratios printed under the table.
COMPARISONS = [
    *((v, BASELINE, b, 1) for v in ("tf_default", "tf_onednn_on", "tf_itex", "onnxruntime") for b in (1, 8)),
    ("tf_itex", "tf_onednn_on", 1, 1),
    ("tf_itex", "tf_onednn_on", 8, 1),
    ("tf_1thread", "tf_default", 1, 1),
    ("tf_2x1thread", "tf_default", 1, 2),
    ("tf_1thread_pinned", "tf_1thread", 1, 1),
    *((v, "onnxruntime", b, c) for v in ("openvino_f32", "openvino_bf16") for b, c in ((1, 1), (8, 1), (1, 8))),
    ("openvino_bf16", "openvino_f32", 8, 1),
]
ITEX_PYTHON = REPO_ROOT / ".venv-itex" / "bin" / "python"
IMAGE = 224

BUILD_SCRIPT = """
import sys
import keras
import tensorflow as tf

path, seed, image = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keras.utils.set_random_seed(seed)
net = keras.applications.ResNet50(weights=None, input_shape=(image, image, 3), classes=1000)


class Serving(tf.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    @tf.function(input_signature=[tf.TensorSpec([None, image, image, 3], tf.float32, name="images")])
    def serve(self, images):
        return {"probs": self.net(images, training=False)}


module = Serving(net)
tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
print(f"ResNet-50: {net.count_params():,} parameters, TensorFlow {tf.__version__}, Keras {keras.__version__}")
"""


def build_savedmodel(path: Path, seed: int, image: int, say: Output) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, str(path), str(seed), str(image)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BenchError(f"building the ResNet-50 SavedModel failed:\n{proc.stderr[-3000:]}")
    line = proc.stdout.strip().splitlines()[-1]
    say.progress(line)
    return line


def convert_to_onnx(savedmodel: Path, onnx_path: Path, say: Output) -> list[str]:
    """``dl-inference convert tf-to-onnx`` (with its parity check); its report lines."""
    cmd = [sys.executable, "-m", "dl_inference", "convert", "tf-to-onnx", str(savedmodel), str(onnx_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise BenchError(f"tf-to-onnx failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "parity" in ln.lower() or "max" in ln.lower()]
    for ln in lines[-6:]:
        say.progress("  convert: " + ln.strip())
    return lines


def variant_config(variant: str, threads: int) -> str:
    params, instances, _ = SPECS[variant]
    backend = variant if variant == "onnxruntime" else "openvino" if variant.startswith("openvino") else "tensorflow"
    last_cpu = str(max(os.sched_getaffinity(0)))
    lines = [f'backend: "{backend}"', "max_batch_size: 8", f"instance_group [{{ count: {instances}, kind: KIND_CPU }}]"]
    for key, value in params.items():
        value = value.format(threads=threads, last_cpu=last_cpu)
        lines.append(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def write_repository(repo: Path, variants: list[str], savedmodel: Path, onnx_path: Path | None, threads: int) -> None:
    for variant in variants:
        version = repo / variant / "1"
        version.mkdir(parents=True, exist_ok=True)
        if variant == "onnxruntime" or variant.startswith("openvino"):
            assert onnx_path is not None
            shutil.copyfile(onnx_path, version / "model.onnx")
        else:
            shutil.copytree(savedmodel, version / "model.savedmodel", dirs_exist_ok=True)
        (repo / variant / "config.pbtxt").write_text(variant_config(variant, threads))


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["request_batch"], r["concurrency"]), []).append(r)
    out = []
    for (model, batch, conc), group in cells.items():

        def med(key: str, group: list[dict[str, Any]] = group) -> float | None:
            return median(g[key] for g in group)

        out.append({
            "model": model, "concurrency": conc, "request_batch": batch, "images_per_s": med("images_per_s"),
            "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "avg_batch": med("avg_batch"),
            "errors": sum(g["errors"] for g in group), "rounds": len(group),
            "images_per_s_each": [round(g["images_per_s"], 2) for g in group],
        })  # fmt: skip
    order = {v: i for i, v in enumerate(VARIANTS)}
    return sorted(out, key=lambda r: (order.get(r["model"], 99) >= 5, r["request_batch"], r["concurrency"],
                                      order.get(r["model"], 99)))  # fmt: skip


def ratios(medians: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cell = {(r["model"], r["request_batch"], r["concurrency"]): r for r in medians}
    out = []
    for variant, over, batch, conc in COMPARISONS:
        a, b = cell.get((variant, batch, conc)), cell.get((over, batch, conc))
        if a is None or b is None:
            continue
        out.append({
            "variant": variant, "over": over, "request_batch": batch, "concurrency": conc,
            "images_per_s": ratio(a["images_per_s"], b["images_per_s"]), "p50": ratio(a["p50_ms"], b["p50_ms"]),
        })  # fmt: skip
    return out


def format_ratios(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        ips = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.2f}x"
        p50 = "-" if r["p50"] is None else f"{r['p50']:.2f}x"
        lines.append(
            f"{r['variant']:<17} / {r['over']:<13} at {r['request_batch']} image(s)/request, c={r['concurrency']}: "
            f"images/s {ips}, p50 {p50}"
        )
    return "\n".join(lines)


def cpu_flags() -> str:
    from dl_inference.cpu_features import cpu_info

    flags = cpu_info()[1]
    if not flags:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def bench(args: argparse.Namespace, workdir: Path, say: Output) -> dict[str, Any]:
    t_start = time.monotonic()
    info = machine_info()
    info["cpu_flags"] = cpu_flags()
    say(f"CPU {info.get('cpu')} ({info['cpu_count']} CPUs; {info['cpu_flags']}), python {info['python']}")
    variants = list(args.variants)
    itex = args.itex_python
    if "tf_itex" in variants and not Path(itex).exists():
        say(f"tf_itex left out: {itex} does not exist (make itex-env builds it)")
        variants.remove("tf_itex")
    result: dict[str, Any] = {
        "machine": info,
        "config": {
            "variants": variants, "threads": args.threads, "rounds": args.rounds, "duration_s": args.duration,
            "warmup_s": args.warmup, "request_batches": args.request_batches, "protocol": "grpc",
            "image": IMAGE, "seed": args.seed, "itex_python": str(itex) if "tf_itex" in variants else None,
        },
        "runs": [], "summary": [], "load_seconds": {},
    }  # fmt: skip

    def finish() -> dict[str, Any]:
        result["medians"] = median_rows(result["summary"])
        result["ratios"] = ratios(result["medians"])
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["elapsed_s"] = time.monotonic() - t_start
        say.save(result, complete=False)
        return result

    savedmodel = workdir / "resnet50.savedmodel"
    say.progress("building the ResNet-50 SavedModel ...")
    result["model"] = build_savedmodel(savedmodel, args.seed, IMAGE, say)
    onnx_path = None
    if any(v == "onnxruntime" or v.startswith("openvino") for v in variants):
        say.progress("converting it to ONNX (dl-inference convert tf-to-onnx, with its parity check) ...")
        onnx_path = workdir / "resnet50.onnx"
        t0 = time.monotonic()
        result["conversion"] = {"report": convert_to_onnx(savedmodel, onnx_path, say)}
        result["conversion"]["seconds"] = time.monotonic() - t0
    repo = workdir / "repo"
    write_repository(repo, variants, savedmodel, onnx_path, args.threads)

    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    settings = workdir / "server.yaml"
    settings.write_text(f"load_timeout_s: {args.load_timeout}\nlog_level: INFO\n")
    cmd = [*ours_command(repo, grpc_port, http_port, metrics_port), "--model-control-mode", "explicit",
           "--host", "127.0.0.1", "--config", str(settings)]  # fmt: skip
    if "tf_itex" in variants:
        cmd += ["--worker-environment", f"itex={itex}"]
    server = start_server(
        "dl-inference serve", cmd, workdir / "server.log", f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    )
    try:
        took = wait_ready(server, 120, ())
        say.progress(f"server ready in {took:.1f} s")
        for variant in variants:
            result["load_seconds"][variant] = load_model(server, variant, args.load_timeout, say)
        for rnd in range(args.rounds):
            order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
            for variant, batch, conc in points(order, args.request_batches):
                rep = measure(server, variant, conc, args, request_batch=batch)
                rep["model_name"], rep["round"] = variant, rnd
                result["runs"].append(rep)
                row = summary_row(variant, conc, rep)
                result["summary"].append(row)
                say.progress(
                    f"round {rnd + 1}/{args.rounds} {variant:<17} {batch} img/req, c={conc}: "
                    f"{row['images_per_s']:.1f} images/s, p50 {row['p50_ms']:.1f} ms"
                    + (f", {row['errors']} errors" if row["errors"] else "")
                )
            finish()
    finally:
        stop_server(server)
    return finish()


def points(variants: list[str], batches: list[int]) -> list[tuple[str, int, int]]:
    """(variant, images per request, concurrency) in run order."""
    return [(v, b, c) for v in variants for b, c in SPECS[v][2] if b in batches]


def report_text(result: dict[str, Any]) -> str:
    parts = [
        "",
        f"ResNet-50 SavedModel on CPU, served over gRPC; median of {result['config']['rounds']} rounds; "
        f"{result['config']['threads']} intra-op thread(s) per model unless its name says otherwise",
        format_table(result["medians"]),
        "",
        format_ratios(result["ratios"]),
    ]
    return "\n".join(parts)


def _list(kind: type, allowed: tuple[str, ...] | None = None):  # type: ignore[no-untyped-def]
    def parse(text: str) -> list[Any]:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        if not values or (allowed is not None and any(v not in allowed for v in values)):
            raise argparse.ArgumentTypeError(f"want a comma list{' of ' + ', '.join(allowed) if allowed else ''}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m load_tests.bench_tensorflow_cpu", description=__doc__.split("\n")[0])
    p.add_argument("--variants", type=_list(str, VARIANTS), default=list(VARIANTS))
    p.set_defaults(connections=1, client_processes=1)  # bench_pytorch_gpu.measure's: one client, one connection
    p.add_argument("--request-batches", type=_list(int), default=[1, 8], help="images per request (default 1,8)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="intra-op threads per model")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=12.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per point")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--load-timeout", type=float, default=600.0)
    p.add_argument("--itex-python", type=Path, default=ITEX_PYTHON, help="interpreter of the ITEX environment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "load_tests" / "results")
    p.add_argument("--name", default="bench_tensorflow_cpu")
    p.add_argument("--keep", action="store_true", help="keep the work directory (model, repository, server log)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status, _ = run_bench(
        "bench_tensorflow_cpu", args.out_dir, args.name, args.keep, lambda w, say: bench(args, w, say), report_text
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
