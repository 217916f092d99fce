"""load_tests.compare_mlserver: repositories, settings, output comparison, tables; the MLServer runtime
itself only when ``.venv-mlserver`` exists (``make mlserver-env``), so CI does not need MLServer."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from load_tests import compare_mlserver as cm
from load_tests.loadgen import raw_bytes


def test_mlserver_repository_layout(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    settings = cm.write_mlserver_repository(tmp_path / "pw0", {"simple": model}, (1001, 1002, 1003), 0)
    on_disk = json.loads((tmp_path / "pw0" / "settings.json").read_text())
    assert on_disk == settings
    assert settings["parallel_workers"] == 0
    assert (settings["http_port"], settings["grpc_port"], settings["metrics_port"]) == (1001, 1002, 1003)
    assert settings["debug"] is False and settings["gzip_enabled"] is False
    ms = json.loads((tmp_path / "pw0" / "models" / "simple" / "model-settings.json").read_text())
    assert ms == {"name": "simple", "implementation": cm.RUNTIME, "parameters": {"uri": str(model.resolve())}}


def test_models_build_and_reference_outputs(tmp_path: Path) -> None:
    paths = cm.build_ours_repository(tmp_path / "repo", ["simple", "large", "bytes"])
    for name, path in paths.items():
        assert path.is_file()
        assert (tmp_path / "repo" / name / "config.pbtxt").is_file()
    large = cm.reference_outputs(paths["large"], cm._sample_inputs("large"))
    x = cm._sample_inputs("large")[0][2]
    np.testing.assert_array_equal(large["y"], 2 * x)
    inputs = cm._sample_inputs("bytes")
    echoed = cm.reference_outputs(paths["bytes"], inputs)["echo"]
    assert echoed.shape == (2, cm.BYTES_WIDTH)
    assert list(echoed.reshape(-1)) == list(inputs[0][2].reshape(-1))


def test_decode_raw_round_trip() -> None:
    words = np.empty((2, 2), dtype=object)
    words.flat[:] = [b"a", b"", "é".encode(), b"xyz"]
    back = cm.decode_raw("BYTES", [2, 2], raw_bytes("BYTES", words))
    assert back.tolist() == words.tolist()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(cm.decode_raw("FP32", [2, 3], raw_bytes("FP32", x)), x)


def test_compare_outputs() -> None:
    a = {"y": np.array([[1.0, 2.0]], dtype=np.float32)}
    assert cm.compare_outputs(a, {"y": a["y"] + 1e-7})[0]
    ok, detail = cm.compare_outputs(a, {"y": a["y"] + 0.1})
    assert not ok and "max abs diff" in detail
    assert not cm.compare_outputs(a, {"z": a["y"]})[0]
    assert not cm.compare_outputs(a, {"y": a["y"].reshape(2, 1)})[0]
    s = np.array([[b"a", b"b"]], dtype=object)
    assert cm.compare_outputs({"o": s}, {"o": s.copy()})[0]
    assert not cm.compare_outputs({"o": s}, {"o": np.array([[b"a", b"c"]], dtype=object)})[0]


def _run(target: str, rps: float, p50: float, rnd: int) -> dict:
    return {
        "model": "simple",
        "protocol": "grpc",
        "concurrency": 1,
        "target": target,
        "round": rnd,
        "throughput_rps": rps,
        "latency_ms": {"p50": p50, "p99": 2 * p50},
        "errors": 0,
        "server_cpu_cores": 0.5,
        "client_cpu_util": 0.2,
        "idle_servers_cpu_cores": {"x": 0.001},
    }


def test_summary_ratios_and_table() -> None:
    runs = [_run("ours", v, 1.0, i) for i, v in enumerate((100, 300, 200))]
    runs += [_run("mlserver-pw1", v, 2.0, i) for i, v in enumerate((100, 50, 150))]
    rows = cm.summarize(runs)
    by = {r["target"]: r for r in rows}
    assert by["ours"]["throughput_rps"] == 200 and by["mlserver-pw1"]["throughput_rps"] == 100
    (ratio,) = cm.ratios(rows)
    assert ratio["vs"] == "mlserver-pw1" and ratio["throughput"] == 2.0 and ratio["p50"] == 0.5
    text = cm.format_tables(rows, [ratio], ["simple"])
    assert "mlserver-pw1" in text and "2.00  0.50  0.50" in text


MLSERVER_PYTHON = cm.MLSERVER_VENV / "bin" / "python"


@pytest.mark.skipif(not MLSERVER_PYTHON.exists(), reason=".venv-mlserver missing (make mlserver-env)")
def test_runtime_in_mlserver_venv(tmp_path: Path) -> None:
    """load() and predict() of load_tests.mlserver_runtime, inside MLServer's venv, without a server."""
    paths = cm.build_ours_repository(tmp_path / "repo", ["simple", "bytes"])
    x = cm._sample_inputs("simple")[0][2]
    expected = cm.reference_outputs(paths["simple"], cm._sample_inputs("simple"))["y"]
    script = textwrap.dedent(
        f"""
        import asyncio, json, struct
        import numpy as np
        from mlserver.settings import ModelSettings
        from mlserver.types import InferenceRequest, RequestInput
        from load_tests.mlserver_runtime import OnnxRuntimeModel

        async def main():
            out = {{}}
            m = OnnxRuntimeModel(ModelSettings(name="simple", implementation=OnnxRuntimeModel,
                                               parameters={{"uri": {str(paths["simple"])!r}}}))
            assert await m.load()
            out["inputs"] = [(t.name, t.datatype, t.shape) for t in m.inputs]
            x = {x.tolist()!r}
            req = InferenceRequest(inputs=[RequestInput(name="x", datatype="FP32", shape=[2, 16],
                                                        data=[v for row in x for v in row])])
            res = await m.predict(req)
            out["y"] = [res.outputs[0].name, res.outputs[0].shape, list(res.outputs[0].data.root)]
            b = OnnxRuntimeModel(ModelSettings(name="bytes", implementation=OnnxRuntimeModel,
                                               parameters={{"uri": {str(paths["bytes"])!r}}}))
            assert await b.load()
            words = [("w%d-é" % i).encode() for i in range(16)]
            res = await b.predict(InferenceRequest(inputs=[RequestInput(name="text", datatype="BYTES",
                                                                         shape=[1, 16], data=words)]))
            echo = res.outputs[0]
            got = [v.decode() if isinstance(v, bytes) else v for v in echo.data.root]
            out["echo"] = [echo.datatype, echo.shape, [w.decode() == v for w, v in zip(words, got)]]
            print(json.dumps(out))

        asyncio.run(main())
        """
    )
    proc = subprocess.run(
        [str(MLSERVER_PYTHON), "-c", script],
        cwd=cm.REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(cm.REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["inputs"] == [["x", "FP32", [-1, 16]]]
    name, shape, data = out["y"]
    assert name == "y" and shape == [2, 4]
    np.testing.assert_allclose(np.array(data, dtype=np.float32).reshape(2, 4), expected, rtol=1e-6)
    datatype, shape, same = out["echo"]
    assert datatype == "BYTES" and shape == [1, 16] and all(same)
