"""``dl-inference convert tf-to-onnx``: its flags and its run. Imports nothing heavy until it runs.

Exit status: 0 written and checked; 1 the parity check failed (OUTPUT untouched, the rejected model
kept as ``OUTPUT.parity-failed``); 2 anything else (not a SavedModel, unknown signature, TensorFlow or
tf2onnx missing, tf2onnx failed, bad flags).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["add_arguments", "run"]


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be 1 or more, got '{text}'")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments (defaults come from the converter's constants)."""
    from dl_inference.convert.tensorflow.parity import DEFAULT_ATOL, DEFAULT_DIM_SIZE, DEFAULT_INT_HIGH, DEFAULT_RTOL
    from dl_inference.convert.tensorflow.to_onnx import DEFAULT_OPSET

    p.add_argument("savedmodel", help="SavedModel directory, or a repository version directory with model.savedmodel/")
    p.add_argument(
        "output", nargs="?",
        help="ONNX file to write (default: model.onnx beside model.savedmodel, for repositories)",
    )  # fmt: skip
    p.add_argument("--signature", default="serving_default", help="signature to convert (default serving_default)")
    p.add_argument("--tag", default="serve", help="MetaGraph tag to load (default serve)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument(
        "--no-check", dest="check", action="store_false",
        help="skip the parity check against TensorFlow (onnx.checker still runs)",
    )  # fmt: skip
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"parity: relative tolerance ({DEFAULT_RTOL:g})")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"parity: absolute tolerance ({DEFAULT_ATOL:g})")
    p.add_argument("--seed", type=int, default=0, help="parity: random seed of the inputs (default 0)")
    p.add_argument(
        "--batch-sizes", type=_batch_sizes, default=(1, 3), metavar="N,N",
        help="parity: batch sizes to run when the batch dimension is dynamic (default 1,3)",
    )  # fmt: skip
    p.add_argument(
        "--dim-size", type=int, default=DEFAULT_DIM_SIZE,
        help=f"parity: size of unknown non-batch dimensions (default {DEFAULT_DIM_SIZE})",
    )  # fmt: skip
    p.add_argument(
        "--int-high", type=int,
        help=f"parity: integer inputs are drawn from [0, N) (default {DEFAULT_INT_HIGH}; 256 for uint8)",
    )  # fmt: skip


def run(args: argparse.Namespace, emit: Callable[[str], None]) -> int:
    """Run the conversion the parsed ``args`` describe; progress and the result go to ``emit``."""
    from dl_inference.convert.tensorflow.errors import ParityMismatch
    from dl_inference.convert.tensorflow.parity import ParitySettings
    from dl_inference.convert.tensorflow.to_onnx import ConvertOptions, convert_savedmodel
    from dl_inference.errors import ServerError

    options = ConvertOptions(
        signature=args.signature,
        tag=args.tag,
        opset=args.opset,
        check=args.check,
        parity=ParitySettings(
            rtol=args.rtol,
            atol=args.atol,
            seed=args.seed,
            batch_sizes=tuple(args.batch_sizes),
            dim_size=args.dim_size,
            int_high=args.int_high,
        ),
    )
    try:
        result = convert_savedmodel(Path(args.savedmodel), args.output and Path(args.output), options, emit)
    except ParityMismatch as exc:
        print(f"dl-inference: {exc.message}", file=sys.stderr)
        return 1
    except ServerError as exc:
        print(f"dl-inference: {exc.message}", file=sys.stderr)
        return 2
    ins = ", ".join(t.name for t in result.inputs)
    outs = ", ".join(t.name for t in result.outputs)
    if result.parity is None:
        checked = "parity not checked"
    else:
        worst = max(result.parity.per_output().values(), key=lambda v: v[0])
        checked = f"parity ok (max abs diff {worst[0]:.3g}, max rel diff {worst[1]:.3g})"
    emit(
        f"wrote {result.output} ({result.size_bytes / 1e6:.1f} MB, opset {result.opset}, {result.nodes} nodes) "
        f"in {result.seconds:.1f} s: inputs [{ins}], outputs [{outs}]; {checked}"
    )
    return 0
