"""A TensorFlow SavedModel's signature: where the SavedModel is, its tensors, and a callable for it.

TensorFlow and tf2onnx are imported lazily (:func:`import_tensorflow`, :func:`import_tf2onnx`), so a
missing install is one clear error naming the pip install, raised before any work starts.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dl_inference.convert.tensorflow.errors import TensorFlowUnavailable
from dl_inference.errors import InvalidArgument

__all__ = [
    "INSTALL_HINT",
    "LoadedSignature",
    "TensorInfo",
    "default_output",
    "import_tensorflow",
    "import_tf2onnx",
    "load_signature",
    "resolve_savedmodel",
]

INSTALL_HINT = "pip install 'dl_inference[tensorflow]' (that is: pip install 'tensorflow-cpu>=2.16' 'tf2onnx>=1.17')"
_SAVEDMODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
_REPOSITORY_NAME = "model.savedmodel"  # the SavedModel's name inside a repository version directory
_FILE_HINTS = {
    ".keras": "a Keras model file: export a SavedModel first with model.export(DIR) (Keras 3)",
    ".h5": "a Keras HDF5 file: load it in Keras and export a SavedModel with model.export(DIR)",
    ".pb": "a single .pb file; a SavedModel is the directory holding saved_model.pb and variables/",
    ".onnx": "already an ONNX model",
}


def import_tensorflow() -> Any:
    """The ``tensorflow`` module, or :class:`TensorFlowUnavailable` naming the pip install.

    TensorFlow's C++ INFO/WARNING chatter is silenced (``TF_CPP_MIN_LOG_LEVEL=2``) unless the caller
    has set that variable before TensorFlow was first imported.
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return importlib.import_module("tensorflow")
    except ImportError as exc:
        raise TensorFlowUnavailable(f"TensorFlow is not installed in this environment ({exc}); {INSTALL_HINT}") from exc


def import_tf2onnx() -> Any:
    """The ``tf2onnx`` module (after TensorFlow), or :class:`TensorFlowUnavailable`."""
    import_tensorflow()
    try:
        return importlib.import_module("tf2onnx")
    except ImportError as exc:
        raise TensorFlowUnavailable(f"tf2onnx is not installed in this environment ({exc}); {INSTALL_HINT}") from exc


def resolve_savedmodel(path: Path) -> Path:
    """The SavedModel directory ``path`` names: itself, or ``path/model.savedmodel`` for a repository
    version directory. Raises InvalidArgument saying what ``path`` is instead."""
    if not path.exists():
        raise InvalidArgument(f"{path} does not exist (expected a TensorFlow SavedModel directory)")
    if path.is_dir() and (path / _REPOSITORY_NAME).is_dir():
        path = path / _REPOSITORY_NAME
    if not path.is_dir():
        hint = _FILE_HINTS.get(path.suffix.lower(), "a file")
        raise InvalidArgument(f"{path} is not a TensorFlow SavedModel directory: it is {hint}")
    if not any((path / name).is_file() for name in _SAVEDMODEL_FILES):
        raise InvalidArgument(
            f"{path} is not a TensorFlow SavedModel: it holds no saved_model.pb "
            "(export one with tf.saved_model.save(obj, DIR) or Keras 3's model.export(DIR))"
        )
    return path


def default_output(savedmodel: Path) -> Path:
    """``<dir>/model.onnx`` for ``<dir>/model.savedmodel`` (any ``X.savedmodel`` gives ``X.onnx``)."""
    if savedmodel.suffix != ".savedmodel":
        raise InvalidArgument(
            f"give the ONNX file to write: {savedmodel.name} is not named like a repository's "
            "'model.savedmodel', so there is no default output beside it"
        )
    return savedmodel.with_suffix(".onnx")


@dataclass(frozen=True)
class TensorInfo:
    """One signature input or output: its signature key, the tensor inside the signature's graph,
    its NumPy dtype and its shape (``None`` for unknown dimensions; ``shape`` None: unknown rank)."""

    name: str
    graph_name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{self.name}: {self.dtype.name} {dims}"

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.shape) and self.shape is not None and self.shape[0] is None


@dataclass
class LoadedSignature:
    """A signature of a loaded SavedModel. Inputs and outputs are in signature-key order, which is
    also the order of the signature function's tensors."""

    name: str
    tag: str
    path: Path
    function: Any  # the tf.types.experimental.ConcreteFunction
    trackable: Any  # the object tf.saved_model.load returned (keeps the variables alive)
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the signature in TensorFlow on NumPy arrays keyed by input name."""
        tf = import_tensorflow()
        args = {t.name: tf.constant(feeds[t.name], dtype=tf.as_dtype(t.dtype)) for t in self.inputs}
        result = self.function(**args)
        return {name: np.asarray(value.numpy()) for name, value in result.items()}

    @property
    def parameter_count(self) -> int:
        """Number of values in the signature's variables (0 when TensorFlow does not say)."""
        variables = getattr(self.function, "variables", None) or ()
        return sum(int(np.prod(v.shape)) for v in variables if v.shape.is_fully_defined())


def _numpy_dtype(tf_dtype: Any) -> np.dtype[Any]:
    if tf_dtype.name == "string":
        return np.dtype(object)
    return np.dtype(tf_dtype.as_numpy_dtype)


def _shape(spec_shape: Any) -> tuple[int | None, ...] | None:
    if spec_shape.rank is None:
        return None
    return tuple(spec_shape.as_list())


def load_signature(path: Path, signature: str, tag: str) -> LoadedSignature:
    """Load SavedModel ``path`` with ``tag`` and return its signature ``signature``.

    Raises InvalidArgument when the SavedModel does not load with that tag or has no such signature
    (the message lists the signatures it has)."""
    tf = import_tensorflow()
    try:
        imported = tf.saved_model.load(str(path), tags=[tag])
    except Exception as exc:  # TensorFlow raises RuntimeError / OSError / its own errors here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgument(f"could not load SavedModel {path} with tag '{tag}': {first}") from exc
    available = sorted(k for k in imported.signatures.keys() if not k.startswith("_"))
    if signature not in imported.signatures:
        listed = ", ".join(available) if available else "none (it was saved without signatures)"
        raise InvalidArgument(f"SavedModel {path} has no signature '{signature}'; its signatures: {listed}")
    fn = imported.signatures[signature]
    args, kwargs = fn.structured_input_signature
    specs = tf.nest.flatten((args, kwargs))  # dict keys sorted, the order of fn.inputs
    if args:  # signatures take keyword arguments only; a positional one is named as TensorFlow names it
        keys = [s.name or t.name.split(":")[0] for s, t in zip(specs, fn.inputs)]
    else:
        keys = sorted(kwargs)
    inputs = [
        TensorInfo(key, tensor.name, _numpy_dtype(spec.dtype), _shape(spec.shape))
        for key, spec, tensor in zip(keys, specs, fn.inputs[: len(specs)])
    ]
    out_struct = fn.structured_outputs
    if isinstance(out_struct, Mapping):
        out_keys = sorted(out_struct)
        out_specs = [out_struct[k] for k in out_keys]
    else:
        out_specs = tf.nest.flatten(out_struct)
        out_keys = [t.name.split(":")[0] for t in fn.outputs]
    outputs = [
        TensorInfo(key, tensor.name, _numpy_dtype(tensor.dtype), _shape(getattr(spec, "shape", tensor.shape)))
        for key, spec, tensor in zip(out_keys, out_specs, fn.outputs)
    ]
    return LoadedSignature(signature, tag, path, fn, imported, inputs, outputs)
