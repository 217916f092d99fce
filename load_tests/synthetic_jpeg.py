"""Photo-like JPEGs made with numpy + Pillow: no real photos can be downloaded here.

A JPEG decoder's work depends on how much detail survives the encoder, so flat colours (a few
hundred bytes a file) would flatter it. Each image here is a smooth scene (a random linear gradient
per channel, a few soft blobs of colour), some texture (gratings of random pitch and angle) and
per-pixel noise, encoded at quality 90 with 4:2:0 chroma (Pillow's default): 14-20 KB at 224x224,
the size of an ordinary photo at that resolution and quality.
"""

from __future__ import annotations

import io

import numpy as np


def photo_like(rng: np.random.Generator, height: int = 224, width: int = 224, noise: float = 8.0) -> np.ndarray:
    """uint8 [height, width, 3]: gradients + soft blobs + gratings + Gaussian noise of ``noise`` levels."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= max(height - 1, 1)
    x /= max(width - 1, 1)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, base = rng.uniform(-120, 120), rng.uniform(-120, 120), rng.uniform(60, 200)
        img[..., c] = base + a * (x - 0.5) + b * (y - 0.5)
    for _ in range(int(rng.integers(2, 6))):  # soft blobs: objects out of focus
        cy, cx = rng.uniform(0, 1, 2)
        radius = rng.uniform(0.05, 0.3)
        weight = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius**2))
        img += weight[..., None] * rng.uniform(-90, 90, 3).astype(np.float32)
    for _ in range(int(rng.integers(2, 5))):  # texture: gratings of random pitch and angle (grass, fabric...)
        angle, pitch = rng.uniform(0, np.pi), rng.uniform(3, 24)
        phase = (np.cos(angle) * x * width + np.sin(angle) * y * height) * (2 * np.pi / pitch)
        img += (rng.uniform(4, 18) * np.sin(phase))[..., None] * rng.uniform(0.3, 1.0, 3).astype(np.float32)
    img += rng.normal(0.0, noise, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def synthetic_jpegs(count: int, size: int = 224, quality: int = 90, seed: int = 0) -> list[bytes]:
    """``count`` different photo-like ``size`` x ``size`` JPEGs; the same for the same arguments."""
    rng = np.random.default_rng(seed)
    return [encode_jpeg(photo_like(rng, size, size), quality) for _ in range(count)]
