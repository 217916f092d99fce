"""The PyTorch backend on CPU: every model format loads and matches eager; pickle refused by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from google.protobuf import text_format  # noqa: E402

from dl_inference.backends.base import get_backend  # noqa: E402
from dl_inference.errors import InvalidArgument, ServerError  # noqa: E402
from dl_inference.protocol.generated.model_config_pb2 import DataType, ModelConfig  # noqa: E402
from dl_inference.repository.config import backend_name  # noqa: E402

MODEL_PY = (Path(__file__).parent / "torch_net.py").read_text()

CONFIG = """
name: "net"
backend: "pytorch"
max_batch_size: 16
input [
  { name: "x" data_type: TYPE_FP32 dims: [8] },
  { name: "y" data_type: TYPE_FP32 dims: [4] }
]
output [
  { name: "h" data_type: TYPE_FP32 dims: [4] },
  { name: "total" data_type: TYPE_FP32 dims: [1] }
]
"""


def _net() -> torch.nn.Module:
    from tests.unit.torch_net import create_model

    torch.manual_seed(0)
    net = create_model()
    with torch.no_grad():
        net.scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    return net.eval()


def _inputs(rows: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x": rng.standard_normal((rows, 8)).astype(np.float32),
        "y": rng.standard_normal((rows, 4)).astype(np.float32),
    }


def _expected(net: torch.nn.Module, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        h, total = net(torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["y"]))
    return h.numpy(), total.numpy()


def parse_pbtxt(text: str) -> ModelConfig:
    return text_format.Parse(text, ModelConfig())


def _export(net: torch.nn.Module) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=16)
    inputs = _inputs()
    example = (torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["y"]))
    return torch.export.export(net, example, dynamic_shapes={"x": {0: batch}, "y": {0: batch}})


def _config(extra: str = "") -> ModelConfig:
    return parse_pbtxt(CONFIG + extra)


def _load(version_dir: Path, extra: str = "") -> object:
    backend = get_backend("pytorch")
    backend.load(version_dir, _config(extra))
    return backend


def _write_model_py(version_dir: Path, net: torch.nn.Module, weights: str) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.py").write_text(MODEL_PY)
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(net.state_dict(), str(version_dir / "model.safetensors"))
    elif weights == "pt":
        torch.save(net.state_dict(), version_dir / "model.pt")


def _check(backend: object, net: torch.nn.Module, rtol: float = 1e-5) -> None:
    inputs = _inputs()
    out = backend.infer(inputs, [])  # type: ignore[attr-defined]
    h, total = _expected(net, inputs)
    assert set(out) == {"h", "total"}
    assert out["h"].dtype == np.float32 and out["h"].shape == (3, 4)
    np.testing.assert_allclose(out["h"], h, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(out["total"], total, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("weights", ["safetensors", "pt"])
def test_model_py_with_a_state_dict(tmp_path: Path, weights: str) -> None:
    net = _net()
    _write_model_py(tmp_path / "1", net, weights)
    assert backend_name(ModelConfig(name="net"), tmp_path / "1") == "pytorch"
    backend = _load(tmp_path / "1")
    assert weights in backend.format  # type: ignore[attr-defined]
    _check(backend, net)
    backend.unload()  # type: ignore[attr-defined]
    backend.unload()  # type: ignore[attr-defined]


def test_model_py_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.py").write_text(MODEL_PY)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "1" / "model.pt")
    with pytest.raises(InvalidArgument, match=r"model\.pt does not fit the module in model\.py"):
        _load(tmp_path / "1")


def test_model_py_without_a_factory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.py").write_text("x = 1\n")
    with pytest.raises(InvalidArgument, match=r"must define create_model\(\) or a class Model"):
        _load(tmp_path / "1")


def test_torch_export_program(tmp_path: Path) -> None:
    net = _net()
    program = _export(net)
    (tmp_path / "1").mkdir()
    torch.export.save(program, str(tmp_path / "1" / "model.pt2"))
    backend = _load(tmp_path / "1")
    assert backend.format == "torch.export program"  # type: ignore[attr-defined]
    _check(backend, net)
    out = backend.infer(_inputs(7), ["total"])  # type: ignore[attr-defined]
    assert set(out) == {"total"} and out["total"].shape == (7, 1)


def test_torchscript(tmp_path: Path) -> None:
    net = _net()
    (tmp_path / "1").mkdir()
    torch.jit.script(net).save(str(tmp_path / "1" / "model.pt"))
    backend = _load(tmp_path / "1")
    assert backend.format == "TorchScript"  # type: ignore[attr-defined]
    _check(backend, net)


def test_pickled_module_is_refused_unless_opted_in(tmp_path: Path) -> None:
    net = _net()
    (tmp_path / "1").mkdir()
    torch.save(net, tmp_path / "1" / "model.pth")
    with pytest.raises(InvalidArgument, match="arbitrary code execution") as info:
        _load(tmp_path / "1")
    assert "allow_pickle" in info.value.message and "torch.export" in info.value.message
    backend = _load(tmp_path / "1", 'parameters { key: "allow_pickle" value { string_value: "true" } }')
    _check(backend, net)


@pytest.mark.parametrize("precision, rtol", [("fp16", 2e-2), ("bf16", 1e-1)])
def test_reduced_precision_casts_inputs_and_outputs(tmp_path: Path, precision: str, rtol: float) -> None:
    net = _net()
    _write_model_py(tmp_path / "1", net, "safetensors")
    backend = _load(tmp_path / "1", f'parameters {{ key: "precision" value {{ string_value: "{precision}" }} }}')
    assert backend.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]  # type: ignore[attr-defined]
    _check(backend, net, rtol=rtol)


def test_compiled_with_batch_buckets_pads_and_chunks(tmp_path: Path) -> None:
    net = _net()
    _write_model_py(tmp_path / "1", net, "safetensors")
    extra = (
        'parameters { key: "compile" value { string_value: "default" } }\n'
        'parameters { key: "compile_batch_sizes" value { string_value: "2,4" } }'
    )
    backend = _load(tmp_path / "1", extra)
    assert backend.buckets == [2, 4]  # type: ignore[attr-defined]
    for rows in (1, 3, 4, 9):  # padded to 2, 4, 4; 9 runs as 4 + 4 + 1(->2)
        inputs = _inputs(rows)
        out = backend.infer(inputs, [])  # type: ignore[attr-defined]
        h, total = _expected(net, inputs)
        assert out["h"].shape == (rows, 4)
        np.testing.assert_allclose(out["h"], h, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["total"], total, rtol=1e-4, atol=1e-5)


def test_bad_parameters_and_inputs_are_named(tmp_path: Path) -> None:
    net = _net()
    _write_model_py(tmp_path / "1", net, "safetensors")
    with pytest.raises(InvalidArgument, match="'precision' must be fp32, fp16 or bf16, got 'fp8'"):
        _load(tmp_path / "1", 'parameters { key: "precision" value { string_value: "fp8" } }')
    with pytest.raises(InvalidArgument, match="'compile' must be one of"):
        _load(tmp_path / "1", 'parameters { key: "compile" value { string_value: "fast" } }')
    with pytest.raises(InvalidArgument, match="compile_batch_sizes 1,32 must be between 1 and max_batch_size 16"):
        _load(tmp_path / "1", 'parameters { key: "compile_batch_sizes" value { string_value: "1,32" } }')
    bytes_config = CONFIG.replace(
        '{ name: "x" data_type: TYPE_FP32 dims: [8] }', '{ name: "x" data_type: TYPE_STRING dims: [1] }'
    )
    with pytest.raises(InvalidArgument, match="input 'x' is BYTES; PyTorch models take numeric tensors"):
        get_backend("pytorch").load(tmp_path / "1", parse_pbtxt(bytes_config))
    backend = _load(tmp_path / "1")
    with pytest.raises(InvalidArgument, match="input 'y' is missing"):
        backend.infer({"x": _inputs()["x"]}, [])  # type: ignore[attr-defined]


def test_gpu_instance_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _write_model_py(tmp_path / "1", _net(), "safetensors")
    with pytest.raises(ServerError, match=r"asks for a GPU but this worker's torch .* sees no CUDA device"):
        get_backend("pytorch").load(tmp_path / "1", _config(), "gpu", 0)


def test_no_model_file(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    with pytest.raises(InvalidArgument, match="no PyTorch model in"):
        _load(tmp_path / "1")


def test_aotinductor_package(tmp_path: Path) -> None:
    net = _net()
    program = _export(net)
    (tmp_path / "1").mkdir()
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "1" / "model.pt2"))
    backend = _load(tmp_path / "1")
    assert backend.format == "aoti"  # type: ignore[attr-defined]
    _check(backend, net, rtol=1e-4)
    with pytest.raises(InvalidArgument, match="an AOTInductor package is compiled for its device and precision"):
        _load(tmp_path / "1", 'parameters { key: "precision" value { string_value: "fp16" } }')


def test_torch_export_program_without_a_config_completes_it_from_its_signature(tmp_path: Path) -> None:
    net = _net()
    (tmp_path / "1").mkdir()
    torch.export.save(_export(net), str(tmp_path / "1" / "model.pt2"))
    backend = get_backend("pytorch")
    completed = backend.load(tmp_path / "1", ModelConfig(name="net"))
    assert completed.max_batch_size == 8  # every tensor's first dimension is dynamic: batching
    got = [(t.name, DataType.Name(t.data_type), list(t.dims)) for t in completed.input]
    assert got == [("x", "TYPE_FP32", [8]), ("y", "TYPE_FP32", [4])]
    got = [(t.name, DataType.Name(t.data_type), list(t.dims)) for t in completed.output]
    assert got == [("output__0", "TYPE_FP32", [4]), ("output__1", "TYPE_FP32", [1])]
    h, total = _expected(net, _inputs(5))
    out = backend.infer(_inputs(5), [])
    np.testing.assert_allclose(out["output__0"], h, rtol=1e-5)
    np.testing.assert_allclose(out["output__1"], total, rtol=1e-5)


def test_a_model_without_tensor_names_and_no_config_fails_the_load_saying_what_to_list(tmp_path: Path) -> None:
    from dl_inference.worker.loader import load_model_version

    net = _net()
    (tmp_path / "ts" / "1").mkdir(parents=True)
    torch.jit.script(net).save(str(tmp_path / "ts" / "1" / "model.pt"))
    with pytest.raises(InvalidArgument, match=r"model 'ts': no inputs and outputs.*list every input and output"):
        load_model_version(tmp_path, "ts", None)


@pytest.mark.parametrize(
    ("flags", "precision", "warned"),
    [
        (frozenset({"avx2"}), "bf16", True),
        (frozenset({"avx2", "avx512_bf16"}), "bf16", False),
        (frozenset({"amx_bf16"}), "fp16", True),
        (frozenset({"avx2"}), "fp32", False),
    ],
)
def test_reduced_precision_on_a_cpu_without_it_says_it_is_emulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    flags: frozenset[str], precision: str, warned: bool,
) -> None:  # fmt: skip
    from dl_inference import cpu_features

    monkeypatch.setattr(cpu_features, "cpu_info", lambda: ("Test CPU 9000", flags))
    _write_model_py(tmp_path / "1", _net(), "safetensors")
    with caplog.at_level("WARNING"):
        _load(tmp_path / "1", f'parameters {{ key: "precision" value {{ string_value: "{precision}" }} }}')
    messages = [r.getMessage() for r in caplog.records if "is emulated" in r.getMessage()]
    assert bool(messages) == warned, messages
    if warned:
        assert f"precision {precision} on this CPU (Test CPU 9000)" in messages[0] and "slower than fp32" in messages[0]


CONV_PY = """
import torch


def create_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
"""
CONV_CONFIG = """
name: "conv"
backend: "pytorch"
max_batch_size: 4
input [ { name: "image" data_type: TYPE_FP32 dims: [3, 16, 16] } ]
output [ { name: "output__0" data_type: TYPE_FP32 dims: [2, 16, 16] } ]
"""


def test_channels_last_gives_the_same_answers(tmp_path: Path) -> None:
    version = tmp_path / "1"
    version.mkdir()
    (version / "model.py").write_text(CONV_PY)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    results = {}
    for layout in ("false", "true"):
        backend = get_backend("pytorch")
        config = parse_pbtxt(
            CONV_CONFIG + f'parameters {{ key: "channels_last" value {{ string_value: "{layout}" }} }}'
        )
        backend.load(version, config)
        assert backend.channels_last is (layout == "true")  # type: ignore[attr-defined]
        if layout == "true":
            weight = next(backend.module.parameters())  # type: ignore[attr-defined]
            assert weight.is_contiguous(memory_format=torch.channels_last)
        results[layout] = backend.infer({"image": x}, [])["output__0"]
    assert results["true"].shape == (2, 2, 16, 16)
    np.testing.assert_allclose(results["true"], results["false"], rtol=1e-5, atol=1e-5)
