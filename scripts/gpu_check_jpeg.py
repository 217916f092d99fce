#!/usr/bin/env python3
"""Check the resnet50_jpeg handler's GPU decoding against its Pillow fallback, on a real GPU.

    python3 scripts/gpu_check_jpeg.py [--device 0] [--batch 64] [--repeats 20]

Run from the repository root on the GPU machine. It imports numpy, Pillow, torch, torchvision and
``dl_inference/example_handlers/resnet50_jpeg.py`` (plain Python: no protobuf or gRPC code). Checks,
each printed PASS/FAIL/INFO:

1. environment: torch, CUDA, torchvision (missing ones are named and the GPU checks are skipped; the
   CPU timing still runs; exit status 2);
2. agreement: the same JPEGs (photo-like at 224x224 and at other sizes, one greyscale, one 4:4:4,
   one progressive) through ``preprocess_gpu`` (nvJPEG + torch resize + normalize on the GPU) and
   ``preprocess_cpu`` (Pillow + numpy): mean and max |difference| of the normalized tensors, also
   in 8-bit levels; PASS when the mean is under 2 levels (torchvision's own nvJPEG vs libjpeg bound);
3. top-1 agreement of the benchmark's ResNet-50 (random weights, seed 0, fp32) fed both ways;
4. rows nvJPEG or the client gets wrong: not a JPEG (ValueError naming the row), a CMYK JPEG
   (nvJPEG refuses it; the handler falls back to Pillow), a truncated JPEG (what each decoder does);
5. timings, batch ``--batch`` of distinct 224x224 quality-90 JPEGs: images/s of decode + resize +
   normalize on the GPU (synchronized; decode alone too) and on the CPU (1 thread, and the handler's
   default thread pool), median of ``--repeats``.

Exit status 0 when every check passed. Takes under a minute.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dl_inference.example_handlers import resnet50_jpeg as handler  # noqa: E402  (after the path set-up)
from load_tests.synthetic_jpeg import encode_jpeg, photo_like, synthetic_jpegs  # noqa: E402

LEVEL = 1.0 / (255.0 * min(handler.STD))  # one 8-bit level, normalized (the largest of the 3 channels)
failures: list[str] = []


def report(ok: bool | None, what: str) -> None:
    tag = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    if ok is False:
        failures.append(what)
    print(f"{tag}  {what}", flush=True)


def pillow_jpeg(rgb: np.ndarray, **options: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    mode = "L" if rgb.ndim == 2 else "RGB"
    Image.fromarray(rgb, mode).save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def test_images(seed: int = 7) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    images = [(f"photo-like 224x224 #{i}", data) for i, data in enumerate(synthetic_jpegs(8, 224, seed=seed))]
    images += [
        ("photo-like 500x375 (shrunk)", encode_jpeg(photo_like(rng, 375, 500))),
        ("photo-like 256x256 (shrunk)", encode_jpeg(photo_like(rng, 256, 256))),
        ("photo-like 120x160 (enlarged)", encode_jpeg(photo_like(rng, 160, 120))),
        ("greyscale 224x224", pillow_jpeg(photo_like(rng, 224, 224)[..., 1])),
        ("4:4:4 chroma 224x224", pillow_jpeg(photo_like(rng, 224, 224), subsampling=0)),
        ("progressive 224x224", pillow_jpeg(photo_like(rng, 224, 224), progressive=True)),
    ]
    return images


def median_rate(call: Callable[[], Any], sync: Callable[[], None], images: int, repeats: int) -> float:
    call()
    sync()  # warm-up: nvJPEG handles, kernels, allocator
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        sync()
        rates.append(images / (time.perf_counter() - t0))
    return statistics.median(rates)


def environment() -> tuple[Any, str | None]:
    """(torch or None, why GPU decoding cannot run or None)."""
    print(f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    try:
        import torch
    except ImportError:
        print("MISSING  torch is not installed: no GPU checks")
        return None, "torch is not installed"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"GPU {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
    else:
        print("MISSING  CUDA: torch sees no GPU")
    try:
        import torchvision

        print(f"torchvision {torchvision.__version__}")
    except Exception as exc:
        print(f"MISSING  torchvision cannot be imported: {type(exc).__name__}: {exc}")
    why_not = handler.gpu_decode_unavailable("gpu")
    if why_not:
        print(f"MISSING  GPU decoding cannot run: {why_not}")
    return torch, why_not


def check_agreement(torch: Any, device: Any) -> None:
    images = test_images()
    rows = [data for _, data in images]
    gpu = handler.preprocess_gpu(rows, 224, device).cpu().numpy()
    cpu = handler.preprocess_cpu(rows, 224)
    print(f"{'image':<32} {'bytes':>7} {'mean |d|':>9} {'max |d|':>8}   (8-bit levels)")
    for (name, data), g, c in zip(images, gpu, cpu, strict=True):
        d = np.abs(g - c)
        print(f"{name:<32} {len(data):>7} {d.mean() / LEVEL:9.3f} {d.max() / LEVEL:8.1f}")
    diff = np.abs(gpu - cpu)
    report(
        diff.mean() < 2 * LEVEL,
        f"GPU vs CPU preprocessing: mean |d| {diff.mean():.5f} ({diff.mean() / LEVEL:.2f} levels), "
        f"max {diff.max():.4f} ({diff.max() / LEVEL:.1f} levels), 99.9th percentile "
        f"{np.percentile(diff, 99.9) / LEVEL:.1f} levels",
    )

    from load_tests.resnet50_torch import ResNet50, random_state_dict

    net = ResNet50().eval().to(device)
    net.load_state_dict(random_state_dict(0))
    with torch.inference_mode():
        logits_gpu = net(torch.from_numpy(gpu).to(device)).cpu().numpy()
        logits_cpu = net(torch.from_numpy(cpu).to(device)).cpu().numpy()
    top_gpu, _ = handler.top_k(logits_gpu, 5)
    top_cpu, _ = handler.top_k(logits_cpu, 5)
    same = int((top_gpu[:, 0] == top_cpu[:, 0]).sum())
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top_gpu, top_cpu, strict=True)])
    rel = np.abs(logits_gpu - logits_cpu).max() / max(np.abs(logits_cpu).max(), 1e-6)
    report(
        same >= 0.9 * len(rows),
        f"ResNet-50 top-1 agrees on {same}/{len(rows)} images; top-5 overlap {overlap:.0%}; "
        f"max |logit difference| / max |logit| {rel:.4f}",
    )


def check_bad_rows(torch: Any, device: Any) -> None:
    from PIL import Image

    good = synthetic_jpegs(1, 224, seed=3)[0]
    try:
        handler.preprocess_gpu([good, b"GIF89a, not a JPEG"], 224, device)
        report(False, "a row that is not a JPEG was accepted")
    except ValueError as exc:
        report("row 1" in str(exc), f"not a JPEG: ValueError: {exc}")
    cmyk = io.BytesIO()
    Image.fromarray(photo_like(np.random.default_rng(1), 224, 224)).convert("CMYK").save(cmyk, "JPEG", quality=90)
    try:
        out = handler.preprocess_gpu([good, cmyk.getvalue()], 224, device)
        ref = handler.preprocess_cpu([cmyk.getvalue()], 224)
        d = np.abs(out[1].cpu().numpy() - ref[0]).mean() / LEVEL
        report(d < 2, f"CMYK JPEG: decoded (Pillow fallback where nvJPEG refuses), mean |d| {d:.2f} levels")
    except Exception as exc:
        report(False, f"CMYK JPEG: {type(exc).__name__}: {exc}")
    truncated = good[: len(good) // 2]
    for name, fn in (
        ("GPU", lambda: handler.preprocess_gpu([truncated], 224, device)),
        ("CPU", lambda: handler.preprocess_cpu([truncated], 224)),
    ):
        try:
            fn()
            report(None, f"truncated JPEG, {name} path: decoded without an error (the decoder fills the rest)")
        except ValueError as exc:
            report(None, f"truncated JPEG, {name} path: ValueError: {exc}")


def timings(torch: Any, device: Any, batch: int, repeats: int) -> None:
    rows = synthetic_jpegs(batch, 224, seed=5)
    print(f"timings: batch {batch}, 224x224 quality 90, {sum(map(len, rows)) / batch / 1000:.1f} KB per image")
    if device is not None:

        def sync() -> None:
            torch.cuda.synchronize(device)

        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in rows]
        decode = median_rate(lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device), sync, batch, repeats)
        full = median_rate(lambda: handler.preprocess_gpu(rows, 224, device), sync, batch, repeats)
        report(None, f"GPU nvJPEG decode only:                 {decode:9.0f} images/s")
        report(None, f"GPU decode + resize + normalize:        {full:9.0f} images/s")
    threads = min(8, os.cpu_count() or 1)
    one = median_rate(lambda: handler.preprocess_cpu(rows, 224), lambda: None, batch, max(3, repeats // 4))
    report(None, f"CPU Pillow decode + normalize, 1 thread: {one:9.0f} images/s")
    with ThreadPoolExecutor(threads) as pool:
        many = median_rate(lambda: handler.preprocess_cpu(rows, 224, pool), lambda: None, batch, max(3, repeats // 4))
    report(None, f"CPU Pillow, {threads} threads (handler default): {many:9.0f} images/s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    p.add_argument("--batch", type=int, default=64, help="images per timed batch (default 64)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats, median taken (default 20)")
    args = p.parse_args()
    torch, why_not = environment()
    device = None
    if why_not is None:
        device = torch.device("cuda", args.device)
        for check in (check_agreement, check_bad_rows):
            try:
                check(torch, device)
            except Exception as exc:  # one broken check must not hide the others
                report(False, f"{check.__name__}: {type(exc).__name__}: {exc}")
    timings(torch, device, args.batch, args.repeats)
    if why_not is not None:
        print(f"\nGPU CHECKS NOT RUN: {why_not}")
        return 2
    print(f"\n{'ALL PASSED' if not failures else f'{len(failures)} FAILED: ' + '; '.join(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
