"""The resnet50_jpeg example handler: CPU decoding (always), the torch resize path on the CPU, GPU decoding
against Pillow (only where CUDA and torchvision are), top-k, errors naming the row."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dl_inference.example_handlers import resnet50_jpeg as handler
from load_tests.synthetic_jpeg import encode_jpeg, photo_like, synthetic_jpegs

# One 8-bit level after normalization is 1 / (255 * std) ~ 0.0175; JPEG decoders differ by a mean of
# under 2 levels (nvJPEG vs libjpeg-turbo), and a bilinear resize in float vs Pillow's fixed point by 1.
LEVEL = 1.0 / (255.0 * min(handler.STD))


def _context(tmp_path: Path, device: str = "cpu", **params: str) -> Any:
    return SimpleNamespace(
        parameters=params, model_dir=tmp_path, model_name="resnet50_jpeg", device=device, device_id=None
    )


@pytest.fixture(autouse=True)
def fresh_state() -> Any:
    yield
    if handler.STATE.pool is not None:
        handler.STATE.pool.shutdown()
    handler.STATE = handler._State()


def test_cpu_preprocess_matches_a_plain_pillow_numpy_reference() -> None:
    rows = [*synthetic_jpegs(3, 48, seed=3), encode_jpeg(photo_like(np.random.default_rng(4), 30, 70))]
    got = handler.preprocess_cpu(rows, 48)
    assert got.shape == (4, 3, 48, 48) and got.dtype == np.float32
    for i, data in enumerate(rows):
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB").resize((48, 48), Image.Resampling.BILINEAR), np.float64)
        want = ((rgb / 255.0 - np.array(handler.MEAN)) / np.array(handler.STD)).transpose(2, 0, 1)
        np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_threaded_cpu_preprocess_is_the_same() -> None:
    from concurrent.futures import ThreadPoolExecutor

    rows = synthetic_jpegs(6, 32, seed=5)
    with ThreadPoolExecutor(3) as pool:
        np.testing.assert_array_equal(handler.preprocess_cpu(rows, 32, pool), handler.preprocess_cpu(rows, 32))


def test_torch_resize_normalize_agrees_with_pillow() -> None:
    """The GPU path's resize + normalize (torch, run here on the CPU) against Pillow's, same decoded pixels."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    sizes = [(224, 224), (300, 260), (500, 375), (120, 90)]  # as is, shrunk, and enlarged
    decoded = [photo_like(rng, h, w) for h, w in sizes]
    images = [torch.from_numpy(rgb).permute(2, 0, 1).contiguous() for rgb in decoded]
    got = handler.resize_normalize_torch(images, 224).numpy()
    for i, rgb in enumerate(decoded):
        pil = Image.fromarray(rgb).resize((224, 224), Image.Resampling.BILINEAR) if rgb.shape[:2] != (224, 224) else rgb
        want = handler.normalize_cpu(np.asarray(pil, np.uint8))
        diff = np.abs(got[i] - want)
        assert diff.mean() < 0.5 * LEVEL, (sizes[i], diff.mean() / LEVEL)
        assert diff.max() <= 2.01 * LEVEL, (sizes[i], diff.max() / LEVEL)  # rounding: a level or two at most
    same = handler.resize_normalize_torch(images[:1] * 3, 224).numpy()  # one batched resize
    np.testing.assert_array_equal(same[2], got[0])


def _cuda_decode_or_skip() -> Any:
    torch = pytest.importorskip("torch")
    why_not = handler.gpu_decode_unavailable("gpu")
    if why_not is not None:
        pytest.skip(f"GPU JPEG decoding cannot run here: {why_not}")
    return torch


