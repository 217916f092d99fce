"""A SavedModel signature -> an ONNX file, through tf2onnx, with progress, a parity check and an
atomic write.

    result = convert_savedmodel(Path("model.savedmodel"), Path("model.onnx"), ConvertOptions(), emit=print)

Phases: *loading* (``tf.saved_model.load``), *freezing* (variables into constants, TensorFlow's
grappler pass), *converting* (tf2onnx's rewriters and op handlers), *optimizing* (tf2onnx's ONNX
optimizers), *checking* (``onnx.checker``, then :mod:`.parity`). Graph inputs and outputs take the
signature's keys as names, so a served model keeps its tensor names; unknown dimensions stay
symbolic, so a dynamic batch dimension stays dynamic (the parity check runs batch 1 and 3 to show it).

The model is written to a temporary file beside OUTPUT and checked from there. If it passes, it is
renamed to OUTPUT, so a reader (a polling server) sees the old file or the whole new one. If parity
fails, OUTPUT is left as it was and the rejected model is kept as ``OUTPUT.parity-failed`` (a name no
loader takes for a model) for inspection; :class:`ParityMismatch` says so.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dl_inference.convert.filecache import write_beside
from dl_inference.convert.tensorflow.errors import ConversionFailed, ParityMismatch
from dl_inference.convert.tensorflow.parity import (
    OutputDiff,
    ParityReport,
    ParitySettings,
    check_parity,
    input_problems,
)
from dl_inference.convert.tensorflow.progress import PhaseClock
from dl_inference.convert.tensorflow.savedmodel import (
    LoadedSignature,
    TensorInfo,
    default_output,
    import_tf2onnx,
    load_signature,
    resolve_savedmodel,
)
from dl_inference.errors import InvalidArgument

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_OPSET", "REJECTED_SUFFIX", "ConversionResult", "ConvertOptions", "convert_savedmodel"]

DEFAULT_OPSET = 17  # what ONNX Runtime >= 1.13 and TensorRT 10 both take
MIN_OPSET = 13
REJECTED_SUFFIX = ".parity-failed"
_PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class ConvertOptions:
    """What to convert and how to check it."""

    signature: str = "serving_default"
    tag: str = "serve"
    opset: int = DEFAULT_OPSET
    check: bool = True
    parity: ParitySettings = field(default_factory=ParitySettings)


@dataclass
class ConversionResult:
    """What was written, and what it took."""

    source: Path
    output: Path
    signature: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    opset: int
    nodes: int
    size_bytes: int
    seconds: float
    phases: dict[str, float]
    parity: ParityReport | None


def _validate(options: ConvertOptions, tf2onnx: Any) -> None:
    max_opset = max(tf2onnx.constants.OPSET_TO_IR_VERSION)
    if not MIN_OPSET <= options.opset <= max_opset:
        raise InvalidArgument(
            f"opset {options.opset} is not supported: tf2onnx {tf2onnx.__version__} converts to opsets "
            f"{MIN_OPSET}..{max_opset} here (default {DEFAULT_OPSET})"
        )
    p = options.parity
    if p.rtol < 0 or p.atol < 0:
        raise InvalidArgument(f"tolerances must not be negative (rtol {p.rtol:g}, atol {p.atol:g})")
    if not p.batch_sizes or min(p.batch_sizes) < 1:
        raise InvalidArgument(f"parity batch sizes must be 1 or more, got {list(p.batch_sizes)}")
    if p.dim_size < 1 or (p.int_high is not None and p.int_high < 1):
        raise InvalidArgument("--dim-size and --int-high must be 1 or more")


class _ErrorRecords(logging.Handler):
    """Collects tf2onnx's ERROR log lines: it reports unsupported TensorFlow ops only by logging."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _tf2onnx_logging() -> Iterator[_ErrorRecords]:
    """Quiet tf2onnx's INFO chatter (unless its logger was configured or DEBUG is on); collect its errors."""
    logger = logging.getLogger("tf2onnx")
    records = _ErrorRecords()
    old_level = logger.level
    if old_level == logging.NOTSET and not log.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _freeze(tf2onnx: Any, sig: LoadedSignature) -> tuple[Any, dict[str, Any]]:
    """The signature's graph with variables folded into constants, plus hash tables' contents."""
    import tensorflow as tf
    from tf2onnx import tf_loader

    try:
        with tf.device("/cpu:0"):
            frozen, tables = tf_loader.from_trackable(
                sig.trackable,
                sig.function,
                [t.graph_name for t in sig.inputs],
                [t.graph_name for t in sig.outputs],
                False,
            )
    except Exception as exc:
        raise ConversionFailed(f"freezing signature '{sig.name}' failed in tf2onnx: {_first_line(exc)}") from exc
    return frozen, tables or {}


