"""Model warmup: run the config's ``model_warmup`` samples through a freshly loaded backend.

Triton's semantics (``inference.ModelWarmup``): each sample is executed ``count`` times (0 means 1)
before the model instance reports ready. A sample gives every model input as ``data_type`` + ``dims``
(without the batch dimension) and one of:

* ``zero_data``   zeros (``b""`` for ``TYPE_STRING``);
* ``random_data`` floats N(0, 1), integers in ``[0, 10)``, random booleans, short random ASCII
  ``bytes`` for ``TYPE_STRING``;
* ``input_data_file`` raw row-major little-endian bytes of one batch element, read from
  ``<model_dir>/warmup/<file>`` (the ``warmup`` folder beside the version folders); for
  ``TYPE_STRING`` each element is a 4-byte little-endian length followed by its bytes. The path
  must stay inside that folder. The element is repeated ``batch_size`` times.

When ``max_batch_size`` > 0 the inputs get ``batch_size`` (0 means 1) as their first dimension;
``batch_size`` may not exceed ``max_batch_size``, and a model that does not batch accepts only 0 or 1.
Every output of the model is requested. Inputs are built once per sample and reused for its runs.

Any failure raises a :class:`~dl_inference.errors.ServerError` (same code as the cause) whose message
starts with ``warmup '<name>' failed: ``, so the load fails and the model never reports ready.
"""

from __future__ import annotations

import logging
import math
import string
import sys
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Protocol

import numpy as np

from dl_inference.errors import InternalError, InvalidArgument, ServerError
from dl_inference.protocol.datatypes import config_to_v2, numpy_dtype
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.repository.scan import resolve_inside

log = logging.getLogger(__name__)

__all__ = ["WARMUP_DIR", "build_warmup_inputs", "run_warmup"]

#: Folder of a model directory (beside the version folders) holding ``input_data_file`` files.
WARMUP_DIR = "warmup"

_RANDOM_INT_HIGH = 10  # random integers are drawn from [0, _RANDOM_INT_HIGH)
_RANDOM_STRING_MAX = 16  # random strings have 1.._RANDOM_STRING_MAX ASCII characters
_ASCII = np.frombuffer((string.ascii_letters + string.digits).encode(), dtype=np.uint8)


class SupportsInfer(Protocol):
    """A backend, or a model runner (which also runs a model's handler)."""

    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]: ...


def run_warmup(
    backend: SupportsInfer,
    config: mc.ModelConfig,
    version_dir: Path,
    *,
    rng: np.random.Generator | None = None,
) -> float:
    """Run every ``config.model_warmup`` sample ``count`` times (0 means 1) on ``backend``.

    ``config`` is the completed config returned by ``backend.load``; ``version_dir`` is the loaded
    version's folder (its parent holds the ``warmup`` folder). Returns the seconds spent in total.

    Raises:
        ServerError: the first failure, with the cause's code and a message starting with
            ``warmup '<name>' failed: ``.
    """
    if not config.model_warmup:
        return 0.0
    rng = rng if rng is not None else np.random.default_rng()
    model_dir = Path(version_dir).parent
    output_names = [o.name for o in config.output]
    total_start = time.perf_counter()
    for index, sample in enumerate(config.model_warmup):
        label = sample.name or f"#{index}"
        runs = sample.count or 1
        try:
            inputs = build_warmup_inputs(config, sample, model_dir, rng, label=label)
            start = time.perf_counter()
            for _ in range(runs):
                backend.infer(inputs, output_names)
            took = time.perf_counter() - start
        except Exception as exc:
            raise _failed(label, exc) from exc
        shapes = ", ".join(f"{n} {_shape_str(a.shape)}" for n, a in inputs.items())
        log.info(
            "model '%s' warmup '%s': %d run(s) in %.1f ms (%.2f ms/run; %s)",
            config.name,
            label,
            runs,
            took * 1e3,
            took * 1e3 / runs,
            shapes or "no inputs",
        )
    return time.perf_counter() - total_start


