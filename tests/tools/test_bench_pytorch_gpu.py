"""load_tests.bench_pytorch_gpu's own parts: the ResNet-50 definition and the repository it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from dl_inference.backends.base import get_backend, get_parameter  # noqa: E402
from dl_inference.protocol.generated.model_config_pb2 import DataType, ModelInstanceGroup  # noqa: E402
from dl_inference.repository.scan import scan_repository  # noqa: E402
from load_tests import bench_pytorch_gpu as bench  # noqa: E402
from load_tests.resnet50_torch import PARAMETERS, Bottleneck, ResNet50, create_model, random_state_dict  # noqa: E402


def test_resnet50_has_torchvisions_parameter_count_and_shapes() -> None:
    net = create_model()  # what the backend calls in the served model.py
    assert isinstance(net, ResNet50)
    assert sum(p.numel() for p in net.parameters()) == PARAMETERS == 25_557_032
    state = net.state_dict()
    # torchvision's names and shapes (a torchvision checkpoint would load)
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # the stride sits on the 3x3 (v1.5)
    assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert state["fc.weight"].shape == (1000, 2048)
    assert [len(getattr(net, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 6, 3]
    block = net.layer2[0]
    assert isinstance(block, Bottleneck)
    assert block.conv2.stride == (2, 2) and block.conv1.stride == (1, 1)


def test_resnet50_forward_small_image_fp32_and_fp16_agree() -> None:
    net = ResNet50().eval()
    net.load_state_dict(random_state_dict(0))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    # the random weights keep activations in fp16 range: fp16 is close to fp32
    with torch.inference_mode():
        y16 = net.half()(x.half()).float()
    assert torch.isfinite(y16).all()
    assert (y16 - y).abs().max().item() < 0.05 * max(y.abs().max().item(), 1e-3) + 1e-2


def test_random_state_dict_is_seeded() -> None:
    a, b, c = random_state_dict(0), random_state_dict(0), random_state_dict(1)
    assert torch.equal(a["layer3.1.conv2.weight"], b["layer3.1.conv2.weight"])
    assert not torch.equal(a["layer3.1.conv2.weight"], c["layer3.1.conv2.weight"])


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_repository_configs_load(tmp_path: Path, device: str) -> None:
    bench.write_repository(
        tmp_path,
        image=64,
        max_batch_size=8,
        delay_us=500,
        device=device,
        compile_mode="reduce-overhead",
        compile_batch_sizes="1,4,8",
    )
    models, errors = scan_repository(tmp_path)
    assert errors == {}
    assert sorted(models) == sorted(bench.DEFAULT_MODELS)  # the JPEG pair only when asked for
    for name, source in models.items():
        cfg = source.config
        assert cfg.backend == "pytorch" and cfg.max_batch_size == 8
        assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [
            ("input__0", DataType.TYPE_UINT8 if name == bench.COMPILED_U8 else DataType.TYPE_FP32, [3, 64, 64])
        ]
        assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [("output__0", DataType.TYPE_FP32, [1000])]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
        (group,) = cfg.instance_group
        assert group.count == 1
        if device == "gpu":
            assert group.kind == ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0]
        else:
            assert group.kind == ModelInstanceGroup.KIND_CPU and not group.gpus
        version = source.versions[1]
        wrapper = bench.U8_WRAPPER if name == bench.COMPILED_U8 else ""
        assert (version / "model.py").read_text() == bench.RESNET_SOURCE.read_text() + wrapper
        assert (version / "model.safetensors").stat().st_size > 100_000_000
        expected = bench.model_parameters(name, "reduce-overhead", "1,4,8")
        assert {k: get_parameter(cfg, k) for k in expected} == expected
    assert get_parameter(models["resnet50_fp16_compiled"].config, "compile") == "reduce-overhead"
    assert get_parameter(models["resnet50_fp16_compiled"].config, "compile_batch_sizes") == "1,4,8"
    assert get_parameter(models["resnet50_fp16"].config, "precision") == "fp16"

    if device == "cpu":  # the PyTorch backend loads the written model.py + model.safetensors and runs it
        source = models["resnet50_fp32"]
        backend = get_backend("pytorch")
        backend.load(source.versions[1], source.config, "cpu")
        try:
            x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
            out = backend.infer({"input__0": x}, ["output__0"])
        finally:
            backend.unload()
        assert out["output__0"].shape == (2, 1000) and out["output__0"].dtype == np.float32
        net = ResNet50().eval()
        net.load_state_dict(random_state_dict(0))
        with torch.inference_mode():
            expected_out = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out["output__0"], expected_out, rtol=1e-4, atol=1e-4)


def test_stats_delta_average_batch() -> None:
    before = {"inference_count": 10, "execution_count": 5, "queue_ns": 0, "queue_count": 10, "batch_executions": {1: 2}}
    after = {
        "inference_count": 10 + 4 * 3 + 2,
        "execution_count": 5 + 4,
        "queue_ns": 14_000_000,
        "queue_count": 24,
        "batch_executions": {1: 3, 4: 3},
    }
    d = bench.stats_delta(before, after)
    assert d["batch_executions"] == {"1": 1, "4": 3}
    assert d["avg_batch"] == pytest.approx(13 / 4)
    assert d["queue_ms_per_request"] == pytest.approx(1.0)


def test_defaults_and_ratios() -> None:
    args = bench.resolve_defaults(bench.build_parser().parse_args(["--device", "cpu", "--quick"]))
    assert args.name == "bench_pytorch_cpu_quick" and args.compile_mode == "default" and args.image == 64
    args = bench.resolve_defaults(bench.build_parser().parse_args([]))
    assert args.name == "bench_pytorch_gpu" and args.compile_mode == "reduce-overhead"
    assert args.concurrency == [1, 16, 64] and args.max_batch_size == 64 and args.ceiling_batch == 64
    assert args.compile_batch_sizes == "1,2,4,8,16,32,64"

    rows = [
        {"model": m, "concurrency": c, "images_per_s": ips}
        for m, c, ips in [
            ("resnet50_fp32", 64, 1000.0),
            ("resnet50_fp16", 64, 2000.0),
            ("resnet50_fp16_compiled", 64, 4000.0),
            ("resnet50_fp16_compiled", 1, 100.0),
        ]
    ]
    ceiling = [
        {"variant": "fp16 compiled", "mode": "with transfers", "images_per_s": 6000.0},
        {"variant": "fp16 compiled", "mode": "compute only", "images_per_s": 10000.0},
    ]
    r = bench.ratios(rows, ceiling)
    assert r["fp16_compiled_over_fp32"]["value"] == 4.0 and r["fp16_compiled_over_fp32"]["met"]
    assert r["served_over_ceiling_transfers"]["value"] == pytest.approx(4000 / 6000)
    assert r["served_over_ceiling_transfers"]["met"]
    assert r["served_over_ceiling_compute"]["value"] == pytest.approx(0.4)


def test_uint8_variant_scales_pixels_on_the_device() -> None:
    """resnet50_fp16_compiled_u8's model.py: the same network and weights, UINT8 pixels / 255 inside."""
    namespace: dict[str, object] = {"__name__": "u8_model"}
    exec(compile(bench.RESNET_SOURCE.read_text() + bench.U8_WRAPPER, "model.py", "exec"), namespace)
    u8 = namespace["create_model"]().eval()  # type: ignore[operator]
    u8.load_state_dict(random_state_dict(0))
    plain = ResNet50().eval()
    plain.load_state_dict(random_state_dict(0))
    pixels = np.random.default_rng(1).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    with torch.no_grad():
        got = u8(torch.from_numpy(pixels))
        want = plain(torch.from_numpy(pixels.astype(np.float32) / 255.0))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_jpeg_repository(tmp_path: Path) -> None:
    """resnet50_jpeg / _cpu: the example handler, client tensors in the config, a warm-up per batch size."""
    from dl_inference.worker.warmup import build_warmup_inputs

    bench.write_repository(tmp_path, list(bench.JPEG_MODELS), image=64, max_batch_size=8, compile_batch_sizes="1,4,8")
    models, errors = scan_repository(tmp_path)
    assert errors == {} and sorted(models) == sorted(bench.JPEG_MODELS)
    for name, source in models.items():
        cfg = source.config
        assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [("image", DataType.TYPE_STRING, [1])]
        assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [
            ("labels", DataType.TYPE_STRING, [-1]),
            ("indices", DataType.TYPE_INT64, [-1]),
            ("scores", DataType.TYPE_FP32, [-1]),
        ]
        assert get_parameter(cfg, "decode") == ("gpu" if name == bench.JPEG else "cpu")
        assert get_parameter(cfg, "image_size") == "64" and get_parameter(cfg, "compile") == "reduce-overhead"
        assert (tmp_path / name / "handler.py").read_text() == bench.JPEG_HANDLER.read_text()
        assert [(w.batch_size, w.count) for w in cfg.model_warmup] == [(1, 3), (4, 3), (8, 3)]
        sample = build_warmup_inputs(cfg, cfg.model_warmup[1], tmp_path / name)["image"]
        assert sample.shape == (4, 1) and all(bytes(b).startswith(b"\xff\xd8\xff") for b in sample.reshape(-1))
    cpu = tmp_path / "cpu"
    bench.write_repository(cpu, [bench.JPEG], image=64, max_batch_size=4, device="cpu", compile_mode="off")
    (cfg_cpu,) = [s.config for s in scan_repository(cpu)[0].values()]
    assert get_parameter(cfg_cpu, "decode") == "cpu"  # no GPU: Pillow
    assert [(w.batch_size, w.count) for w in cfg_cpu.model_warmup] == [(1, 1)]


