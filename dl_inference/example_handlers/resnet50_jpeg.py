"""handler.py of the ``resnet50_jpeg`` example: JPEG bytes in, top-k classes out, decoded on the GPU.

The model behind it is a PyTorch image classifier (``load_tests/bench_pytorch_gpu.py --models
resnet50_jpeg`` writes a ResNet-50 as ``1/model.py`` + ``1/model.safetensors``) taking FP32
[batch, 3, S, S] ImageNet-normalized RGB and returning logits [batch, C]. Clients send ``image``
(BYTES [batch, 1], one JPEG file per row) and get the ``k`` best classes, best first, as

* ``labels``  BYTES [batch, k]: ``"<score>:<index>:<label>"`` (Triton's classification format);
* ``indices`` INT64 [batch, k] and ``scores`` FP32 [batch, k] (softmax probabilities),

so a client asks for the strings or for the numbers (``outputs=[...]``). Labels come from
``labels.txt`` in the model directory (one per line, in output order) when there is one, else
``class_<index>``.

Decoding, by the config parameter ``decode`` (auto | gpu | cpu; default auto):

* ``gpu``: the batch's rows are decoded together by nvJPEG (``torchvision.io.decode_jpeg(list,
  device="cuda")``), resized to S x S (bilinear, antialiased, rounded to 8 bits as Pillow does) and
  normalized on the instance's GPU; the CUDA tensor goes to the PyTorch backend as it is (no host
  round trip). A row nvJPEG refuses (a CMYK JPEG, say) is decoded by Pillow instead.
* ``cpu``: Pillow decodes and resizes each row (in a thread pool: Pillow releases the GIL while it
  decodes), numpy normalizes. No torch or torchvision needed.
* ``auto``: gpu on a KIND_GPU instance whose Python has torchvision and sees CUDA, else cpu; the
  choice and why are logged at load.

Both give the same pixels within JPEG decoders' differences (nvJPEG vs libjpeg-turbo: a mean of
under 2 levels out of 255; ``scripts/gpu_check_jpeg.py`` measures it).

Other parameters (config; ``top_k`` may also come with a request): ``top_k`` (default 5, 1..100,
capped at C), ``image_size`` S (default 224), ``decode_threads`` (CPU decoding, default min(8, CPUs)).
A row that is not a JPEG, or one no decoder can read, is the client's error naming the row.
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics of RGB in [0, 1]
STD = (0.229, 0.224, 0.225)
JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker + the first segment's marker prefix
MAX_TOP_K = 100
DECODE_MODES = ("auto", "gpu", "cpu")


@dataclass
class _State:
    size: int = 224
    top_k: int = 5
    labels: list[str] | None = None
    device: Any = None  # torch.device of the GPU decoding, None when decoding on the CPU
    pool: ThreadPoolExecutor | None = None


STATE = _State()


# -- loading ------------------------------------------------------------------------------------


def gpu_decode_unavailable(device: str) -> str | None:
    """Why GPU decoding cannot run for an instance on ``device`` ("gpu"/"cpu"), or None when it can."""
    if device != "gpu":
        return "the instance is KIND_CPU"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:  # not installed, or built for another torch (fails at import)
        return f"torchvision cannot be imported ({type(exc).__name__}: {exc})"
    return None


def initialize(context: Any) -> None:
    params = context.parameters
    STATE.size = _int_param(params, "image_size", 224, 16, 4096)
    STATE.top_k = _int_param(params, "top_k", 5, 1, MAX_TOP_K)
    labels = context.model_dir / "labels.txt"
    if labels.is_file():
        STATE.labels = [line.strip() for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    mode = params.get("decode", "auto").strip().lower()
    if mode not in DECODE_MODES:
        raise ValueError(f"parameter 'decode' must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    why_not = gpu_decode_unavailable(context.device) if mode != "cpu" else "the config asks for decode cpu"
    if mode == "gpu" and why_not:
        raise RuntimeError(f"parameter 'decode' is gpu but {why_not}")
    if why_not is None:
        import torch

        STATE.device = torch.device("cuda", context.device_id or 0)
        how = f"nvJPEG on {STATE.device}"
    else:
        threads = _int_param(params, "decode_threads", min(8, os.cpu_count() or 1), 1, 256)
        STATE.pool = ThreadPoolExecutor(threads, thread_name_prefix="jpeg-decode") if threads > 1 else None
        how = f"Pillow on the CPU, {threads} thread(s) ({why_not})"
    log.info("model '%s': JPEG decoding with %s, %dx%d", context.model_name, how, STATE.size, STATE.size)


def _int_param(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    raw = params.get(key, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"parameter '{key}' must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"parameter '{key}' must be in {low}..{high}, got {value}")
    return value


# -- CPU: Pillow + numpy ------------------------------------------------------------------------


def check_jpeg(data: bytes, row: int) -> None:
    if not data.startswith(JPEG_MAGIC):
        raise ValueError(f"input 'image' row {row}: {len(data)} bytes that are not a JPEG image")


def decode_cpu(data: bytes, row: int, size: int) -> np.ndarray:
    """One JPEG -> uint8 [size, size, 3] RGB (Pillow: libjpeg-turbo, bilinear antialiased resize)."""
    from PIL import Image  # imported here: only this model needs Pillow

    check_jpeg(data, row)
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except Exception as exc:  # unreadable header, truncated data...
        raise ValueError(f"input 'image' row {row}: cannot decode the JPEG: {exc}") from None


def _lookup_table() -> np.ndarray:
    """FP32 [3, 256]: the normalized value of each 8-bit level, per channel."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    return ((levels[None, :] - np.asarray(MEAN)[:, None]) / np.asarray(STD)[:, None]).astype(np.float32)


