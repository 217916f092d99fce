"""TensorFlow SavedModel -> ONNX (``dl-inference convert tf-to-onnx``), through tf2onnx.

* :mod:`.savedmodel` — finding a SavedModel, importing TensorFlow / tf2onnx lazily, one signature's
  tensors and a callable for it.
* :mod:`.to_onnx` — the conversion: load, freeze, convert, optimize, check, atomic write.
* :mod:`.parity` — random inputs through TensorFlow and ONNX Runtime, compared output by output.
* :mod:`.progress` — phase lines with elapsed time, and a heartbeat during long phases.
* :mod:`.command` — the command's flags and its run (what ``cli.py`` wires in).

Nothing here imports TensorFlow or tf2onnx at import time; they come with
``pip install 'dl_inference[tensorflow]'``.
"""
