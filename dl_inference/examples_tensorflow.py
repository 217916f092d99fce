"""Example TensorFlow SavedModels for the repository (``dl-inference make-examples`` writes them when
TensorFlow is installed). Their answers are exact and easy to check by hand:

* ``tf_linear``: ``y = x @ W + b`` for ``x`` FP32 [-1, 4], with the fixed ``W`` and ``b`` below; batching.
* ``tf_text``: BYTES in, two outputs: ``length`` (INT32, UTF-8 byte count) and ``upper`` (the text in
  upper case), batching — a string model, which ONNX examples cannot show.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

LINEAR_W = np.array([[1, 0], [0, 1], [1, 1], [-1, 2]], dtype=np.float32)
LINEAR_B = np.array([0.5, -0.5], dtype=np.float32)


def _export(module: object, signature: object, path: Path) -> None:
    import tensorflow as tf

    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(module, str(path), signatures={"serving_default": signature})


def _linear(root: Path) -> None:
    import tensorflow as tf

    class Linear(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(LINEAR_W)
            self.b = tf.Variable(LINEAR_B)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": tf.matmul(x, self.w) + self.b}

    module = Linear()
    _export(module, module.serve, root / "tf_linear" / "1" / "model.savedmodel")
    (root / "tf_linear" / "config.pbtxt").write_text(
        'backend: "tensorflow"\nmax_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 500 }\n'
    )


def _text(root: Path) -> None:
    import tensorflow as tf

    class Text(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def serve(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"length": tf.strings.length(text, unit="BYTE"), "upper": tf.strings.upper(text, encoding="utf-8")}

    module = Text()
    _export(module, module.serve, root / "tf_text" / "1" / "model.savedmodel")
    # The signature's tensors are rank 1 ([None]); Triton spells a batched scalar as dims [1] + reshape [].
    (root / "tf_text" / "config.pbtxt").write_text('backend: "tensorflow"\nmax_batch_size: 8\n')


def tensorflow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def make_tensorflow_examples(root: Path) -> list[str]:
    """Write the TensorFlow example models under ``root``; return their names."""
    root = Path(root)
    _linear(root)
    _text(root)
    names = ["tf_linear", "tf_text"]
    for name in names:
        logger.info("example model '%s' written to %s", name, root / name)
    return names