def _convert_graph(frozen: Any, tables: dict[str, Any], sig: LoadedSignature, opset: int, errors: _ErrorRecords) -> Any:
    """tf2onnx's graph conversion; returns its (not yet optimized) graph."""
    import tensorflow as tf
    from tf2onnx.tfonnx import process_tf_graph

    renames = {t.graph_name: t.name for t in [*sig.inputs, *sig.outputs]}
    try:
        with tf.device("/cpu:0"), tf.Graph().as_default() as tf_graph:
            tf.import_graph_def(frozen, name="")
            graph = process_tf_graph(
                tf_graph,
                opset=opset,
                input_names=[t.graph_name for t in sig.inputs],
                output_names=[t.graph_name for t in sig.outputs],
                tensors_to_rename=renames,
                initialized_tables=tables,
            )
    except Exception as exc:
        logged = f" (tf2onnx logged: {'; '.join(errors.lines[-5:])})" if errors.lines else ""
        raise ConversionFailed(f"tf2onnx could not convert signature '{sig.name}': {_first_line(exc)}{logged}") from exc
    unsupported = [line for line in errors.lines if "not supported" in line or "Unsupported ops" in line]
    if unsupported:
        raise ConversionFailed(
            f"tf2onnx could not convert signature '{sig.name}' to ONNX opset {opset}: {'; '.join(unsupported[-5:])}"
        )
    return graph


def _optimize(graph: Any, sig: LoadedSignature) -> Any:
    """tf2onnx's ONNX optimizers, then the ModelProto.

    The optimizers run in one pass over the graph; only if one of them fails do they run again, on a
    copy taken before, the way tf2onnx runs them by default (skipping a failing optimizer). That
    default deep-copies the graph before every optimizer: for ResNet-50 here it took 9-16 s and about
    8 GB at peak, against 2-6 s and 5.4 GB for the same bytes out.
    """
    from tf2onnx import optimizer

    try:
        spare = copy.deepcopy(graph)
        try:
            graph = optimizer.optimize_graph(graph, catch_errors=False)
        except Exception as exc:
            log.warning("a tf2onnx optimizer failed (%s); optimizing again, skipping failing optimizers", exc)
            graph = optimizer.optimize_graph(spare, catch_errors=True)
        del spare
        model = graph.make_model(
            f"converted from TensorFlow SavedModel signature '{sig.name}' (tag '{sig.tag}') by dl_inference"
        )
    except Exception as exc:
        raise ConversionFailed(f"tf2onnx could not finish the ONNX model: {_first_line(exc)}") from exc
    return model


def _check_model(model: Any, sig: LoadedSignature) -> bytes:
    """onnx.checker, the graph's names against the signature's keys; the serialized model."""
    import onnx

    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    if sorted(names_in) != sorted(t.name for t in sig.inputs) or sorted(names_out) != sorted(
        t.name for t in sig.outputs
    ):
        raise ConversionFailed(
            f"the ONNX graph's tensors are named inputs {names_in}, outputs {names_out}; the signature's are "
            f"{[t.name for t in sig.inputs]}, {[t.name for t in sig.outputs]}"
        )
    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise ConversionFailed("the ONNX model is larger than 2 GB, which one ONNX protobuf file cannot hold")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ConversionFailed(f"the converted model fails onnx.checker: {_first_line(exc)}") from exc
    return bytes(model.SerializeToString())


