"""What a TensorRT engine is built with: optimization profile, precision, workspace. No TensorRT here.

Everything in this module is plain Python (plus ``onnx`` to read a model's inputs), so the choices it
makes are unit-tested on machines without TensorRT or a GPU.

**Profile.** TensorRT needs, for every input with a dynamic dimension, the smallest, the optimal and
the largest shape it will see (one optimization profile). For a model that batches
(``max_batch_size`` > 0), the first dimension of every input is the batch: ``min`` 1, ``max``
``max_batch_size``, and ``opt`` ``opt_batch_size``, which defaults to ``max_batch_size``. TensorRT
picks its kernels for ``opt``; with the dynamic batcher in front, busy servers run full batches and
that is where speed matters (an idle server's small batches are fast anyway), so the default tunes
for the full batch. Set ``opt_batch_size`` lower for latency-bound services that mostly see small
batches. Any other dynamic dimension needs an explicit shape (``--shape`` / parameter
``tensorrt_shapes`` / fully specified ``dims`` in the model config), or it is an error naming the
tensor.

**Precision.** ``fp32`` (default), ``fp16`` and ``int8`` set TensorRT 10 builder flags (``int8`` also
sets FP16, so layers without an INT8 kernel run in FP16 rather than FP32, and needs calibration
samples); ``typed`` builds a strongly typed network whose precision is the ONNX model's own. TensorRT
11 removed the precision flags and builds only strongly typed networks, so there only ``fp32`` /
``typed`` are accepted and the precision must be baked into the ONNX beforehand (see
:data:`TRT11_PRECISION_HELP`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dl_inference.errors import InvalidArgument

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "PRECISIONS",
    "TRT11_PRECISION_HELP",
    "BuildSettings",
    "ShapeRange",
    "TensorDesc",
    "compute_profile",
    "onnx_io",
    "parse_shape_specs",
    "resolve_precision",
]

DEFAULT_MAX_BATCH_SIZE = 8
PRECISIONS = ("fp32", "fp16", "int8", "typed")

TRT11_PRECISION_HELP = (
    "TensorRT 11 builds strongly typed networks only (BuilderFlag.FP16 / INT8 and INT8 calibrators were "
    "removed): the precision comes from the ONNX model itself. Convert the model first, then build it "
    "without --fp16/--int8: for FP16, onnxconverter-common "
    "(`float16.convert_float_to_float16(model, keep_io_types=True)`) or ModelOpt AutoCast "
    "(`modelopt.onnx.autocast.convert_to_mixed_precision`); for INT8, a Q/DQ ONNX from ONNX Runtime "
    "(`onnxruntime.quantization.quantize_static(..., quant_format=QuantFormat.QDQ)`) or ModelOpt "
    '(`modelopt.onnx.quantization.quantize(onnx_path, quantize_mode="int8", calibration_data=...)`)'
)

_DIMS = re.compile(r"^\d+(?:x\d+)*$")

# ONNX TensorProto element types -> V2 datatype names (those TensorRT can have at its I/O).
_ONNX_TO_V2 = {
    1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "FP64", 16: "BF16",
    4: "UINT16", 5: "INT16", 12: "UINT32", 13: "UINT64", 8: "BYTES",
}  # fmt: skip


@dataclass(frozen=True)
class TensorDesc:
    """An ONNX graph input or output: V2 datatype name and shape (-1 for a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max shapes of one input in an optimization profile (all dimensions, batch included)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_json(cls, data: Mapping[str, Sequence[int]]) -> ShapeRange:
        return cls(tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))

    def __str__(self) -> str:
        if self.min == self.opt == self.max:
            return _dims(self.min)
        return f"{_dims(self.min)}..{_dims(self.opt)}..{_dims(self.max)}"


