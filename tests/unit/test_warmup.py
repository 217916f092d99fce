"""Model warmup (``model_warmup`` in the config): inputs built per sample, run ``count`` times before
the model is ready, with a recording fake backend and with real ONNX models through the loader."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from dl_inference.backends.base import Backend
from dl_inference.backends.onnxruntime_backend import OnnxRuntimeBackend
from dl_inference.errors import Code, InternalError, InvalidArgument, ServerError
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.worker.loader import load_model_version
from dl_inference.worker.warmup import build_warmup_inputs, run_warmup
from tests.integration.models import scale_model, write_model

# --- a fake backend that records what warmup asks of it ----------------------------------------


class RecordingBackend(Backend):
    name = "recording"

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.calls: list[tuple[dict[str, np.ndarray], list[str]]] = []
        self.fail_with = fail_with
        self.unloaded = 0

    def load(self, version_dir: Path, config: mc.ModelConfig, device: str = "cpu", device_id: int | None = None):
        return config

    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        self.calls.append((inputs, list(output_names)))
        if self.fail_with is not None:
            raise self.fail_with
        return {}

    def unload(self) -> None:
        self.unloaded += 1


def config_of(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def model_dir(tmp_path: Path) -> Path:
    """``<tmp>/m`` with a version folder; returns the version folder."""
    version_dir = tmp_path / "m" / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    return version_dir


BATCHING = """
name: "m"
max_batch_size: 8
input [
  { name: "x" data_type: TYPE_FP32 dims: [3, 2] },
  { name: "ids" data_type: TYPE_INT64 dims: [5] },
  { name: "flag" data_type: TYPE_BOOL dims: [1] },
  { name: "text" data_type: TYPE_STRING dims: [2] }
]
output [ { name: "y" data_type: TYPE_FP32 dims: [2] }, { name: "z" data_type: TYPE_INT64 dims: [1] } ]
"""

ALL_INPUTS_RANDOM = """
  inputs { key: "x" value: { data_type: TYPE_FP32 dims: [3, 2] random_data: true } }
  inputs { key: "ids" value: { data_type: TYPE_INT64 dims: [5] random_data: true } }
  inputs { key: "flag" value: { data_type: TYPE_BOOL dims: [1] random_data: true } }
  inputs { key: "text" value: { data_type: TYPE_STRING dims: [2] random_data: true } }
