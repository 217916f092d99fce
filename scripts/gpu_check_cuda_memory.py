#!/usr/bin/env python3
"""Check dl_inference/backends/cuda_memory.py on a real GPU with cuda-python (no TensorRT needed).

    python3 scripts/gpu_check_cuda_memory.py [--device 0] [--repeats 20]

Run from the repository root on the GPU machine. It imports numpy, cuda-python and the module under
test only (plus torch, if present, for one optional check): dl_inference's package ``__init__`` files
and ``dl_inference.errors`` are plain Python, so no generated protobuf code is loaded and an old
protobuf/grpc there does not matter. Checks, each printed PASS/FAIL:

1. binding, GPU name, compute capability, memory;
2. numpy -> pinned -> device -> pinned round trips on the instance stream, byte-exact, several dtypes;
3. buffers growing (1 KiB -> 64 MiB), contents right after each growth;
4. the asynchronous copy returns before the data has arrived (enqueue time vs synchronize);
5. errors: an absurd cudaMalloc and an invalid device give CudaError naming the call and CUDA's error,
   and the next allocation still works;
6. the stream handle is a real cudaStream_t (torch.cuda.ExternalStream on it, if torch is installed);
7. timing: 64x3x224x224 FP32 host -> device, pinned vs pageable (and device -> host), median of N;
8. everything freed on close.

Exit status 0 when every check passed. Takes a few seconds.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dl_inference.backends import cuda_memory as cm  # noqa: E402  (after the path set-up above)

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    RESULTS.append((name, ok, detail))
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
    return ok


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def round_trips(memory: cm.InstanceMemory) -> None:
    section("round trips numpy -> device -> numpy on the instance stream")
    rng = np.random.default_rng(0)
    cases = {
        "float32 [64,1000]": rng.standard_normal((64, 1000)).astype(np.float32),
        "float16 [3,5,7]": rng.standard_normal((3, 5, 7)).astype(np.float16),
        "int64 [1000]": rng.integers(-(2**62), 2**62, 1000, dtype=np.int64),
        "uint8 [3,224,224]": rng.integers(0, 256, (3, 224, 224), dtype=np.uint8),
        "bool [17]": rng.integers(0, 2, 17).astype(np.bool_),
        "float32 non-contiguous [50,20]": rng.standard_normal((20, 50)).astype(np.float32).T,
        "empty float32 [0,16]": np.zeros((0, 16), np.float32),
    }
    for label, array in cases.items():
        ptr = memory.upload("x", array)
        back = memory.download("x", ptr, array.dtype, array.shape)
        memory.synchronize()
        copy = np.array(back, copy=True)
        check(label, copy.tobytes() == np.ascontiguousarray(array).tobytes() and copy.shape == array.shape)


def growth(memory: cm.InstanceMemory) -> None:
    section("buffers grow as needed")
    previous = 0
    for nbytes in (1 << 10, 1 << 16, 1 << 20, 1 << 26):
        array = np.frombuffer(np.random.default_rng(nbytes).bytes(nbytes), np.uint8)
        ptr = memory.upload("grow", array)
        back = memory.download("grow", ptr, array.dtype, array.shape)
        memory.synchronize()
        capacity = memory._device["grow"].capacity
        ok = back.tobytes() == array.tobytes() and capacity >= nbytes and capacity >= previous
        check(f"{cm.format_bytes(nbytes)} -> device buffer {cm.format_bytes(capacity)} at {ptr:#x}", ok)
        previous = capacity
    small = np.arange(10, dtype=np.int32)
    ptr = memory.upload("grow", small)
    back = memory.download("grow", ptr, small.dtype, small.shape)
    memory.synchronize()
    check(
        "a smaller array reuses the large buffer", memory._device["grow"].capacity == previous and (back == small).all()
    )


def asynchrony(api: cm.CudaApi, memory: cm.InstanceMemory) -> None:
    section("copies are asynchronous on the stream")
    nbytes = 256 << 20
    host = memory.pinned("async", nbytes)
    dptr = memory.device("async", nbytes)
    memory.synchronize()
    start = time.perf_counter()
    for _ in range(4):
        api.memcpy_htod_async(dptr, host.ptr, nbytes, memory.stream)
    enqueued = time.perf_counter() - start
    memory.synchronize()
    total = time.perf_counter() - start
    check(
        "4 x 256 MiB pinned host->device enqueue before they complete",
        enqueued < total / 2,
        f"enqueue {enqueued * 1e3:.2f} ms, complete {total * 1e3:.1f} ms",
    )


def errors(api: cm.CudaApi, device: int) -> None:
    section("errors")
    try:
        api.malloc(1 << 50)
        check("absurd cudaMalloc(1 PiB) raises", False, "no error")
    except cm.CudaError as exc:
        ok = "Memory" in exc.error_name or "memory" in exc.message
        check("absurd cudaMalloc(1 PiB) raises CudaError", ok, exc.message)
        check("it is a ServerError with code INTERNAL", exc.code.name == "INTERNAL")
    ptr = api.malloc(1 << 20)
    api.free(ptr)
    check("the next allocation works (the error is not sticky)", ptr != 0)
    try:
        api.set_device(api.device_count() + 7)
        check("invalid device raises", False, "no error")
    except cm.CudaError as exc:
        check("cudaSetDevice(invalid) raises CudaError", "Device" in exc.error_name, exc.message)
    api.set_device(device)


def external_stream(memory: cm.InstanceMemory) -> None:
    section("the stream handle is a real cudaStream_t (what TensorRT's execute_async_v3 takes)")
    check("handle is a non-zero int", isinstance(memory.stream.handle, int) and memory.stream.handle != 0,
          f"{memory.stream.handle:#x}")  # fmt: skip
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        print("  (torch not installed: skipped the ExternalStream check)")
        return
    if not torch.cuda.is_available():
        print("  (torch sees no GPU: skipped)")
        return
    stream = torch.cuda.ExternalStream(memory.stream.handle, device=torch.device("cuda", memory.device_id))
    with torch.cuda.stream(stream):
        a = torch.arange(1 << 20, device=f"cuda:{memory.device_id}", dtype=torch.float32)
        b = (a * 2).sum()
    memory.synchronize()  # our cudaStreamSynchronize waits for torch's work on the same stream
    expected = float(2 * ((1 << 20) - 1) * (1 << 20) / 2)
    check("torch work queued on our stream finishes with our synchronize", abs(float(b) - expected) / expected < 1e-6)


def timing(api: cm.CudaApi, memory: cm.InstanceMemory, repeats: int) -> None:
    section(f"timing: 64x3x224x224 FP32 ({cm.format_bytes(64 * 3 * 224 * 224 * 4)}), median of {repeats}")
    batch = np.random.default_rng(1).standard_normal((64, 3, 224, 224)).astype(np.float32)
    nbytes = batch.nbytes
    dptr = memory.device("bench", nbytes)
    pinned = memory.pinned("bench", nbytes)
    pinned.view(batch.dtype, batch.shape)[...] = batch

    def staged_upload(array: np.ndarray) -> None:
        memory.direct_copy_min_bytes = None
        memory.upload("bench", array)
        memory.direct_copy_min_bytes = cm.DIRECT_COPY_MIN_BYTES

    def measure(fn) -> float:
        times = []
        for _ in range(repeats + 2):
            start = time.perf_counter()
            fn()
            memory.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:])  # the first two warm up

    rows = [
        ("host->device, pinned", lambda: api.memcpy_htod_async(dptr, pinned.ptr, nbytes, memory.stream)),
        ("host->device, pageable", lambda: api.memcpy_htod_async(dptr, batch.ctypes.data, nbytes, memory.stream)),
        ("host->device, upload() staged (memcpy into pinned + copy)", lambda: staged_upload(batch)),
        ("device->host, pinned", lambda: api.memcpy_dtoh_async(pinned.ptr, dptr, nbytes, memory.stream)),
    ]
    results = {}
    for label, fn in rows:
        seconds = measure(fn)
        results[label] = seconds
        print(f"  {label:<58} {seconds * 1e3:8.2f} ms  {nbytes / seconds / 1e9:6.1f} GB/s", flush=True)
    check("the pinned copy is not slower than the pageable one",
          results["host->device, pinned"] <= results["host->device, pageable"] * 1.05)  # fmt: skip
    back = memory.download("bench", memory.device("bench", nbytes), batch.dtype, batch.shape)
    memory.synchronize()
    check("the timed buffer still holds the batch", back.tobytes() == batch.tobytes())

    print(f"\n  upload() of a fresh numpy array, staged through pinned memory vs copied directly (median of {repeats})")
    for size in (64 << 10, 1 << 20, 8 << 20, nbytes):
        array = np.random.default_rng(size).standard_normal(size // 4).astype(np.float32)
        line = f"  {cm.format_bytes(size):>10}"
        for label, threshold in (("staged", None), ("direct", 0)):
            memory.direct_copy_min_bytes = threshold
            seconds = measure(lambda a=array: memory.upload("sweep", a))
            line += f"   {label} {seconds * 1e3:7.3f} ms {size / seconds / 1e9:5.1f} GB/s"
        print(line, flush=True)
        back = memory.download("sweep", memory.device("sweep", size), array.dtype, array.shape)
        memory.synchronize()
        check(f"direct copy of {cm.format_bytes(size)} arrived intact", back.tobytes() == array.tobytes())
    memory.direct_copy_min_bytes = cm.DIRECT_COPY_MIN_BYTES


def older_layout(device: int) -> None:
    section("cuda-python's older cuda.cudart layout")
    try:
        api = cm.load_cuda_api("cuda.cudart")
    except cm.CudaUnavailable as exc:
        print(f"  (not available here: {exc.message[:120]})")
        return
    memory = cm.InstanceMemory(api, device)
    x = np.arange(1000, dtype=np.float32)
    back = memory.download("x", memory.upload("x", x), x.dtype, x.shape)
    memory.synchronize()
    check(f"round trip through {api.name}", (back == x).all())
    memory.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    start = time.perf_counter()

    section("environment")
    print(f"  python {platform.python_version()}, numpy {np.__version__}, module {cm.__file__}")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("google", "grpc", "tensorrt", "torch"))
    check("importing the module loaded no protobuf/grpc/tensorrt/torch", not loaded, ", ".join(loaded))
    try:
        api = cm.load_cuda_api()
    except cm.CudaUnavailable as exc:
        check("a CUDA binding imports", False, exc.message)
        return 1
    print(f"  binding: {api.name}")
    count = api.device_count()
    api.set_device(args.device)
    name = api.device_name(args.device)
    major, minor = api.compute_capability(args.device)
    free, total = api.mem_get_info()
    print(f"  GPUs: {count}; device {args.device}: {name}, compute capability {major}.{minor}, "
          f"{cm.format_bytes(free)} free of {cm.format_bytes(total)}")  # fmt: skip
    check("a GPU is visible", count > 0 and bool(name))

    memory = cm.InstanceMemory(api, args.device)
    try:
        for step in (round_trips, growth):
            step(memory)
        asynchrony(api, memory)
        errors(api, args.device)
        external_stream(memory)
        timing(api, memory, args.repeats)
    except Exception:
        traceback.print_exc()
        check("no unexpected exception", False)
    finally:
        section("close")
        device_bytes, pinned_bytes = memory.device_bytes, memory.pinned_bytes
        memory.close()
        check("close() freed every buffer and the stream", memory.device_bytes == 0 and memory.pinned_bytes == 0,
              f"{cm.format_bytes(device_bytes)} device + {cm.format_bytes(pinned_bytes)} pinned released")  # fmt: skip
    try:
        older_layout(args.device)
    except Exception:
        traceback.print_exc()
        check("older layout without unexpected exception", False)

    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed in {time.perf_counter() - start:.1f} s"
          + (f"; FAILED: {'; '.join(failed)}" if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
