"""ResNet-50 in-process on this machine's CPU: ONNX Runtime fp32 against OpenVINO f32 / bf16 / f16 hints.

The issue-27 question for a machine before anything is served: how much does OpenVINO's reduced precision
give on this CPU? ResNet-50 (``load_tests/resnet50_torch.py``, random weights, eval mode) is exported to
ONNX with PyTorch's TorchScript exporter, then timed with ``--threads`` threads at batch 1 and 8:

* ``onnxruntime fp32``: the project's default CPU path (the reference for speed and for the error column);
* ``openvino f32`` / ``bf16`` / ``f16``: the same ONNX file compiled by OpenVINO with that inference
  precision hint; the precision OpenVINO really used is shown (bf16 runs natively only with AMX or
  AVX-512 BF16; elsewhere OpenVINO keeps f32).

Prints the CPU model and its relevant flags, a table (images/s median of ``--repeats`` timed runs of
``--seconds`` each, max relative error against ONNX Runtime on the same inputs) and writes JSON.
Needs torch, onnxruntime and openvino (not the server)::

    python -m load_tests.bench_openvino_inprocess [--threads 2] [--json load_tests/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_info() -> dict[str, Any]:
    from dl_inference.cpu_features import cpu_info as model_and_flags

    model, flags = model_and_flags()
    return {"model": model, "flags": [f for f in FLAGS if f in flags], "cpus": len(os.sched_getaffinity(0))}


def export_onnx(path: Path, image: int) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from resnet50_torch import create_model, random_state_dict

    model = create_model()
    model.load_state_dict(random_state_dict(0))
    model.eval()
    x = torch.randn(1, 3, image, image)
    torch.onnx.export(
        model, (x,), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False,
    )  # fmt: skip


def timed(run: Any, seconds: float, repeats: int, batch: int) -> float:
    for _ in range(3):
        run()
    rates = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run()
            n += 1
        rates.append(n * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.bench_openvino_inprocess")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", default="f32,bf16,f16")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import onnxruntime as ort
    import openvino as ov

    info = cpu_info()
    flags = ", ".join(info["flags"]) or "none of " + ",".join(FLAGS)
    version = ov.get_version().split("-")[0]
    print(f"CPU {info['model']} ({info['cpus']} CPUs; {flags}), {args.threads} threads, "
          f"onnxruntime {ort.__version__}, OpenVINO {version}", flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "resnet50.onnx"
        export_onnx(onnx_path, args.image)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        core = ov.Core()
        compiled = {}
        for precision in args.precisions.split(","):
            props = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": args.threads, "NUM_STREAMS": 1}
            c = core.compile_model(core.read_model(str(onnx_path)), "CPU", props)
            used = c.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            compiled[precision] = (c, c.create_infer_request(), used)
        for batch in (int(b) for b in args.batches.split(",")):
            x = np.random.default_rng(batch).standard_normal((batch, 3, args.image, args.image)).astype(np.float32)
            reference = session.run(["y"], {"x": x})[0]
            feed = {"x": x}
            rate = timed(lambda feed=feed: session.run(["y"], feed), args.seconds, args.repeats, batch)
            rows.append({"runtime": "onnxruntime fp32", "batch": batch, "images_per_s": rate, "max_rel_err": 0.0})
            print(f"  onnxruntime fp32      batch {batch}: {rate:8.1f} images/s", flush=True)
            for precision, (c, request, used) in compiled.items():
                y = np.asarray(request.infer({"x": x})[c.outputs[0]])
                err = float(np.max(np.abs(y - reference)) / max(float(np.max(np.abs(reference))), 1e-12))
                rate = timed(lambda request=request, feed=feed: request.infer(feed), args.seconds, args.repeats, batch)
                label = f"openvino {precision}" + ("" if used == precision else f" (runs {used})")
                rows.append({"runtime": label, "batch": batch, "images_per_s": rate, "max_rel_err": err})
                print(f"  {label:<21} batch {batch}: {rate:8.1f} images/s  max rel err {err:.1e}", flush=True)
    print()
    base = {r["batch"]: r["images_per_s"] for r in rows if r["runtime"] == "onnxruntime fp32"}
    print(f"{'runtime':<24} {'batch':>5} {'images/s':>9} {'x ORT fp32':>10} {'max rel err':>11}")
    for r in rows:
        print(f"{r['runtime']:<24} {r['batch']:>5} {r['images_per_s']:9.1f} "
              f"{r['images_per_s'] / base[r['batch']]:9.2f}x {r['max_rel_err']:11.1e}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": info, "threads": args.threads, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