"""


# --- count, batch dimension, datatypes, outputs -------------------------------------------------


def test_count_batch_dtypes_and_all_outputs_requested(tmp_path: Path) -> None:
    config = config_of(
        BATCHING
        + f"""
        model_warmup [
          {{ name: "rand" batch_size: 4 count: 3 {ALL_INPUTS_RANDOM} }},
          {{ name: "once" batch_size: 0 count: 0
             inputs {{ key: "x" value: {{ data_type: TYPE_FP32 dims: [3, 2] zero_data: true }} }}
             inputs {{ key: "ids" value: {{ data_type: TYPE_INT64 dims: [5] zero_data: true }} }}
             inputs {{ key: "flag" value: {{ data_type: TYPE_BOOL dims: [1] zero_data: true }} }}
             inputs {{ key: "text" value: {{ data_type: TYPE_STRING dims: [2] zero_data: true }} }} }}
        ]"""
    )
    backend = RecordingBackend()
    took = run_warmup(backend, config, model_dir(tmp_path), rng=np.random.default_rng(0))
    assert took > 0
    assert len(backend.calls) == 4  # count 3, then count 0 -> 1

    first, outputs = backend.calls[0]
    assert outputs == ["y", "z"]  # every output of the model, in config order
    assert list(first) == ["x", "ids", "flag", "text"]
    assert {n: a.shape for n, a in first.items()} == {
        "x": (4, 3, 2), "ids": (4, 5), "flag": (4, 1), "text": (4, 2)
    }  # fmt: skip
    assert {n: a.dtype for n, a in first.items()} == {
        "x": np.float32, "ids": np.int64, "flag": np.bool_, "text": np.object_
    }  # fmt: skip
    # the same inputs are reused for every run of a sample
    assert all(backend.calls[i][0] is first for i in (1, 2))

    zero, outputs = backend.calls[3]
    assert outputs == ["y", "z"]
    assert {n: a.shape for n, a in zero.items()} == {"x": (1, 3, 2), "ids": (1, 5), "flag": (1, 1), "text": (1, 2)}
    assert not zero["x"].any() and not zero["ids"].any() and not zero["flag"].any()
    assert zero["text"].tolist() == [[b"", b""]]


def test_random_values(tmp_path: Path) -> None:
    config = config_of(BATCHING + f'model_warmup [ {{ name: "r" batch_size: 8 {ALL_INPUTS_RANDOM} }} ]')
    inputs = build_warmup_inputs(config, config.model_warmup[0], tmp_path / "m", np.random.default_rng(1))
    x, ids, flag, text = inputs["x"], inputs["ids"], inputs["flag"], inputs["text"]
    assert x.std() > 0.3 and np.isfinite(x).all()  # N(0, 1), not zeros
    assert ids.min() >= 0 and ids.max() < 10 and len(np.unique(ids)) > 1  # small integers
    assert flag.dtype == np.bool_ and flag.shape == (8, 1)
    assert all(isinstance(v, bytes) and 1 <= len(v) <= 16 and v.isascii() for v in text.ravel())
    assert len(set(text.ravel())) > 1


@pytest.mark.parametrize(
    ("type_name", "dtype"),
    [
        ("TYPE_FP16", np.float16),
        ("TYPE_BF16", ml_dtypes.bfloat16),
        ("TYPE_FP64", np.float64),
        ("TYPE_UINT8", np.uint8),
        ("TYPE_INT8", np.int8),
        ("TYPE_UINT64", np.uint64),
        ("TYPE_INT32", np.int32),
    ],
)
def test_every_numeric_type(tmp_path: Path, type_name: str, dtype: object) -> None:
    config = config_of(
        f"""name: "m" input [ {{ name: "a" data_type: {type_name} dims: [4] }} ]
        model_warmup [
          {{ name: "z" inputs {{ key: "a" value: {{ data_type: {type_name} dims: [4] zero_data: true }} }} }},
          {{ name: "r" inputs {{ key: "a" value: {{ data_type: {type_name} dims: [4] random_data: true }} }} }}
        ]"""
    )
    backend = RecordingBackend()
    run_warmup(backend, config, model_dir(tmp_path))
    (zero, _), (rand, _) = backend.calls
    assert zero["a"].dtype == np.dtype(dtype) and rand["a"].dtype == np.dtype(dtype)
    assert zero["a"].shape == rand["a"].shape == (4,)  # max_batch_size 0: no batch dimension
    assert not zero["a"].astype(np.float64).any()


def test_non_batching_model_gets_no_batch_dimension(tmp_path: Path) -> None:
    config = config_of(
        """name: "m" max_batch_size: 0 input [ { name: "x" data_type: TYPE_FP32 dims: [2, 3] } ]
        model_warmup [ { name: "w" batch_size: 1 count: 2
          inputs { key: "x" value: { data_type: TYPE_FP32 dims: [2, 3] zero_data: true } } } ]"""
    )
    backend = RecordingBackend()
    run_warmup(backend, config, model_dir(tmp_path))
    assert [c[0]["x"].shape for c in backend.calls] == [(2, 3), (2, 3)]
    assert backend.calls[0][1] == []  # no outputs in the config: empty means all


def test_no_warmup_does_nothing(tmp_path: Path) -> None:
    backend = RecordingBackend()
    assert run_warmup(backend, config_of('name: "m"'), model_dir(tmp_path)) == 0.0
    assert backend.calls == []


def test_optional_input_may_be_left_out(tmp_path: Path) -> None:
    config = config_of(
        """name: "m" input [ { name: "a" data_type: TYPE_FP32 dims: [1] },
                             { name: "b" data_type: TYPE_FP32 dims: [1] optional: true } ]
        model_warmup [ { name: "w" inputs { key: "a" value: { data_type: TYPE_FP32 dims: [1] zero_data: true } } } ]"""
    )
    backend = RecordingBackend()
    run_warmup(backend, config, model_dir(tmp_path))
    assert list(backend.calls[0][0]) == ["a"]


def test_logs_one_line_per_sample(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = config_of(
        """name: "m" max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP32 dims: [2] } ]
        model_warmup [
          { name: "first" count: 2 batch_size: 2
            inputs { key: "x" value: { data_type: TYPE_FP32 dims: [2] zero_data: true } } },
          { name: "second" inputs { key: "x" value: { data_type: TYPE_FP32 dims: [2] random_data: true } } }
        ]"""
    )
    with caplog.at_level(logging.INFO, logger="dl_inference.worker.warmup"):
        run_warmup(RecordingBackend(), config, model_dir(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.name == "dl_inference.worker.warmup"]
    assert len(lines) == 2
    assert lines[0].startswith("model 'm' warmup 'first': 2 run(s) in ") and "ms" in lines[0]
    assert "x [2,2]" in lines[0]
    assert lines[1].startswith("model 'm' warmup 'second': 1 run(s) in ")


# --- input_data_file -----------------------------------------------------------------------------


def test_input_data_file_is_read_little_endian_and_repeated_per_batch(tmp_path: Path) -> None:
    version_dir = model_dir(tmp_path)
    warmup = tmp_path / "m" / "warmup"
    (warmup / "sub").mkdir(parents=True)
    values = np.arange(6, dtype="<f4") * 1.5
    (warmup / "x.bin").write_bytes(values.tobytes())
    (warmup / "sub" / "ids.bin").write_bytes(np.array([1, -2, 300], dtype="<i8").tobytes())
    strings = [b"hello", b"", b"warm\x00up"]
    (warmup / "text.bin").write_bytes(b"".join(len(s).to_bytes(4, "little") + s for s in strings))
    config = config_of(
        """name: "m" max_batch_size: 4
        input [ { name: "x" data_type: TYPE_FP32 dims: [2, 3] },
                { name: "ids" data_type: TYPE_INT64 dims: [3] },
                { name: "text" data_type: TYPE_STRING dims: [3] } ]
        model_warmup [ { name: "file" batch_size: 3
          inputs { key: "x" value: { data_type: TYPE_FP32 dims: [2, 3] input_data_file: "x.bin" } }
          inputs { key: "ids" value: { data_type: TYPE_INT64 dims: [3] input_data_file: "sub/ids.bin" } }
          inputs { key: "text" value: { data_type: TYPE_STRING dims: [3] input_data_file: "text.bin" } } } ]"""
    )
    backend = RecordingBackend()
    run_warmup(backend, config, version_dir)
    inputs = backend.calls[0][0]
    assert inputs["x"].dtype == np.float32 and inputs["x"].shape == (3, 2, 3)
    for row in inputs["x"]:
        np.testing.assert_array_equal(row, values.reshape(2, 3))
    np.testing.assert_array_equal(inputs["ids"], [[1, -2, 300]] * 3)
    assert inputs["text"].dtype == object and inputs["text"].tolist() == [strings] * 3
    inputs["x"][0, 0, 0] = 99  # a real array, not a read-only broadcast view
    assert inputs["x"][1, 0, 0] == 0


def test_input_data_file_too_short_is_refused(tmp_path: Path) -> None:
    version_dir = model_dir(tmp_path)
    (tmp_path / "m" / "warmup").mkdir()
    (tmp_path / "m" / "warmup" / "x.bin").write_bytes(b"\0" * 10)
    config = config_of(
        """name: "m" input [ { name: "x" data_type: TYPE_FP32 dims: [4] } ]
        model_warmup [ { name: "short"
          inputs { key: "x" value: { data_type: TYPE_FP32 dims: [4] input_data_file: "x.bin" } } } ]"""
    )
    backend = RecordingBackend()
    with pytest.raises(InvalidArgument) as err:
        run_warmup(backend, config, version_dir)
    assert err.value.message.startswith("warmup 'short' failed: ")
    assert "'x.bin' has 10 bytes" in err.value.message and "needs 16" in err.value.message
    assert backend.calls == []


@pytest.mark.parametrize(
    "file_name",
    ["/etc/passwd", "../config.pbtxt", "sub/../../secret.bin", "..", "", "C:\\x.bin", "\\\\host\\share\\x"],
)
def test_input_data_file_is_confined_to_the_warmup_folder(tmp_path: Path, file_name: str) -> None:
    version_dir = model_dir(tmp_path)
    (tmp_path / "m" / "warmup" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "secret.bin").write_bytes(b"\0" * 16)
    config = mc.ModelConfig(name="m")
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[4])
    sample = config.model_warmup.add(name="evil")
    sample.inputs["x"].data_type = mc.TYPE_FP32
    sample.inputs["x"].dims.append(4)
    sample.inputs["x"].input_data_file = file_name
    backend = RecordingBackend()
    with pytest.raises(InvalidArgument) as err:
        run_warmup(backend, config, version_dir)
    assert err.value.message.startswith("warmup 'evil' failed: ")
    assert "input 'x'" in err.value.message and "input_data_file" in err.value.message
    assert backend.calls == []


def test_input_data_file_symlink_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    version_dir = model_dir(tmp_path)
    warmup = tmp_path / "m" / "warmup"
    warmup.mkdir()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 16)
    os.symlink(outside, warmup / "link.bin")
    (warmup / "real.bin").write_bytes(np.ones(4, "<f4").tobytes())
    os.symlink(warmup / "real.bin", warmup / "inside.bin")  # a link that stays inside is fine
    config = config_of(
        """name: "m" input [ { name: "x" data_type: TYPE_FP32 dims: [4] } ]
        model_warmup [
          { name: "ok"
            inputs { key: "x" value: { data_type: TYPE_FP32 dims: [4] input_data_file: "inside.bin" } } },
          { name: "link"
            inputs { key: "x" value: { data_type: TYPE_FP32 dims: [4] input_data_file: "link.bin" } } } ]"""
    )
    backend = RecordingBackend()
    with pytest.raises(InvalidArgument, match=r"^warmup 'link' failed: .*leads outside"):
        run_warmup(backend, config, version_dir)
    assert len(backend.calls) == 1
    np.testing.assert_array_equal(backend.calls[0][0]["x"], np.ones(4, np.float32))


def test_missing_input_data_file(tmp_path: Path) -> None:
    version_dir = model_dir(tmp_path)
    config = config_of(
        """name: "m" input [ { name: "x" data_type: TYPE_FP32 dims: [4] } ]
        model_warmup [ { name: "nofile"
          inputs { key: "x" value: { data_type: TYPE_FP32 dims: [4] input_data_file: "nope.bin" } } } ]"""
    )
    with pytest.raises(InvalidArgument, match=r"^warmup 'nofile' failed: .*'nope.bin' is not a file"):
        run_warmup(RecordingBackend(), config, version_dir)


# --- errors --------------------------------------------------------------------------------------

ONE_INPUT = 'name: "m" max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP32 dims: [2] } ]\n'


@pytest.mark.parametrize(
    ("warmup", "expected"),
    [
        (
            'name: "w" count: 3 inputs { key: "typo" value: { data_type: TYPE_FP32 dims: [2] zero_data: true } }',
            "warmup 'w' failed: model 'm' warmup sample 'w' has no data for input 'x', which the model needs; "
            "the model's inputs are: x (it gives input(s) the model does not have: typo)",
        ),
        (
            'name: "w" inputs { key: "x" value: { data_type: TYPE_FP32 dims: [2] zero_data: true } }'
            ' inputs { key: "extra" value: { data_type: TYPE_FP32 dims: [2] zero_data: true } }',
            "warmup 'w' failed: model 'm' warmup sample 'w' gives input 'extra', which the model does not have",
        ),
        (
            'name: "w" batch_size: 5 inputs { key: "x" value: { data_type: TYPE_FP32 dims: [2] zero_data: true } }',
            "warmup 'w' failed: model 'm' warmup sample 'w': batch_size 5 exceeds the model's max_batch_size 4",
        ),
        (
            'name: "w" inputs { key: "x" value: { data_type: TYPE_INT32 dims: [2] zero_data: true } }',
            "warmup 'w' failed: model 'm' warmup sample 'w' input 'x': data_type TYPE_INT32 but the model's "
            "input is TYPE_FP32",
        ),
        (
            'name: "w" inputs { key: "x" value: { dims: [2] zero_data: true } }',
            "warmup 'w' failed: model 'm' warmup sample 'w' input 'x': data_type is missing",
        ),
        (
            'name: "w" inputs { key: "x" value: { data_type: TYPE_FP32 dims: [-1] zero_data: true } }',
            "warmup 'w' failed: model 'm' warmup sample 'w' input 'x': dims must be fixed sizes >= 0, got [-1]",
        ),
        (
            'name: "w" inputs { key: "x" value: { data_type: TYPE_FP32 dims: [2] } }',
            "warmup 'w' failed: model 'm' warmup sample 'w' input 'x': set one of zero_data: true",
        ),
        (
            'name: "w" inputs { key: "x" value: { data_type: TYPE_FP32 dims: [2] zero_data: false } }',
            "warmup 'w' failed: model 'm' warmup sample 'w' input 'x': set one of zero_data: true",
        ),
    ],
)
def test_bad_samples_fail_before_running(tmp_path: Path, warmup: str, expected: str) -> None:
    config = config_of(ONE_INPUT + f"model_warmup [ {{ {warmup} }} ]")
    backend = RecordingBackend()
    with pytest.raises(InvalidArgument) as err:
        run_warmup(backend, config, model_dir(tmp_path))
    assert err.value.message.startswith(expected), err.value.message
    assert err.value.code is Code.INVALID_ARGUMENT
    assert backend.calls == []


def test_batch_size_on_a_non_batching_model(tmp_path: Path) -> None:
    config = config_of(
        """name: "m" input [ { name: "x" data_type: TYPE_FP32 dims: [2] } ]
        model_warmup [ { name: "b" batch_size: 2
          inputs { key: "x" value: { data_type: TYPE_FP32 dims: [2] zero_data: true } } } ]"""
    )
    with pytest.raises(InvalidArgument, match=r"^warmup 'b' failed: .*does not batch"):
        run_warmup(RecordingBackend(), config, model_dir(tmp_path))


def test_backend_errors_keep_their_code_and_stop_at_the_first_run(tmp_path: Path) -> None:
    config = config_of(
        ONE_INPUT + 'model_warmup [ { name: "w" count: 5 '
        'inputs { key: "x" value: { data_type: TYPE_FP32 dims: [2] zero_data: true } } } ]'
    )
    backend = RecordingBackend(fail_with=ServerError("device lost", Code.UNAVAILABLE))
    with pytest.raises(ServerError) as err:
        run_warmup(backend, config, model_dir(tmp_path))
    assert err.value.message == "warmup 'w' failed: device lost" and err.value.code is Code.UNAVAILABLE
    assert len(backend.calls) == 1

    backend = RecordingBackend(fail_with=RuntimeError("boom"))
    with pytest.raises(InternalError, match=r"^warmup 'w' failed: RuntimeError: boom$"):
        run_warmup(backend, config, model_dir(tmp_path))


# --- real ONNX models -----------------------------------------------------------------------------


def multi_io_model(model_dir: Path, config: str) -> Path:
    """x FP32 [-1, 4] -> y = 2x; ids INT64 [-1, 3] -> ids_out; s STRING [-1, 2] -> s_out."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "k"], ["y"]),
            helper.make_node("Identity", ["ids"], ["ids_out"]),
            helper.make_node("Identity", ["s"], ["s_out"]),
        ],
        "multi",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 3]),
            helper.make_tensor_value_info("s", TensorProto.STRING, ["b", 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["b", 3]),
            helper.make_tensor_value_info("s_out", TensorProto.STRING, ["b", 2]),
        ],
        [numpy_helper.from_array(np.array(2.0, np.float32), "k")],
    )
    return write_model(model_dir, graph, config=config)