_LUT = _lookup_table()


def normalize_cpu(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [..., H, W, 3] -> FP32 [..., 3, H, W], ImageNet-normalized. A table lookup per channel:
    one pass over the pixels, twice as fast as converting, scaling and shifting."""
    if out is None:
        out = np.empty((*pixels.shape[:-3], 3, *pixels.shape[-3:-1]), np.float32)
    for c in range(3):
        np.take(_LUT[c], pixels[..., c], out=out[..., c, :, :])
    return out


def preprocess_cpu(rows: list[bytes], size: int, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    out = np.empty((len(rows), 3, size, size), np.float32)

    def one(row: int) -> None:
        normalize_cpu(decode_cpu(rows[row], row, size), out[row])

    if pool is None or len(rows) == 1:
        for row in range(len(rows)):
            one(row)
    else:
        for future in [pool.submit(one, row) for row in range(len(rows))]:
            future.result()  # the first failing row's error, in row order
    return out


# -- GPU: nvJPEG + torch ------------------------------------------------------------------------


def decode_gpu(rows: list[bytes], device: Any) -> list[Any]:
    """The rows decoded on ``device``: uint8 [3, H, W] CUDA tensors, one batched nvJPEG call.

    When the batch fails (nvJPEG names no row), each row is decoded alone, and one nvJPEG refuses
    is decoded by Pillow and uploaded; a row neither can read is the client's error naming it."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    for row, data in enumerate(rows):
        check_jpeg(data, row)
    # bytearray: decode_jpeg wants writable uint8 CPU tensors; ~20 KB a row, so the copy is nothing
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in rows]
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except Exception:  # torchvision raises RuntimeError from C++; whatever it is, find the row
        pass
    images = []
    for row, tensor in enumerate(encoded):
        try:
            images.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
        except Exception as exc:
            log.warning("input 'image' row %d: nvJPEG cannot decode it (%s); decoding with Pillow", row, exc)
            rgb = _pillow_rgb(rows[row], row)
            images.append(torch.from_numpy(rgb).permute(2, 0, 1).to(device))
    return images


def _pillow_rgb(data: bytes, row: int) -> np.ndarray:
    """One JPEG -> uint8 [H, W, 3] RGB at its own size."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise ValueError(f"input 'image' row {row}: cannot decode the JPEG: {exc}") from None


def resize_normalize_torch(images: list[Any], size: int) -> Any:
    """uint8 [3, H, W] tensors (any sizes, one device) -> FP32 [N, 3, size, size], ImageNet-normalized,
    where they lie. Works on any torch device (the unit tests run it on the CPU)."""
    import torch
    import torch.nn.functional as F

    device = images[0].device
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=device)
    same = all(img.shape == images[0].shape for img in images)
    if same:  # one resize for the batch
        groups = [(slice(0, len(images)), torch.stack(images))]
    else:
        groups = [(slice(i, i + 1), img[None]) for i, img in enumerate(images)]
    for where, batch in groups:
        x = batch.float()
        if tuple(x.shape[-2:]) != (size, size):
            # Pillow's BILINEAR is antialiased when shrinking, and it rounds to 8 bits: do both
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            x = x.round_().clamp_(0, 255)
        out[where] = x
    scale = torch.tensor([1.0 / (255.0 * s) for s in STD], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(MEAN, STD, strict=True)], device=device).view(1, 3, 1, 1)
    return out.mul_(scale).add_(shift)


def preprocess_gpu(rows: list[bytes], size: int, device: Any) -> Any:
    import torch

    with torch.cuda.device(device), torch.inference_mode():
        return resize_normalize_torch(decode_gpu(rows, device), size)


# -- the hooks ------------------------------------------------------------------------------------


def preprocess(inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, Any]:
    _int_param(parameters, "top_k", STATE.top_k, 1, MAX_TOP_K)  # the client's error: before the model runs
    rows = [bytes(item) for item in inputs["image"].reshape(-1)]
    if STATE.device is not None:
        return {"pixels": preprocess_gpu(rows, STATE.size, STATE.device)}
    return {"pixels": preprocess_cpu(rows, STATE.size, STATE.pool)}


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices INT64 [N, k], softmax scores FP32 [N, k]), best first; ties by lower index."""
    k = min(k, logits.shape[1])
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return best.astype(np.int64), np.take_along_axis(probs, best, axis=1).astype(np.float32)


def postprocess(outputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
    logits = next(iter(outputs.values()))  # the model's one output (output__0)
    k = _int_param(parameters, "top_k", STATE.top_k, 1, MAX_TOP_K)
    indices, scores = top_k(logits.reshape(logits.shape[0], -1), k)
    names = STATE.labels
    labels = np.empty(indices.shape, dtype=object)
    for row in range(indices.shape[0]):
        for col in range(indices.shape[1]):
            i = int(indices[row, col])
            name = names[i] if names is not None and i < len(names) else f"class_{i}"
            labels[row, col] = f"{scores[row, col]:.6f}:{i}:{name}".encode()
    return {"labels": labels, "indices": indices, "scores": scores}
