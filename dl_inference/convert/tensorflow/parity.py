"""Output parity of a converted model: the SavedModel signature run in TensorFlow and the ONNX file
run in ONNX Runtime, on the same seeded random inputs, compared output by output.

Inputs: floats from N(0, 1); integers uniform in ``[0, int_high)`` (default 10, small enough to index
an embedding; 256 for uint8, usually an image); bools at random. A dynamic first (batch) dimension
takes each of ``batch_sizes`` in turn; other unknown dimensions take ``dim_size``. A float element
passes when ``|onnx - tf| <= atol + rtol * |tf|`` (NaN matches NaN); integer and bool outputs must be
equal. The reported relative difference is ``|onnx - tf| / |tf|`` over the elements with
``|tf| > atol`` (smaller ones are judged by ``atol`` alone).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dl_inference.convert.tensorflow.errors import ConversionFailed
from dl_inference.convert.tensorflow.savedmodel import LoadedSignature, TensorInfo
from dl_inference.errors import InvalidArgument

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "OutputDiff",
    "ParityReport",
    "ParitySettings",
    "check_parity",
    "compare_output",
    "input_problems",
    "random_inputs",
]

DEFAULT_RTOL = 1e-3  # float32 through a reordered graph (fused convolutions, other GEMM kernels)
DEFAULT_ATOL = 1e-5
DEFAULT_BATCH_SIZES = (1, 3)
DEFAULT_DIM_SIZE = 16
DEFAULT_INT_HIGH = 10


@dataclass(frozen=True)
class ParitySettings:
    """Tolerances and how the random inputs are made."""

    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    seed: int = 0
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    dim_size: int = DEFAULT_DIM_SIZE
    int_high: int | None = None  # None: 10, or 256 for uint8

    def describe(self) -> str:
        return f"rtol {self.rtol:g}, atol {self.atol:g}, seed {self.seed}"


@dataclass
class OutputDiff:
    """One output compared on one run (``batch`` None: the model has no dynamic batch dimension)."""

    output: str
    batch: int | None
    max_abs: float
    max_rel: float
    ok: bool
    detail: str = ""  # the worst element, or why the output cannot be compared

    def describe(self) -> str:
        where = "" if self.batch is None else f" (batch {self.batch})"
        text = f"output '{self.output}'{where}: max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g}"
        return f"{text}; {self.detail}" if self.detail else text


@dataclass
class ParityReport:
    """Every output on every run."""

    settings: ParitySettings
    diffs: list[OutputDiff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.diffs)

    @property
    def failures(self) -> list[OutputDiff]:
        return [d for d in self.diffs if not d.ok]

    @property
    def batches(self) -> list[int | None]:
        return list(dict.fromkeys(d.batch for d in self.diffs))

    def per_output(self) -> dict[str, tuple[float, float, bool]]:
        """Output name -> (max abs diff, max rel diff, all runs passed), over all runs."""
        merged: dict[str, tuple[float, float, bool]] = {}
        for d in self.diffs:
            a, r, ok = merged.get(d.output, (0.0, 0.0, True))
            merged[d.output] = (max(a, d.max_abs), max(r, d.max_rel), ok and d.ok)
        return merged


def input_problems(inputs: Sequence[TensorInfo]) -> list[str]:
    """Why random inputs cannot be made for these tensors (empty: they can)."""
    problems = []
    for t in inputs:
        if t.dtype == np.dtype(object):
            problems.append(f"input '{t.name}' is a string tensor")
        elif t.shape is None:
            problems.append(f"input '{t.name}' has an unknown rank")
    return problems


def _shape(t: TensorInfo, batch: int | None, dim_size: int) -> tuple[int, ...]:
    assert t.shape is not None
    dims = []
    for i, d in enumerate(t.shape):
        if d is None:
            d = batch if i == 0 and batch is not None else dim_size
        dims.append(d)
    return tuple(dims)


def random_inputs(
    inputs: Sequence[TensorInfo], batch: int | None, rng: np.random.Generator, settings: ParitySettings
) -> dict[str, np.ndarray]:
    """One random array per input (see the module docstring for the distributions)."""
    feeds = {}
    for t in inputs:
        shape = _shape(t, batch, settings.dim_size)
        kind = t.dtype.kind
        if kind == "b":
            value = rng.integers(0, 2, size=shape).astype(bool)
        elif kind in "iu":
            high = settings.int_high or (256 if t.dtype == np.uint8 else DEFAULT_INT_HIGH)
            high = min(high, int(np.iinfo(t.dtype).max) + 1)
            value = rng.integers(0, high, size=shape).astype(t.dtype)
        elif kind == "c":
            value = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(t.dtype)
        else:  # floats, including ml_dtypes' bfloat16
            value = rng.standard_normal(shape).astype(np.float32).astype(t.dtype)
        feeds[t.name] = value
    return feeds


def compare_output(
    name: str, expected: np.ndarray, actual: np.ndarray, batch: int | None, rtol: float, atol: float
) -> OutputDiff:
    """Compare one output: ``expected`` from TensorFlow, ``actual`` from ONNX Runtime."""
    if expected.shape != actual.shape:
        return OutputDiff(name, batch, np.inf, np.inf, False, f"shape {actual.shape} in ONNX, {expected.shape} in TF")
    if expected.size == 0:
        return OutputDiff(name, batch, 0.0, 0.0, True)
    if expected.dtype.kind in "biuUSO":  # integers, bools, strings: exactly equal or not
        equal = expected == actual
        if equal.all():
            return OutputDiff(name, batch, 0.0, 0.0, True)
        idx = tuple(int(i) for i in np.argwhere(~equal)[0])
        numeric = expected.dtype.kind in "biu"
        max_abs = float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64)))) if numeric else np.inf
        count = int((~equal).sum())
        detail = f"{count} element(s) differ, first at index {idx}: tf {expected[idx]!r}, onnx {actual[idx]!r}"
        return OutputDiff(name, batch, max_abs, np.inf, False, detail)
    exp = expected.astype(np.float64)
    act = actual.astype(np.float64)
    both_nan = np.isnan(exp) & np.isnan(act)
    diff = np.where(both_nan, 0.0, np.abs(act - exp))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only
    magnitude = np.abs(np.where(both_nan, 0.0, exp))
    allowed = atol + rtol * magnitude
    excess = diff - allowed
    big = magnitude > atol
    max_rel = float(np.max(diff[big] / magnitude[big])) if big.any() else 0.0
    ok = bool(np.all(excess <= 0))
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
    idx = tuple(int(i) for i in worst)
    detail = "" if ok else (
        f"worst at index {idx}: tf {float(exp[worst]):.6g}, onnx {float(act[worst]):.6g} "
        f"(allowed |diff| <= atol {atol:g} + rtol {rtol:g} * |tf| = {float(allowed[worst]):.3g})"
    )  # fmt: skip
    return OutputDiff(name, batch, float(np.max(diff)), max_rel, ok, detail)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def check_parity(
    signature: LoadedSignature,
    onnx_path: Path,
    settings: ParitySettings,
    on_diff: Callable[[OutputDiff], None] | None = None,
) -> ParityReport:
    """Run ``signature`` in TensorFlow and ``onnx_path`` in ONNX Runtime on the same random inputs for
    each batch size, compare every output, return the report (``on_diff`` sees each comparison).

    Raises InvalidArgument when TensorFlow cannot run on the random inputs, ConversionFailed when
    ONNX Runtime cannot load or run the model."""
    import onnxruntime as ort

    problems = input_problems(signature.inputs)
    if problems:
        raise InvalidArgument(f"the parity check cannot make random inputs: {'; '.join(problems)} (use --no-check)")
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConversionFailed(f"ONNX Runtime cannot load the converted model: {_first_line(exc)}") from exc
    onnx_outputs = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(settings.seed)
    dynamic = any(t.dynamic_batch for t in signature.inputs)
    report = ParityReport(settings)
    for batch in settings.batch_sizes if dynamic else (None,):
        feeds = random_inputs(signature.inputs, batch, rng, settings)
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
        try:
            expected = signature(feeds)
        except Exception as exc:
            raise InvalidArgument(
                f"TensorFlow could not run signature '{signature.name}' on random inputs ({shapes}): "
                f"{_first_line(exc)}. Integer inputs are drawn from [0, --int-high), unknown non-batch "
                "dimensions are --dim-size; adjust those, or skip the check with --no-check"
            ) from exc
        try:
            got = dict(zip(onnx_outputs, session.run(None, feeds)))
        except Exception as exc:
            raise ConversionFailed(
                f"ONNX Runtime could not run the converted model on inputs TensorFlow accepts ({shapes}): "
                f"{_first_line(exc)}"
            ) from exc
        for out in signature.outputs:
            if out.name not in got:
                diff = OutputDiff(out.name, batch, np.inf, np.inf, False, "missing from the ONNX model's outputs")
            else:
                diff = compare_output(
                    out.name, expected[out.name], np.asarray(got[out.name]), batch, settings.rtol, settings.atol
                )
            report.diffs.append(diff)
            if on_diff is not None:
                on_diff(diff)
    return report