def build_warmup_inputs(
    config: mc.ModelConfig,
    sample: mc.ModelWarmup,
    model_dir: Path,
    rng: np.random.Generator | None = None,
    *,
    label: str | None = None,
) -> dict[str, np.ndarray]:
    """The input arrays of one warmup sample, batch dimension included when the model batches.

    Raises:
        InvalidArgument: naming the sample and, where relevant, the input.
    """
    rng = rng if rng is not None else np.random.default_rng()
    label = label or sample.name
    where = f"model '{config.name}' warmup sample '{label}'"
    model_inputs = {t.name: t for t in config.input}

    unknown = sorted(n for n in sample.inputs if n not in model_inputs)
    missing = [t.name for t in config.input if not t.optional and t.name not in sample.inputs]
    if missing:
        hint = f" (it gives input(s) the model does not have: {', '.join(unknown)})" if unknown else ""
        raise InvalidArgument(
            f"{where} has no data for input '{missing[0]}', which the model needs; "
            f"the model's inputs are: {', '.join(model_inputs)}{hint}"
        )
    if unknown:
        raise InvalidArgument(
            f"{where} gives input '{unknown[0]}', which the model does not have; "
            f"the model's inputs are: {', '.join(model_inputs) or 'none'}"
        )

    batch = _batch_size(config, sample, where)
    inputs: dict[str, np.ndarray] = {}
    for name in [t.name for t in config.input if t.name in sample.inputs]:
        spec = sample.inputs[name]
        tensor = f"{where} input '{name}'"
        datatype = _datatype(spec, model_inputs[name], tensor)
        dims = list(spec.dims)
        if any(d < 0 for d in dims):
            raise InvalidArgument(f"{tensor}: dims must be fixed sizes >= 0, got {_shape_str(dims)}")
        kind = spec.WhichOneof("input_data_type")
        if kind == "input_data_file":
            element = _read_file(model_dir, spec.input_data_file, datatype, dims, tensor)
            array = np.broadcast_to(element, [batch, *dims]).copy() if batch is not None else element
        else:
            shape = [batch, *dims] if batch is not None else dims
            if kind == "random_data" and spec.random_data:
                array = _random(datatype, shape, rng)
            elif kind == "zero_data" and spec.zero_data:
                array = _zeros(datatype, shape)
            else:
                raise InvalidArgument(f"{tensor}: set one of zero_data: true, random_data: true or input_data_file")
        inputs[name] = array
    return inputs


# --- helpers -----------------------------------------------------------------------------------


def _failed(label: str, exc: BaseException) -> ServerError:
    """``exc`` as a ServerError of the same class and code, its message prefixed with the sample."""
    if isinstance(exc, ServerError):
        message = f"warmup '{label}' failed: {exc.message}"
        wrapped = exc.__class__.__new__(exc.__class__)
        ServerError.__init__(wrapped, message, exc.code)
        return wrapped
    return InternalError(f"warmup '{label}' failed: {type(exc).__name__}: {exc}")


def _batch_size(config: mc.ModelConfig, sample: mc.ModelWarmup, where: str) -> int | None:
    """The batch dimension to prepend, or None when the model does not batch."""
    size = sample.batch_size or 1
    if config.max_batch_size > 0:
        if size > config.max_batch_size:
            raise InvalidArgument(
                f"{where}: batch_size {size} exceeds the model's max_batch_size {config.max_batch_size}"
            )
        return size
    if size != 1:
        raise InvalidArgument(
            f"{where}: batch_size {size} but the model does not batch (max_batch_size 0); use 1 or leave it out"
        )
    return None


def _datatype(spec: mc.ModelWarmup.Input, model_input: mc.ModelInput, tensor: str) -> str:
    """V2 datatype of a warmup input, checked against the model's input."""
    if spec.data_type == mc.TYPE_INVALID:
        raise InvalidArgument(f"{tensor}: data_type is missing or TYPE_INVALID")
    type_name = mc.DataType.Name(spec.data_type)
    if model_input.data_type not in (mc.TYPE_INVALID, spec.data_type):
        raise InvalidArgument(
            f"{tensor}: data_type {type_name} but the model's input is {mc.DataType.Name(model_input.data_type)}"
        )
    return config_to_v2(type_name)


def _zeros(datatype: str, shape: Sequence[int]) -> np.ndarray:
    if datatype == "BYTES":
        array = np.empty(shape, dtype=object)
        array.fill(b"")
        return array
    return np.zeros(shape, dtype=numpy_dtype(datatype))