def test_jpeg_pool_and_synthetic_images() -> None:
    from PIL import Image

    from load_tests.synthetic_jpeg import synthetic_jpegs

    pool = bench.jpeg_pool(64, count=5, seed=3)
    assert pool.shape == (5, 1) and pool.dtype == object
    assert len({bytes(b) for b in pool.reshape(-1)}) == 5  # distinct images
    assert [bytes(b) for b in pool.reshape(-1)] == synthetic_jpegs(5, 64, 90, seed=3)  # seeded
    big = synthetic_jpegs(4, 224, seed=0)
    assert all(10_000 < len(b) < 30_000 for b in big)  # photo-sized at 224x224 quality 90, not flat colour
    import io

    with Image.open(io.BytesIO(big[0])) as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (224, 224), "RGB")


def test_jpeg_ratios_and_ceiling_variants() -> None:
    assert bench.ceiling_variants([bench.JPEG, bench.JPEG_CPU]) == ["fp16 compiled"]
    assert bench.ceiling_variants([bench.JPEG, bench.FP32]) == ["fp32 eager", "fp16 eager", "fp16 compiled"]
    rows = [
        {"model": bench.JPEG, "concurrency": 64, "images_per_s": 6000.0},
        {"model": bench.JPEG_CPU, "concurrency": 64, "images_per_s": 1500.0},
        {"model": bench.JPEG, "concurrency": 1, "images_per_s": 300.0},
    ]
    ceiling = [
        {"variant": "fp16 compiled", "mode": "compute only", "images_per_s": 12000.0},
        {"variant": "fp16 compiled", "mode": "jpeg, GPU decode", "images_per_s": 8000.0},
        {"variant": "fp16 compiled", "mode": "jpeg, CPU decode", "images_per_s": 2000.0},
    ]
    r = bench.ratios(rows, ceiling)
    assert set(r) == {
        "jpeg_gpu_images_per_s",
        "jpeg_over_ceiling",
        "jpeg_over_compute",
        "jpeg_cpu_over_ceiling",
        "jpeg_gpu_over_cpu_decode",
    }  # a JPEG-only run: no ratios of models it did not serve
    assert r["jpeg_gpu_images_per_s"]["value"] == 6000.0 and r["jpeg_gpu_images_per_s"]["met"]
    assert r["jpeg_over_ceiling"]["value"] == pytest.approx(0.75)
    assert r["jpeg_over_compute"]["value"] == pytest.approx(0.5)
    assert r["jpeg_cpu_over_ceiling"]["value"] == pytest.approx(0.75)
    assert r["jpeg_gpu_over_cpu_decode"]["value"] == pytest.approx(4.0)
    slow = bench.ratios([{"model": bench.JPEG, "concurrency": 64, "images_per_s": 4000.0}], [])
    assert not slow["jpeg_gpu_images_per_s"]["met"] and slow["jpeg_over_ceiling"]["value"] is None
    mixed = bench.ratios([*rows, {"model": bench.FP32, "concurrency": 64, "images_per_s": 1000.0}], ceiling)
    assert "fp16_compiled_over_fp32" in mixed and "jpeg_gpu_images_per_s" in mixed
    args = bench.build_parser().parse_args(["--models", "resnet50_jpeg_cpu,resnet50_jpeg"])
    assert args.models == [bench.JPEG, bench.JPEG_CPU]
    assert bench.build_parser().parse_args([]).models == list(bench.DEFAULT_MODELS)


