"""Measure ``convert tf-to-onnx`` on Keras ResNet-50 (random weights): time, parity, file size.

    python -m load_tests.bench_tf_to_onnx [--workdir DIR] [--seed 0] [--logits]

Builds ``keras.applications.ResNet50(weights=None)`` with a fixed seed (``--logits``: without its
final softmax, so parity is measured on logits rather than on probabilities of about 1e-3), exports
it as a repository version (``DIR/resnet50/1/model.savedmodel``), converts it in this process with
the default settings (so ``model.onnx`` lands beside it) and prints a table. Needs
``dl_inference[tensorflow]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="where to write the SavedModel and the ONNX file (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0, help="weights and parity inputs seed (default 0)")
    p.add_argument("--logits", action="store_true", help="no softmax at the end (classifier_activation=None)")
    args = p.parse_args(argv)

    started = time.monotonic()
    from dl_inference.convert.tensorflow.savedmodel import import_tensorflow

    tf = import_tensorflow()
    import keras

    import_s = time.monotonic() - started
    from dl_inference.convert.tensorflow.parity import ParitySettings
    from dl_inference.convert.tensorflow.to_onnx import ConvertOptions, convert_savedmodel

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_tf_to_onnx_"))
    version = workdir / "resnet50" / "1"
    version.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    t0 = time.monotonic()
    model = keras.applications.ResNet50(weights=None, classifier_activation=None if args.logits else "softmax")
    model.export(str(version / "model.savedmodel"), verbose=False)
    export_s = time.monotonic() - t0
    del model

    result = convert_savedmodel(version, None, ConvertOptions(parity=ParitySettings(seed=args.seed)), emit=print)
    savedmodel_mb = sum(f.stat().st_size for f in (version / "model.savedmodel").rglob("*") if f.is_file()) / 1e6
    rows = [
        ("machine", f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.system()}"),
        ("versions", f"tensorflow {tf.__version__}, keras {keras.__version__}, {_versions()}"),
        ("import tensorflow + keras", f"{import_s:.1f} s"),
        ("build + export SavedModel", f"{export_s:.1f} s ({savedmodel_mb:.1f} MB on disk)"),
        ("convert (load .. check)", f"{result.seconds:.1f} s"),
        *((f"  {name}", f"{secs:.1f} s") for name, secs in result.phases.items()),
        ("ONNX file", f"{result.size_bytes / 1e6:.1f} MB, {result.nodes} nodes, opset {result.opset}"),
    ]
    if result.parity is not None:
        batches = ", ".join(str(b) for b in result.parity.batches)
        for name, (max_abs, max_rel, ok) in result.parity.per_output().items():
            rows.append(
                (f"parity '{name}' (batches {batches})", f"max abs {max_abs:.3g}, max rel {max_rel:.3g}, ok={ok}")
            )
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"\nwrote {result.output}")
    return 0


def _versions() -> str:
    import onnx
    import onnxruntime
    import tf2onnx

    return f"tf2onnx {tf2onnx.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}"


if __name__ == "__main__":
    raise SystemExit(main())
