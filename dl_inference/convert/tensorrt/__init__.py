"""ONNX -> TensorRT engine conversion, the engine cache, and the repository conversion step.

* :mod:`.settings` — optimization profile, precision and build settings (plain Python).
* :mod:`.calibration` — INT8 calibration samples from ``.npy`` / ``.npz`` files.
* :mod:`.engine_cache` — ``.plan`` + JSON metadata, compatibility checks, the cache keyed by content.
* :mod:`.progress` — progress lines during long builds.
* :mod:`.builder` — the TensorRT build calls (``tensorrt`` imported lazily).
* :mod:`.pipeline` — the steps the CLI, the repository converter and the backend share.
* :mod:`.repository` — ``dl-inference convert repository``.

Nothing here imports ``tensorrt`` at import time. The TensorRT calls have only run against a fake
``tensorrt`` module in this project's tests; see the README's TensorRT section.
"""
