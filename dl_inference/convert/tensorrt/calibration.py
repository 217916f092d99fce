"""INT8 calibration samples: a folder of ``.npy`` / ``.npz`` files, read in fixed-size batches.

* ``<any name>.npz``: one array per model input, keyed by the input's name.
* ``<any name>.npy``: one array, for a model with a single input.

Files are read in name order. For a model that batches, an array is either one sample (the input's
shape without the batch dimension) or several along a first dimension; rows from all files are cut
into batches of ``batch_size`` rows (a short last batch is dropped: TensorRT calibrates on one fixed
shape). For a model that does not batch, every file is one calibration run with the profile's shape.
Arrays of another float width are cast (``float64`` samples for an FP32 input); any other datatype
mismatch is an error naming the file and the tensor. Plain numpy: tested without TensorRT.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from dl_inference.convert.filecache import sha256_file
from dl_inference.convert.tensorrt.settings import ShapeRange, TensorDesc
from dl_inference.errors import InvalidArgument
from dl_inference.protocol.datatypes import numpy_dtype

log = logging.getLogger(__name__)

__all__ = ["calibration_digest", "calibration_files", "iter_calibration_batches"]


def calibration_files(directory: Path) -> list[Path]:
    """The ``.npy`` / ``.npz`` files of ``directory`` in name order; InvalidArgument if none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidArgument(f"calibration directory {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix in (".npy", ".npz") and p.is_file())
    if not files:
        raise InvalidArgument(f"calibration directory {directory} holds no .npy or .npz files")
    return files


def calibration_digest(directory: Path, batch_size: int) -> str:
    """A hash of the calibration files' names and contents and the batch size (for cache keys)."""
    h = hashlib.sha256(f"calibration batch {batch_size}\n".encode())
    for path in calibration_files(directory):
        h.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _arrays(path: Path, inputs: Sequence[TensorDesc]) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InvalidArgument(f"calibration file {path.name} cannot be read: {exc}") from exc
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise InvalidArgument(
                f"calibration file {path.name} holds one array but the model has inputs "
                f"{', '.join(t.name for t in inputs)}: use .npz files with one array per input name"
            )
        return {inputs[0].name: loaded}
    with loaded:
        missing = [t.name for t in inputs if t.name not in loaded.files]
        if missing:
            raise InvalidArgument(
                f"calibration file {path.name} has no array for input '{missing[0]}' "
                f"(it holds {', '.join(loaded.files) or 'nothing'})"
            )
        return {t.name: loaded[t.name] for t in inputs}


def _conform(path: Path, tensor: TensorDesc, array: np.ndarray, item: tuple[int, ...], batching: bool) -> np.ndarray:
    want = numpy_dtype(tensor.datatype)
    if array.dtype != want:
        if array.dtype.kind == want.kind == "f":
            array = array.astype(want)
        else:
            raise InvalidArgument(
                f"calibration file {path.name}: input '{tensor.name}' is {array.dtype}, the model takes "
                f"{tensor.datatype} (numpy {want})"
            )
    if batching and array.shape == item:
        array = array[np.newaxis]
    got = array.shape[1:] if batching else array.shape
    if got != item:
        expected = f"[n,{','.join(map(str, item))}] or [{','.join(map(str, item))}]" if batching else str(list(item))
        raise InvalidArgument(
            f"calibration file {path.name}: input '{tensor.name}' has shape {list(array.shape)}, "
            f"calibration needs {expected} (the profile's optimal shape)"
        )
    return np.ascontiguousarray(array)


def iter_calibration_batches(
    directory: Path,
    inputs: Sequence[TensorDesc],
    profile: Mapping[str, ShapeRange],
    batch_size: int,
    batching: bool,
) -> Iterator[dict[str, np.ndarray]]:
    """Calibration batches: {input name: array}, each with ``batch_size`` rows when ``batching``.

    Raises InvalidArgument (naming the file and tensor) for unreadable or mismatching files, and
    when the files hold fewer rows than one batch.
    """
    files = calibration_files(directory)
    items = {t.name: profile[t.name].opt[1:] if batching else profile[t.name].opt for t in inputs}
    pending: dict[str, list[np.ndarray]] = {t.name: [] for t in inputs}
    rows = 0
    produced = 0
    for path in files:
        arrays = _arrays(path, inputs)
        conformed = {t.name: _conform(path, t, arrays[t.name], items[t.name], batching) for t in inputs}
        if not batching:
            produced += 1
            yield conformed
            continue
        counts = {name: a.shape[0] for name, a in conformed.items()}
        if len(set(counts.values())) > 1:
            raise InvalidArgument(f"calibration file {path.name}: inputs have different row counts {counts}")
        for name, array in conformed.items():
            pending[name].append(array)
        rows += next(iter(counts.values()))
        while rows >= batch_size:
            batch: dict[str, np.ndarray] = {}
            for name, parts in pending.items():
                joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
                batch[name], rest = joined[:batch_size], joined[batch_size:]
                pending[name] = [rest] if len(rest) else []
            rows -= batch_size
            produced += 1
            yield batch
    if produced == 0:
        raise InvalidArgument(
            f"calibration directory {directory} holds {rows} sample row(s), fewer than one calibration batch "
            f"of {batch_size}; add samples or lower calibration_batch_size"
        )
    if rows:
        log.info("calibration: the last %d row(s) do not fill a batch of %d and are left out", rows, batch_size)