def _random(datatype: str, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    dtype = numpy_dtype(datatype)
    if datatype == "BYTES":
        count = math.prod(shape)
        lengths = rng.integers(1, _RANDOM_STRING_MAX + 1, size=count)
        values = [_ASCII[rng.integers(0, len(_ASCII), size=n)].tobytes() for n in lengths]
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if datatype in ("FP16", "FP32", "FP64", "BF16"):
        return rng.standard_normal(size=shape).astype(dtype)
    return rng.integers(0, _RANDOM_INT_HIGH, size=shape).astype(dtype)


def _warmup_file(model_dir: Path, file_name: str, tensor: str) -> Path:
    """``<model_dir>/warmup/<file_name>``, refused unless it is a relative path that stays inside."""
    if not file_name:
        raise InvalidArgument(f"{tensor}: input_data_file is empty")
    if "\0" in file_name:
        raise InvalidArgument(f"{tensor}: input_data_file {file_name!r} contains a NUL character")
    posix, windows = PurePosixPath(file_name), PureWindowsPath(file_name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or file_name.startswith(("/", "\\")):
        raise InvalidArgument(
            f"{tensor}: input_data_file {file_name!r} must be a path relative to the model's "
            f"'{WARMUP_DIR}' folder, not an absolute path"
        )
    if ".." in posix.parts or ".." in windows.parts:
        raise InvalidArgument(
            f"{tensor}: input_data_file {file_name!r} must stay inside the model's '{WARMUP_DIR}' "
            f"folder ('..' is not allowed)"
        )
    warmup_dir = model_dir / WARMUP_DIR
    try:
        path = resolve_inside(warmup_dir, file_name)  # also refuses symlinks leading out
    except InvalidArgument:
        raise InvalidArgument(
            f"{tensor}: input_data_file {file_name!r} leads outside the model's '{WARMUP_DIR}' folder"
        ) from None
    if not path.is_file():
        raise InvalidArgument(f"{tensor}: input_data_file {file_name!r} is not a file in {warmup_dir}")
    return path


def _read_file(model_dir: Path, file_name: str, datatype: str, dims: list[int], tensor: str) -> np.ndarray:
    """One batch element of shape ``dims`` from a raw little-endian file."""
    path = _warmup_file(model_dir, file_name, tensor)
    count = math.prod(dims)
    try:
        if datatype == "BYTES":
            data = path.read_bytes()
            return _parse_strings(data, count, tensor, file_name).reshape(dims)
        itemsize = numpy_dtype(datatype).itemsize
        needed = count * itemsize
        with open(path, "rb") as f:
            data = f.read(needed)
            extra = bool(f.read(1))
    except OSError as exc:
        raise InvalidArgument(f"{tensor}: cannot read input_data_file {file_name!r}: {exc}") from None
    if len(data) < needed:
        raise InvalidArgument(
            f"{tensor}: input_data_file {file_name!r} has {len(data)} bytes, but {datatype} "
            f"{_shape_str(dims)} needs {needed}"
        )
    if extra:
        log.warning("%s: input_data_file %r is longer than the %d bytes used", tensor, file_name, needed)
    raw = np.frombuffer(data, dtype=np.dtype(f"<u{itemsize}"))
    if sys.byteorder != "little":
        raw = raw.astype(np.dtype(f"=u{itemsize}"))
    return raw.view(numpy_dtype(datatype)).reshape(dims).copy()


def _parse_strings(data: bytes, count: int, tensor: str, file_name: str) -> np.ndarray:
    """``count`` elements of Triton's serialized BYTES format: <uint32 LE length><bytes>, repeated."""
    values: list[bytes] = []
    offset = 0
    while len(values) < count:
        if offset + 4 > len(data):
            raise InvalidArgument(
                f"{tensor}: input_data_file {file_name!r} holds {len(values)} string element(s), "
                f"but {count} are needed (each a 4-byte little-endian length, then the bytes)"
            )
        length = int.from_bytes(data[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(data):
            raise InvalidArgument(
                f"{tensor}: input_data_file {file_name!r}: string element {len(values)} claims "
                f"{length} bytes but only {len(data) - offset} remain"
            )
        values.append(bytes(data[offset : offset + length]))
        offset += length
    array = np.empty(count, dtype=object)
    array[:] = values
    return array


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"