def _mismatch_message(report: ParityReport, output: Path, kept: Path) -> str:
    failing = "; ".join(d.describe() for d in report.failures[:4])
    more = f" (and {len(report.failures) - 4} more)" if len(report.failures) > 4 else ""
    return (
        f"parity check failed ({report.settings.describe()}): {failing}{more}. "
        f"{output} was not written; the rejected model is kept as {kept}"
    )


def convert_savedmodel(
    savedmodel: str | Path,
    output: str | Path | None = None,
    options: ConvertOptions | None = None,
    emit: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert one signature of a SavedModel to ONNX at ``output``, check it, and write it atomically.

    ``savedmodel`` may be a repository version directory holding ``model.savedmodel``; ``output``
    then defaults to ``model.onnx`` beside it. ``emit`` receives the progress lines (default: log).
    Raises InvalidArgument (paths, signature, settings), TensorFlowUnavailable, ConversionFailed
    (tf2onnx, onnx.checker, ONNX Runtime) or ParityMismatch (outputs differ beyond tolerance).
    """
    options = options or ConvertOptions()
    source = resolve_savedmodel(Path(savedmodel))
    out = Path(output) if output is not None else default_output(source)
    if out.is_dir():
        raise InvalidArgument(f"output {out} is a directory; give the ONNX file to write, e.g. {out / 'model.onnx'}")
    tf2onnx = import_tf2onnx()
    _validate(options, tf2onnx)
    clock = PhaseClock(emit or log.info, "tf-to-onnx")

    with clock.phase("loading", f"SavedModel {source} (tag '{options.tag}', signature '{options.signature}')"):
        sig = load_signature(source, options.signature, options.tag)
    params = sig.parameter_count
    ins = ", ".join(t.describe() for t in sig.inputs)
    outs = ", ".join(t.describe() for t in sig.outputs)
    clock.line(f"inputs [{ins}]; outputs [{outs}]" + (f"; {params:,} parameters" if params else ""))
    if options.check and (problems := input_problems(sig.inputs)):
        raise InvalidArgument(f"the parity check cannot make random inputs: {'; '.join(problems)} (use --no-check)")

    with _tf2onnx_logging() as errors:
        with clock.phase("freezing", "variables into constants"):
            frozen, tables = _freeze(tf2onnx, sig)
        detail = f"with tf2onnx {tf2onnx.__version__} to opset {options.opset} ({len(frozen.node)} TensorFlow nodes)"
        with clock.phase("converting", detail):
            graph = _convert_graph(frozen, tables, sig, options.opset, errors)
        with clock.phase("optimizing", f"({len(graph.get_nodes())} ONNX nodes)"):
            model = _optimize(graph, sig)

    report: ParityReport | None = None
    if options.check:
        dynamic = any(t.dynamic_batch for t in sig.inputs)
        runs = f"batch sizes {list(options.parity.batch_sizes)}" if dynamic else "the fixed input shapes"
        checks = f"onnx.checker, then parity with TensorFlow on {runs}, {options.parity.describe()}"
    else:
        checks = "onnx.checker (parity check off)"
    with clock.phase("checking", f"({len(model.graph.node)} ONNX nodes): {checks}"):
        data = _check_model(model, sig)
        tmp = write_beside(out, data)
        try:
            if options.check:
                report = check_parity(sig, tmp, options.parity, on_diff=lambda d: _show_diff(clock, d))
                if not report.ok:
                    kept = out.with_name(out.name + REJECTED_SUFFIX)
                    os.replace(tmp, kept)
                    raise ParityMismatch(_mismatch_message(report, out, kept), report, kept)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
    stale = out.with_name(out.name + REJECTED_SUFFIX)
    if stale.exists():  # an earlier failed attempt's leftover no longer applies
        stale.unlink()
    clock.line(f"phases: {clock.summary()}")
    return ConversionResult(
        source=source,
        output=out,
        signature=sig.name,
        inputs=sig.inputs,
        outputs=sig.outputs,
        opset=options.opset,
        nodes=len(model.graph.node),
        size_bytes=len(data),
        seconds=clock.elapsed,
        phases=dict(clock.durations),
        parity=report,
    )


def _show_diff(clock: PhaseClock, diff: OutputDiff) -> None:
    clock.line(f"parity {diff.describe()} -> {'ok' if diff.ok else 'FAILED'}")