def test_gpu_and_cpu_preprocessing_agree() -> None:
    torch = _cuda_decode_or_skip()
    device = torch.device("cuda", 0)
    rng = np.random.default_rng(11)
    rows = synthetic_jpegs(16, 224, seed=11) + [encode_jpeg(photo_like(rng, 375, 500)) for _ in range(4)]
    gpu = handler.preprocess_gpu(rows, 224, device)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32 and tuple(gpu.shape) == (20, 3, 224, 224)
    cpu = handler.preprocess_cpu(rows, 224)
    diff = np.abs(gpu.cpu().numpy() - cpu)
    assert diff.mean() < 2 * LEVEL, f"mean |GPU - CPU| = {diff.mean() / LEVEL:.2f} levels"
    assert np.percentile(diff, 99.9) < 16 * LEVEL, f"99.9th percentile {np.percentile(diff, 99.9) / LEVEL:.1f} levels"


def test_gpu_decode_names_a_bad_row() -> None:
    torch = _cuda_decode_or_skip()
    rows = [*synthetic_jpegs(2, 64, seed=12), b"GIF89a not a jpeg"]
    with pytest.raises(ValueError, match=r"input 'image' row 2: 17 bytes that are not a JPEG image"):
        handler.preprocess_gpu(rows, 64, torch.device("cuda", 0))


def test_initialize_chooses_and_refuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        handler.initialize(_context(tmp_path, decode_threads="2", image_size="64"))
    assert handler.STATE.device is None and handler.STATE.pool is not None and handler.STATE.size == 64
    assert "Pillow on the CPU, 2 thread(s) (the instance is KIND_CPU)" in caplog.text
    with pytest.raises(RuntimeError, match="parameter 'decode' is gpu but the instance is KIND_CPU"):
        handler.initialize(_context(tmp_path, decode="gpu"))
    with pytest.raises(ValueError, match="parameter 'decode' must be one of auto, gpu, cpu"):
        handler.initialize(_context(tmp_path, decode="nvjpeg"))
    with pytest.raises(ValueError, match=r"parameter 'top_k' must be in 1\.\.100, got 0"):
        handler.initialize(_context(tmp_path, top_k="0"))


def test_hooks_end_to_end_without_a_server(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("zero\none\ntwo\nthree\n")
    handler.initialize(_context(tmp_path, image_size="32", top_k="2", decode_threads="1"))
    rows = np.array(synthetic_jpegs(2, 40, seed=2), dtype=object).reshape(-1, 1)
    pixels = handler.preprocess({"image": rows}, {})["pixels"]
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == np.float32
    logits = np.array([[0.0, 3.0, 1.0, 3.0], [5.0, 0.0, 0.0, 0.0]], np.float32)
    out = handler.postprocess({"output__0": logits}, {"top_k": 3})
    assert out["indices"].tolist() == [[1, 3, 2], [0, 1, 2]]  # ties: the lower index first
    assert out["scores"].dtype == np.float32 and out["indices"].dtype == np.int64
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(out["scores"][0], probs[[1, 3, 2]], rtol=1e-6)
    assert out["labels"][0, 0] == f"{probs[1]:.6f}:1:one".encode()
    assert handler.postprocess({"output__0": logits}, {})["labels"].shape == (2, 2)  # the config's top_k
    wide = handler.postprocess({"output__0": np.zeros((1, 6), np.float32)}, {"top_k": 6})["labels"]
    assert wide[0, 5].endswith(b":5:class_5")  # past labels.txt: the index


def test_rows_that_are_not_jpegs_are_named(tmp_path: Path) -> None:
    handler.initialize(_context(tmp_path, image_size="32", decode_threads="2"))
    good = synthetic_jpegs(1, 32)[0]
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    cases = [
        (png.getvalue(), rf"row 1: {len(png.getvalue())} bytes that are not a JPEG image"),
        (good[:300], "row 1: cannot decode the JPEG"),  # a JPEG's start, cut short
        (b"\xff\xd8\xff" + b"\x00" * 40, "row 1: cannot decode the JPEG"),
    ]
    for bad, message in cases:
        rows = np.array([good, bad, good], dtype=object).reshape(-1, 1)
        with pytest.raises(ValueError, match=rf"^input 'image' {message}"):
            handler.preprocess({"image": rows}, {})
    with pytest.raises(ValueError, match=r"parameter 'top_k' must be in 1\.\.100, got 101"):
        handler.preprocess({"image": np.array([[good]], dtype=object)}, {"top_k": 101})