def test_loadgen_input_data_cycles_through_given_rows() -> None:
    from load_tests.loadgen import LoadConfig, LoadgenError, TensorSpec, build_workload

    rows = np.array([[b"a"], [b"bb"], [b"ccc"], [b"dddd"], [b"eeeee"]], dtype=object)
    spec_in = [TensorSpec("image", "BYTES", [-1, 1]), TensorSpec("k", "INT32", [-1, 2])]
    spec_out = [TensorSpec("labels", "BYTES", [-1, -1])]
    work = build_workload(spec_in, spec_out, LoadConfig(batch=2, input_data={"image": rows}))
    assert [t.shape for t in work.inputs] == [[2, 1], [2, 2]] and work.outputs[0].shape == [2, -1]
    assert len(work.requests()) == 2  # 5 rows, 2 a request: the fifth is never sent
    assert [a[0].reshape(-1).tolist() for a in work.requests()] == [[b"a", b"bb"], [b"ccc", b"dddd"]]
    assert all(a[1] is work.requests()[0][1] for a in work.requests())  # the random input: one array
    assert work.arrays is work.requests()[0]
    with pytest.raises(LoadgenError, match="has 5 rows, fewer than the batch of 8"):
        build_workload(spec_in, spec_out, LoadConfig(batch=8, input_data={"image": rows}))
    with pytest.raises(LoadgenError, match=r"rows of shape \[1\], the model takes \[2\]"):
        build_workload(spec_in, spec_out, LoadConfig(input_data={"k": rows}))
    with pytest.raises(LoadgenError, match="names unknown inputs"):
        build_workload(spec_in, spec_out, LoadConfig(input_data={"pixels": rows}))
    plain = build_workload(spec_in, spec_out, LoadConfig(batch=3))
    assert plain.requests() == [plain.arrays] and plain.inputs[0].shape == [3, 1]


def test_shared_memory_ratios_take_the_best_images_per_request() -> None:
    def row(model: str, batch: int, ips: float) -> dict[str, object]:
        return {"model": model, "concurrency": 64, "request_batch": batch, "images_per_s": ips}

    compiled = bench.COMPILED
    rows = [
        row(compiled, 1, 1000.0),
        row(f"{compiled}+system_shm", 1, 3000.0),
        row(f"{compiled}+system_shm", 8, 9000.0),
        row(f"{compiled}+cuda_shm", 8, 13000.0),
    ]
    ceiling = [{"variant": "fp16 compiled", "mode": "compute only", "images_per_s": 20000.0}]
    out = bench.ratios(rows, ceiling)
    assert out["system_shm_over_compute"]["value"] == pytest.approx(0.45)
    assert not out["system_shm_over_compute"]["met"] and "8 images/request" in out["system_shm_over_compute"]["what"]
    assert out["cuda_shm_over_compute"]["value"] == pytest.approx(0.65)
    assert out["cuda_shm_over_compute"]["target"] == ">= 0.7"
