"""handler.py of the ``image_classifier`` example: JPEG/PNG bytes in, top-k labels out.

The model (``1/model.onnx``) takes ``pixels`` FP32 [batch, 3, 32, 32] in [0, 1] and returns
``probabilities`` FP32 [batch, K]. Clients instead send ``image``, the encoded file (BYTES [batch, 1]),
and get ``labels`` (BYTES [batch, top_k]) as ``"<score>:<index>:<label>"`` strings, best first: the
format of Triton's classification extension.

Request parameters: ``top_k`` (default: the config parameter ``top_k``, else 3).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

SIZE = 32
LABELS: list[str] = []


def initialize(context: Any) -> None:
    """Read ``labels.txt`` from the model directory (one label per line, in output order)."""
    text = (context.model_dir / "labels.txt").read_text(encoding="utf-8")
    LABELS[:] = [line.strip() for line in text.splitlines() if line.strip()]


def _top_k(parameters: dict[str, Any]) -> int:
    raw = parameters.get("top_k", 3)
    try:
        k = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"parameter 'top_k' must be an integer, got {raw!r}") from None
    if not 1 <= k <= len(LABELS):
        raise ValueError(f"parameter 'top_k' must be in 1..{len(LABELS)}, got {k}")
    return k


def _decode(data: bytes, row: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # imported here: only this model needs Pillow

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    except UnidentifiedImageError:
        raise ValueError(f"input 'image' row {row}: {len(data)} bytes that are not a JPEG or PNG image") from None
    except OSError as exc:  # recognised but broken, e.g. truncated
        raise ValueError(f"input 'image' row {row}: cannot decode the image: {exc}") from None
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


def preprocess(inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
    _top_k(parameters)  # a bad top_k is the client's error: reject it before running the model
    images = inputs["image"].reshape(-1)
    pixels = np.empty((len(images), 3, SIZE, SIZE), dtype=np.float32)
    for row, data in enumerate(images):
        pixels[row] = _decode(bytes(data), row)
    return {"pixels": pixels}


def postprocess(outputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
    probabilities = outputs["probabilities"]
    k = _top_k(parameters)
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    labels = np.empty(best.shape, dtype=object)
    for row, indices in enumerate(best):
        for col, index in enumerate(indices):
            labels[row, col] = f"{probabilities[row, index]:.6f}:{index}:{LABELS[index]}".encode()
    return {"labels": labels}