def _dims(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class BuildSettings:
    """How to build one engine. ``shapes`` maps input name -> per-item shape range (the batch
    dimension left out when ``max_batch_size`` > 0); ``calibration_dir`` only for ``int8``;
    ``timing_cache`` is where the builder's timing cache is kept (it speeds builds up, it does not
    change what an engine computes, so it is not part of the cache key)."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    opt_batch_size: int | None = None
    precision: str = "fp32"
    workspace_mb: int | None = None
    shapes: Mapping[str, ShapeRange] = field(default_factory=dict)
    calibration_dir: Path | None = None
    calibration_batch_size: int | None = None
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidArgument(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.max_batch_size < 0:
            raise InvalidArgument(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.opt_batch_size is not None:
            if self.max_batch_size == 0:
                raise InvalidArgument("an optimal batch size needs max_batch_size > 0")
            if not 1 <= self.opt_batch_size <= self.max_batch_size:
                raise InvalidArgument(
                    f"optimal batch size {self.opt_batch_size} must be between 1 and max_batch_size "
                    f"{self.max_batch_size}"
                )
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise InvalidArgument(f"workspace must be at least 1 MiB, got {self.workspace_mb}")
        if self.precision == "int8" and self.calibration_dir is None:
            raise InvalidArgument(
                "int8 needs calibration samples (--calibration-dir / parameter calibration_dir: a folder of "
                ".npy/.npz files); or quantize the ONNX model to Q/DQ form and build it with --strongly-typed"
            )
        if self.precision != "int8" and self.calibration_dir is not None:
            raise InvalidArgument(f"a calibration directory is only used with int8, not {self.precision}")

    @property
    def opt_batch(self) -> int:
        """The batch size TensorRT tunes for: ``opt_batch_size``, or ``max_batch_size`` by default."""
        return self.opt_batch_size or self.max_batch_size


def resolve_precision(precision: str, trt_version: str) -> tuple[str, bool]:
    """``(precision label, strongly typed)`` for this TensorRT version; InvalidArgument when the
    precision needs builder flags that this TensorRT no longer has (TensorRT >= 11 and fp16/int8)."""
    major = _major(trt_version)
    if major >= 11:
        if precision in ("fp16", "int8"):
            raise InvalidArgument(
                f"cannot build an {precision} engine with TensorRT {trt_version}: {TRT11_PRECISION_HELP}"
            )
        return "typed", True
    return precision, precision == "typed"


def _major(version: str) -> int:
    try:
        return int(version.split(".", 1)[0])
    except ValueError:
        return 0


# --- shapes ------------------------------------------------------------------------------------


def parse_shape_specs(specs: Sequence[str] | str) -> dict[str, ShapeRange]:
    """``NAME:DIMS`` or ``NAME:MIN:OPT:MAX`` (dims like ``3x224x224``) -> {name: ShapeRange}.

    A string holds several specs separated by ``;``. Names may contain ``:`` (``input:0``): the
    dims are taken from the right. The batch dimension is left out for models that batch.
    """
    items = [s for part in ([specs] if isinstance(specs, str) else specs) for s in part.split(";")]
    result: dict[str, ShapeRange] = {}
    for raw in (s.strip() for s in items):
        if not raw:
            continue
        parts = raw.split(":")
        if len(parts) >= 4 and all(_DIMS.match(p) for p in parts[-3:]):
            name, shapes = ":".join(parts[:-3]), [_parse_dims(p) for p in parts[-3:]]
        elif len(parts) >= 2 and _DIMS.match(parts[-1]):
            name, shapes = ":".join(parts[:-1]), [_parse_dims(parts[-1])] * 3
        else:
            raise InvalidArgument(
                f"shape spec '{raw}' must look like NAME:3x224x224 or NAME:MIN:OPT:MAX (e.g. tokens:1:128:512)"
            )
        rng = ShapeRange(*shapes)
        if not name:
            raise InvalidArgument(f"shape spec '{raw}' has no tensor name")
        if not len(rng.min) == len(rng.opt) == len(rng.max):
            raise InvalidArgument(f"shape spec '{raw}': min, opt and max must have the same rank")
        if not all(a <= b <= c for a, b, c in zip(rng.min, rng.opt, rng.max, strict=True)):
            raise InvalidArgument(f"shape spec '{raw}': need min <= opt <= max in every dimension")
        result[name] = rng
    return result


def _parse_dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


def compute_profile(
    inputs: Sequence[TensorDesc], settings: BuildSettings, model: str = "model"
) -> dict[str, ShapeRange]:
    """The optimization profile: full min/opt/max shapes of every input.

    Raises InvalidArgument naming the tensor for a fixed batch dimension in a batching model, a
    dynamic non-batch dimension without an explicit shape, an explicit shape that contradicts the
    model, or an explicit shape for a tensor that is not an input.
    """
    names = {t.name for t in inputs}
    unknown = sorted(set(settings.shapes) - names)
    if unknown:
        raise InvalidArgument(
            f"model '{model}': shapes were given for '{unknown[0]}', which is not an input; "
            f"inputs are: {', '.join(t.name for t in inputs)}"
        )
    batching = settings.max_batch_size > 0
    profile: dict[str, ShapeRange] = {}
    for t in inputs:
        if batching:
            if not t.shape:
                raise InvalidArgument(
                    f"model '{model}': input '{t.name}' is a scalar, so it has no batch dimension; "
                    "set max_batch_size 0 to build without batching"
                )
            if t.shape[0] != -1:
                raise InvalidArgument(
                    f"model '{model}': input '{t.name}' has a fixed first dimension {t.shape[0]} "
                    f"(shape {_dims(t.shape)}); batching (max_batch_size {settings.max_batch_size}) needs a "
                    "dynamic one: re-export the ONNX with a dynamic batch axis, or set max_batch_size 0"
                )
            item = _item_range(t.name, t.shape[1:], settings.shapes.get(t.name), model, batch=True)
            profile[t.name] = ShapeRange(
                (1, *item.min), (settings.opt_batch, *item.opt), (settings.max_batch_size, *item.max)
            )
        else:
            profile[t.name] = _item_range(t.name, t.shape, settings.shapes.get(t.name), model, batch=False)
    return profile


def _item_range(name: str, dims: tuple[int, ...], given: ShapeRange | None, model: str, batch: bool) -> ShapeRange:
    what = "dimensions after the batch dimension" if batch else "dimensions"
    if given is None:
        dynamic = [i + (1 if batch else 0) for i, d in enumerate(dims) if d < 0]
        if dynamic:
            full = ("batch," if batch else "") + ",".join(str(d) for d in dims)
            example = "x".join("224" if d < 0 else str(d) for d in dims)
            raise InvalidArgument(
                f"model '{model}': input '{name}' has dynamic dimension(s) {dynamic} (shape [{full}]) that "
                f"TensorRT needs a range for: give its {what} with --shape {name}:{example} (or "
                f"{name}:MIN:OPT:MAX), the parameter tensorrt_shapes, or fixed dims in the model config"
            )
        return ShapeRange(dims, dims, dims)
    for label, shape in (("min", given.min), ("opt", given.opt), ("max", given.max)):
        if len(shape) != len(dims):
            raise InvalidArgument(
                f"model '{model}': input '{name}': the given {label} shape {_dims(shape)} has rank {len(shape)}, "
                f"but the model's {what} are {_dims(dims)} (rank {len(dims)})"
            )
        for i, (want, got) in enumerate(zip(dims, shape, strict=True)):
            if want >= 0 and want != got:
                raise InvalidArgument(
                    f"model '{model}': input '{name}': the given {label} shape {_dims(shape)} differs from the "
                    f"model's fixed dimension {i} ({want}); the model's {what} are {_dims(dims)}"
                )
    return given


# --- reading the ONNX model ---------------------------------------------------------------------


def onnx_io(path: Path) -> tuple[list[TensorDesc], list[TensorDesc]]:
    """Inputs (initializers left out) and outputs of an ONNX file, without its external weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidArgument(f"{path} is not a readable ONNX model: {exc}") from exc
    graph = model.graph
    initializers = {i.name for i in graph.initializer}

    def desc(value: Any) -> TensorDesc:
        tensor_type = value.type.tensor_type
        datatype = _ONNX_TO_V2.get(tensor_type.elem_type, f"ONNX type {tensor_type.elem_type}")
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim)
        return TensorDesc(value.name, datatype, shape)

    inputs = [desc(v) for v in graph.input if v.name not in initializers]
    outputs = [desc(v) for v in graph.output]
    return inputs, outputs


def batchable(inputs: Sequence[TensorDesc], outputs: Sequence[TensorDesc]) -> bool:
    """Every input and output has a dynamic first dimension (so the model can take a batch)."""
    return all(t.shape and t.shape[0] == -1 for t in [*inputs, *outputs])