class SpyOnnx(OnnxRuntimeBackend):
    """The real backend, recording the outputs each call asked for and what it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[dict[str, tuple[int, ...]], list[str], dict[str, np.ndarray]]] = []

    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        result = super().infer(inputs, output_names)
        self.seen.append(({n: a.shape for n, a in inputs.items()}, list(output_names), result))
        return result


def test_real_onnx_model_warms_with_every_kind_of_data(tmp_path: Path) -> None:
    mdir = tmp_path / "repo" / "multi"
    (mdir / "warmup").mkdir(parents=True)
    (mdir / "warmup" / "ids.bin").write_bytes(np.array([7, 8, 9], "<i8").tobytes())
    multi_io_model(
        mdir,
        """max_batch_size: 8
        model_warmup [ { name: "mixed" batch_size: 3 count: 2
          inputs { key: "x" value: { data_type: TYPE_FP32 dims: [4] random_data: true } }
          inputs { key: "ids" value: { data_type: TYPE_INT64 dims: [3] input_data_file: "ids.bin" } }
          inputs { key: "s" value: { data_type: TYPE_STRING dims: [2] random_data: true } } } ]""",
    )
    backend = SpyOnnx()
    config = text_format.Parse((mdir / "config.pbtxt").read_text(), mc.ModelConfig(name="multi"))
    completed = backend.load(mdir / "1", config)
    took = run_warmup(backend, completed, mdir / "1")
    assert took > 0 and len(backend.seen) == 2
    shapes, outputs, result = backend.seen[0]
    assert shapes == {"x": (3, 4), "ids": (3, 3), "s": (3, 2)}
    assert sorted(outputs) == ["ids_out", "s_out", "y"] and sorted(result) == ["ids_out", "s_out", "y"]
    np.testing.assert_array_equal(result["ids_out"], [[7, 8, 9]] * 3)
    assert all(isinstance(v, bytes) and v for v in result["s_out"].ravel())
    backend.unload()


def test_loader_runs_warmup_and_fails_the_load_on_a_bad_sample(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    scale_model(repo / "good", 3.0)
    (repo / "good" / "config.pbtxt").write_text(
        """max_batch_size: 4
        model_warmup [ { name: "zeros" batch_size: 4 count: 3
          inputs { key: "x" value: { data_type: TYPE_FP32 dims: [4] zero_data: true } } } ]"""
    )
    with caplog.at_level(logging.INFO):
        loaded = load_model_version(repo, "good", None)
    assert loaded.config.model_warmup[0].name == "zeros"
    assert any("warmup 'zeros': 3 run(s)" in r.getMessage() for r in caplog.records)
    loaded.runner.backend.unload()

    scale_model(repo / "bad", 3.0)
    (repo / "bad" / "config.pbtxt").write_text(
        """max_batch_size: 4
        model_warmup [ { name: "typo" count: 3
          inputs { key: "X" value: { data_type: TYPE_FP32 dims: [4] zero_data: true } } } ]"""
    )
    unloaded: list[bool] = []
    original = OnnxRuntimeBackend.unload

    def spy_unload(self: OnnxRuntimeBackend) -> None:
        unloaded.append(True)
        original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OnnxRuntimeBackend, "unload", spy_unload)
        with pytest.raises(InvalidArgument) as err:
            load_model_version(repo, "bad", None)
    assert err.value.message.startswith("warmup 'typo' failed: ")
    assert "input 'x'" in err.value.message and "X" in err.value.message
    assert unloaded  # the half-loaded backend is released


def test_real_backend_shape_error_fails_warmup(tmp_path: Path) -> None:
    mdir = tmp_path / "repo" / "scale"
    scale_model(mdir, 2.0)
    config = mc.ModelConfig(name="scale")
    backend = OnnxRuntimeBackend()
    completed = backend.load(mdir / "1", config)
    sample = completed.model_warmup.add(name="wrong_dims", count=2)
    sample.inputs["x"].data_type = mc.TYPE_FP32
    sample.inputs["x"].dims.extend([5])
    sample.inputs["x"].zero_data = True
    with pytest.raises(InvalidArgument, match=r"^warmup 'wrong_dims' failed: model 'scale': input 'x'"):
        run_warmup(backend, completed, mdir / "1")
    backend.unload()
