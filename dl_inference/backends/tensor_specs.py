"""Model tensors against the served config: completing a config from a model's own signature, and
checking a batch of inputs against it. Shared by backends whose model files name and type their
tensors (ONNX Runtime, TensorFlow).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from dl_inference.backends.base import parameter_int
from dl_inference.errors import InvalidArgument
from dl_inference.protocol.datatypes import config_to_v2, numpy_dtype, v2_to_config
from dl_inference.protocol.generated import model_config_pb2 as mc

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 8


@dataclass(frozen=True)
class ModelTensor:
    """A tensor as the model file declares it. ``shape`` uses -1 for dynamic dimensions."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def batchable(self) -> bool:
        return len(self.shape) >= 1 and self.shape[0] == -1


@dataclass(frozen=True)
class IOSpec:
    """A tensor as served: ``shape`` is the client-side shape (batch dim -1 first when batching);
    ``model_shape`` is the shape the model sees when the config has a ``reshape``, else None."""

    name: str
    datatype: str
    dtype: np.dtype
    shape: tuple[int, ...]
    model_shape: tuple[int, ...] | None


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def dims_compatible(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(x == -1 or y == -1 or x == y for x, y in zip(a, b, strict=True))


# --- config completion -----------------------------------------------------------------------------


def complete_io(
    config: mc.ModelConfig,
    model_inputs: Mapping[str, ModelTensor],
    model_outputs: Mapping[str, ModelTensor],
    what: str = "model",
) -> None:
    """Fill and check ``config`` (in place): inputs, outputs, datatypes, dims and max_batch_size.

    Config entries must name tensors of the model; missing inputs are added; no outputs means all.
    With ``max_batch_size`` 0 and every tensor's first dimension dynamic, batching is turned on
    (``default_max_batch_size``, default 8) unless the config's dims show the full rank. ``what``
    names the model file's kind in messages ("model", "SavedModel signature 'serving_default'").
    """
    name = config.name
    for kind, entries, model in (("input", config.input, model_inputs), ("output", config.output, model_outputs)):
        seen: set[str] = set()
        for entry in entries:
            if not entry.name:
                raise InvalidArgument(f"model '{name}': an {kind} in the config has no name")
            if entry.name in seen:
                raise InvalidArgument(f"model '{name}': {kind} '{entry.name}' is listed twice in the config")
            seen.add(entry.name)
            if entry.name not in model:
                raise InvalidArgument(
                    f"model '{name}': config {kind} '{entry.name}' is not an {kind} of the {what}; "
                    f"its {kind}s are: {', '.join(model)}"
                )

    exposed_outputs = [model_outputs[o.name] for o in config.output] or list(model_outputs.values())
    batchable = all(t.batchable for t in [*model_inputs.values(), *exposed_outputs])

    if config.max_batch_size < 0:
        raise InvalidArgument(f"model '{name}': max_batch_size must be >= 0, got {config.max_batch_size}")
    if config.max_batch_size == 0 and batchable and _config_hints_batching(config, model_inputs, model_outputs):
        config.max_batch_size = parameter_int(config, "default_max_batch_size", DEFAULT_MAX_BATCH_SIZE, minimum=1)
        logger.info(
            "model '%s': every input and output has a dynamic first dimension; max_batch_size set to %d",
            name,
            config.max_batch_size,
        )
    if config.max_batch_size > 0 and not batchable:
        bad = next(t for t in [*model_inputs.values(), *exposed_outputs] if not t.batchable)
        raise InvalidArgument(
            f"model '{name}': max_batch_size is {config.max_batch_size} but tensor '{bad.name}' "
            f"has shape {shape_str(bad.shape)}; batching needs a dynamic first dimension (-1) "
            "on every input and output"
        )
    batching = config.max_batch_size > 0

    listed = {t.name for t in config.input}
    for tensor in model_inputs.values():
        if tensor.name not in listed:
            if listed:
                logger.info("model '%s': adding input '%s' missing from the config", name, tensor.name)
            config.input.add(name=tensor.name)
    if not config.output:
        for tensor in model_outputs.values():
            config.output.add(name=tensor.name)
    for inp in config.input:
        _complete_tensor(name, "input", inp, model_inputs[inp.name], batching)
    for out in config.output:
        _complete_tensor(name, "output", out, model_outputs[out.name], batching)


def _config_hints_batching(
    config: mc.ModelConfig, model_inputs: Mapping[str, ModelTensor], model_outputs: Mapping[str, ModelTensor]
) -> bool:
    """With max_batch_size 0, dims written in the config tell whether they include the batch:
    a tensor whose dims have the model's full rank means the operator wants no batching."""
    for entry, model in [(i, model_inputs) for i in config.input] + [(o, model_outputs) for o in config.output]:
        if entry.dims or entry.HasField("reshape"):
            rank = len(entry.reshape.shape) if entry.HasField("reshape") else len(entry.dims)
            if rank >= len(model[entry.name].shape):
                return False
    return True


def _complete_tensor(
    model_name: str, kind: str, entry: mc.ModelInput | mc.ModelOutput, tensor: ModelTensor, batching: bool
) -> None:
    if entry.data_type == mc.TYPE_INVALID:
        entry.data_type = mc.DataType.Value(v2_to_config(tensor.datatype))
    else:
        configured = config_to_v2(mc.DataType.Name(entry.data_type))
        if configured != tensor.datatype:
            raise InvalidArgument(
                f"model '{model_name}': {kind} '{entry.name}': config data_type "
                f"{mc.DataType.Name(entry.data_type)} does not match the model's {v2_to_config(tensor.datatype)}"
            )
    model_item_shape = tensor.shape[1:] if batching else tensor.shape
    if not entry.dims and not entry.HasField("reshape"):
        if model_item_shape:
            entry.dims.extend(model_item_shape)
        else:  # per-item scalar of a batching model: Triton spells it dims [1] + reshape []
            entry.dims.append(1)
            entry.reshape.SetInParent()
        return
    if not entry.dims and entry.HasField("reshape"):
        entry.dims.extend(entry.reshape.shape or [1])
    target = list(entry.reshape.shape) if entry.HasField("reshape") else list(entry.dims)
    full = ([-1] if batching else []) + target
    if not dims_compatible(full, tensor.shape):
        described = "reshape" if entry.HasField("reshape") else "dims"
        with_batch = f" (with the batch dimension: {shape_str(full)})" if batching else ""
        raise InvalidArgument(
            f"model '{model_name}': {kind} '{entry.name}': config {described} "
            f"{shape_str(target)}{with_batch} do not match the model's shape {shape_str(tensor.shape)}"
        )


def io_spec(entry: mc.ModelInput | mc.ModelOutput, batching: bool) -> IOSpec:
    datatype = config_to_v2(mc.DataType.Name(entry.data_type))
    batch = (-1,) if batching else ()
    model_shape = batch + tuple(entry.reshape.shape) if entry.HasField("reshape") else None
    return IOSpec(entry.name, datatype, numpy_dtype(datatype), batch + tuple(entry.dims), model_shape)


# --- checking a batch ------------------------------------------------------------------------------


def check_input(model_name: str, spec: IOSpec, array: np.ndarray) -> None:
    """InvalidArgument naming the input when ``array``'s datatype or shape does not fit ``spec``."""
    ok = array.dtype.kind in "OSU" if spec.datatype == "BYTES" else array.dtype == spec.dtype
    if not ok:
        got = "BF16" if array.dtype == ml_dtypes.bfloat16 else str(array.dtype)
        raise InvalidArgument(
            f"model '{model_name}': input '{spec.name}': expected datatype {spec.datatype} "
            f"(numpy {spec.dtype}), got numpy {got}"
        )
    if not dims_compatible(spec.shape, array.shape):
        raise InvalidArgument(
            f"model '{model_name}': input '{spec.name}': expected shape {shape_str(spec.shape)}, "
            f"got {shape_str(array.shape)}"
        )


def reshape(model_name: str, kind: str, name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    target = list(shape)
    if target and target[0] == -1 and array.ndim > 0:
        target[0] = array.shape[0]
    try:
        return array.reshape(target)
    except ValueError as exc:
        raise InvalidArgument(
            f"model '{model_name}': {kind} '{name}' of shape {shape_str(array.shape)} "
            f"cannot be reshaped to {shape_str(shape)}: {exc}"
        ) from None


def model_feed(
    model_name: str, inputs: Mapping[str, np.ndarray], specs: Mapping[str, IOSpec], batching: bool
) -> dict[str, np.ndarray]:
    """The batch's inputs checked against ``specs`` (every input present, known, of the right
    datatype and shape, one batch size) and reshaped to what the model sees."""
    unknown = [n for n in inputs if n not in specs]
    if unknown:
        raise InvalidArgument(f"model '{model_name}': unknown input '{unknown[0]}'; inputs are: {', '.join(specs)}")
    feed: dict[str, np.ndarray] = {}
    batch_size: int | None = None
    for spec in specs.values():
        if spec.name not in inputs:
            raise InvalidArgument(f"model '{model_name}': missing input '{spec.name}'")
        array = np.asarray(inputs[spec.name])
        # The worker's runner applies the config's reshape before the backend; direct callers do not.
        reshaped = spec.model_shape is not None and dims_compatible(spec.model_shape, array.shape)
        check_input(model_name, spec if not reshaped else _with_shape(spec, spec.model_shape), array)
        if batching:
            if batch_size is None:
                batch_size = array.shape[0]
            elif array.shape[0] != batch_size:
                raise InvalidArgument(
                    f"model '{model_name}': input '{spec.name}' has batch size {array.shape[0]}, "
                    f"other inputs have {batch_size}"
                )
        if spec.model_shape is not None and not reshaped:
            array = reshape(model_name, "input", spec.name, array, spec.model_shape)
        feed[spec.name] = array
    return feed


def _with_shape(spec: IOSpec, shape: tuple[int, ...] | None) -> IOSpec:
    return IOSpec(spec.name, spec.datatype, spec.dtype, shape or (), None)


def requested_outputs(model_name: str, output_names: Sequence[str], specs: Mapping[str, IOSpec]) -> list[str]:
    """``output_names`` (all outputs when empty), each checked to be an output of the model."""
    requested = list(output_names) or list(specs)
    for out_name in requested:
        if out_name not in specs:
            raise InvalidArgument(f"model '{model_name}': unknown output '{out_name}'; outputs are: {', '.join(specs)}")
    return requested
