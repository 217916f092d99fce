"""load_tests.bench_tensorflow_cpu's own logic: the configs it writes, its run plan, medians and ratios."""

from __future__ import annotations

import os

from google.protobuf import text_format

from dl_inference.protocol.generated import model_config_pb2 as mc
from load_tests.bench_tensorflow_cpu import VARIANTS, median_rows, points, ratios, variant_config


def _config(variant: str, threads: int = 2) -> mc.ModelConfig:
    return text_format.Parse(variant_config(variant, threads), mc.ModelConfig())


def test_configs_parse_and_carry_the_settings() -> None:
    for variant in VARIANTS:
        config = _config(variant)
        assert config.max_batch_size == 8 and not config.HasField("dynamic_batching")
    assert _config("onnxruntime").backend == "onnxruntime"
    assert _config("onnxruntime", 3).parameters["intra_op_thread_count"].string_value == "3"
    assert _config("tf_onednn_on").parameters["onednn"].string_value == "on"
    assert _config("tf_onednn_off").parameters["onednn"].string_value == "off"
    assert "onednn" not in _config("tf_default").parameters
    assert _config("tf_itex").parameters["worker_environment"].string_value == "itex"
    assert _config("tf_2x1thread").instance_group[0].count == 2
    pinned = _config("tf_1thread_pinned").parameters
    assert pinned["cpu_affinity"].string_value == str(max(os.sched_getaffinity(0)))
    assert pinned["intra_op_threads"].string_value == "1"


def test_points_follow_the_request_batches() -> None:
    assert points(["tf_default", "tf_2x1thread"], [1, 8]) == [
        ("tf_default", 1, 1), ("tf_default", 8, 1), ("tf_default", 1, 2), ("tf_2x1thread", 1, 2)
    ]  # fmt: skip
    assert points(["tf_default"], [8]) == [("tf_default", 8, 1)]


def _row(model: str, batch: int, conc: int, ips: float, p50: float) -> dict:
    return {"model": model, "request_batch": batch, "concurrency": conc, "images_per_s": ips, "p50_ms": p50,
            "p99_ms": p50 * 2, "avg_batch": float(batch), "errors": 0}  # fmt: skip


def test_medians_and_ratios() -> None:
    rows = [
        _row("tf_onednn_off", 1, 1, 10.0, 100.0), _row("tf_onednn_off", 1, 1, 12.0, 90.0),
        _row("tf_onednn_off", 1, 1, 11.0, 95.0), _row("tf_onednn_on", 1, 1, 16.5, 60.0),
        _row("tf_default", 1, 2, 20.0, 100.0), _row("tf_2x1thread", 1, 2, 25.0, 80.0),
    ]  # fmt: skip
    medians = median_rows(rows)
    off = next(r for r in medians if r["model"] == "tf_onednn_off")
    assert (off["images_per_s"], off["p50_ms"], off["rounds"]) == (11.0, 95.0, 3)
    got = {(r["variant"], r["over"], r["concurrency"]): r for r in ratios(medians)}
    assert got[("tf_onednn_on", "tf_onednn_off", 1)]["images_per_s"] == 1.5
    assert abs(got[("tf_onednn_on", "tf_onednn_off", 1)]["p50"] - 60 / 95) < 1e-12
    assert got[("tf_2x1thread", "tf_default", 2)]["images_per_s"] == 1.25
    assert ("tf_itex", "tf_onednn_off", 1) not in got  # nothing measured: no ratio
