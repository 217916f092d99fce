"""``dl-inference convert tf-to-onnx``: small Keras 3 models exported as SavedModels, converted with
tf2onnx, checked against TensorFlow; the CLI end to end; the errors; a parity check that fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from dl_inference import cli  # noqa: E402
from dl_inference.convert.tensorflow import to_onnx  # noqa: E402
from dl_inference.convert.tensorflow.errors import ConversionFailed, ParityMismatch, TensorFlowUnavailable  # noqa: E402
from dl_inference.convert.tensorflow.parity import ParitySettings, check_parity, compare_output  # noqa: E402
from dl_inference.convert.tensorflow.savedmodel import load_signature  # noqa: E402
from dl_inference.convert.tensorflow.to_onnx import ConvertOptions, convert_savedmodel  # noqa: E402
from dl_inference.errors import InvalidArgument  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PHASES = ("loading", "freezing", "converting", "optimizing", "checking")


def _dense(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    x = keras.Input((8,), name="features")
    h = keras.layers.Dense(16, activation="relu")(x)
    return keras.Model(x, keras.layers.Dense(4)(h))


def _conv() -> keras.Model:
    keras.utils.set_random_seed(1)
    x = keras.Input((12, 12, 3), name="image")
    h = keras.layers.Conv2D(4, 3, activation="relu")(x)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(x, keras.layers.Dense(3, activation="softmax")(h))


def _two_in_two_out() -> keras.Model:
    keras.utils.set_random_seed(2)
    a = keras.Input((4,), name="values")  # signature keys sort ids < values: order differs
    b = keras.Input((3,), name="ids", dtype="int32")
    e = keras.layers.Flatten()(keras.layers.Embedding(10, 2)(b))
    h = keras.layers.Concatenate()([a, e])
    score = keras.layers.Dense(2)(h)
    prob = keras.layers.Dense(1, activation="sigmoid")(h)
    return keras.Model([a, b], {"score": score, "prob": prob})


def _embedding() -> keras.Model:
    keras.utils.set_random_seed(3)
    tokens = keras.Input((6,), name="tokens", dtype="int64")
    h = keras.layers.Embedding(10, 8)(tokens)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(2)(h))


MODELS = {"dense": _dense, "conv": _conv, "two_io": _two_in_two_out, "embedding": _embedding}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model exported (Keras 3 ``model.export``) as a SavedModel; plus ``dense_other`` (other weights)."""
    root = tmp_path_factory.mktemp("savedmodels")
    paths = {}
    for name, build in [*MODELS.items(), ("dense_other", lambda: _dense(seed=7))]:
        paths[name] = root / name
        build().export(str(paths[name]), verbose=False)
    return paths


def _signature_names(path: Path) -> tuple[list[str], list[str]]:
    sig = load_signature(path, "serving_default", "serve")
    return [t.name for t in sig.inputs], [t.name for t in sig.outputs]


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_keeps_names_dynamic_batch_and_parity(saved: dict[str, Path], tmp_path: Path, name: str) -> None:
    lines: list[str] = []
    out = tmp_path / f"{name}.onnx"
    result = convert_savedmodel(saved[name], out, emit=lines.append)

    assert result.parity is not None and result.parity.ok, result.parity
    assert result.parity.batches == [1, 3]
    ins, outs = _signature_names(saved[name])
    model = onnx.load(str(out))
    assert sorted(i.name for i in model.graph.input) == sorted(ins)
    assert sorted(o.name for o in model.graph.output) == sorted(outs)
    if name == "two_io":
        assert ins == ["ids", "values"] and sorted(outs) == ["prob", "score"]
    for value in [*model.graph.input, *model.graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param and not first.HasField("dim_value"), f"{value.name}: batch dimension not symbolic"
    assert model.opset_import[0].version == 17
    for phase in PHASES:
        assert any(f"] {phase}" in line for line in lines), (phase, lines)
    assert all(line.startswith("tf-to-onnx: [") for line in lines)

    # A batch size the check did not use: the dynamic batch really is dynamic.
    sig = load_signature(saved[name], "serving_default", "serve")
    rng = np.random.default_rng(5)
    feeds = {
        t.name: rng.integers(0, 10, (5, *t.shape[1:])).astype(t.dtype)
        if t.dtype.kind in "iu"
        else rng.standard_normal((5, *t.shape[1:])).astype(t.dtype)
        for t in sig.inputs
    }
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for key, expected in sig(feeds).items():
        np.testing.assert_allclose(got[key], expected, rtol=1e-4, atol=1e-5)


def test_cli_end_to_end_subprocess(saved: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sub" / "model.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "dl_inference", "convert", "tf-to-onnx", str(saved["conv"]), str(out),
         "--opset", "15", "--seed", "3", "--batch-sizes", "2,4"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for phase in PHASES:
        assert any(line.startswith("tf-to-onnx: [") and f"] {phase}" in line for line in lines), proc.stdout
    assert any("parity output 'output_0' (batch 4)" in line and line.endswith("-> ok") for line in lines)
    assert lines[-1].startswith(f"wrote {out} (") and "inputs [image], outputs [output_0]; parity ok" in lines[-1]
    assert onnx.load(str(out)).opset_import[0].version == 15
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]  # no temporary file left


def test_cli_repository_version_directory(saved: dict[str, Path], tmp_path: Path, capsys) -> None:
    version = tmp_path / "dense" / "1"
    version.mkdir(parents=True)
    (version / "model.savedmodel").symlink_to(saved["dense"], target_is_directory=True)
    assert cli.main(["convert", "tf-to-onnx", str(version), "--no-check"]) == 0
    out = capsys.readouterr().out
    assert (version / "model.onnx").is_file()
    assert "parity check off" in out and "parity not checked" in out


def test_not_a_savedmodel(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.keras").write_bytes(b"zip")
    with pytest.raises(InvalidArgument, match=r"holds no saved_model\.pb"):
        convert_savedmodel(tmp_path / "empty", tmp_path / "x.onnx")
    with pytest.raises(InvalidArgument, match=r"Keras model file: export a SavedModel first with model\.export"):
        convert_savedmodel(tmp_path / "model.keras", tmp_path / "x.onnx")
    assert cli.main(["convert", "tf-to-onnx", str(tmp_path / "missing"), str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_unknown_signature_lists_the_available_ones(saved: dict[str, Path], tmp_path: Path, capsys) -> None:
    args = ["convert", "tf-to-onnx", str(saved["dense"]), str(tmp_path / "x.onnx"), "--signature", "predict"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "has no signature 'predict'; its signatures: serve, serving_default" in err
    # ...and Keras' other signature converts too
    result = convert_savedmodel(saved["dense"], tmp_path / "serve.onnx", ConvertOptions(signature="serve"))
    assert result.parity is not None and result.parity.ok


def test_bad_opset_is_refused_before_loading(saved: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"opset 99 is not supported: tf2onnx .* opsets 13\.\.18"):
        convert_savedmodel(saved["dense"], tmp_path / "x.onnx", ConvertOptions(opset=99), emit=pytest.fail)


def _tamper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the converter produce a wrong model: shift the largest weight tensor by 0.5."""
    real = to_onnx._optimize

    def wrong(graph, sig):
        model = real(graph, sig)
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(0.5), init.name))
        return model

    monkeypatch.setattr(to_onnx, "_optimize", wrong)


def test_broken_parity_is_caught(saved: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous, good model")
    kept = tmp_path / "model.onnx.parity-failed"
    _tamper(monkeypatch)
    with pytest.raises(ParityMismatch) as info:
        convert_savedmodel(saved["dense"], out)
    message = info.value.message
    assert "parity check failed" in message and "output 'output_0' (batch 1): max abs diff" in message
    assert f"{out} was not written; the rejected model is kept as {kept}" in message
    assert out.read_bytes() == b"the previous, good model"
    assert kept.is_file() and not info.value.report.ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.parity-failed"]

    # The CLI: exit status 1 and the message naming the output and the difference.
    assert cli.main(["convert", "tf-to-onnx", str(saved["dense"]), str(out)]) == 1
    captured = capsys.readouterr()
    assert "-> FAILED" in captured.out
    assert "dl-inference: parity check failed" in captured.err and "output 'output_0'" in captured.err

    # A good conversion replaces the output and clears the leftover.
    monkeypatch.undo()
    convert_savedmodel(saved["dense"], out)
    assert not kept.exists() and onnx.load(str(out)).graph.input[0].name == "features"


def test_check_parity_against_a_different_savedmodel(saved: dict[str, Path], tmp_path: Path) -> None:
    onnx_path = tmp_path / "other.onnx"
    convert_savedmodel(saved["dense_other"], onnx_path)
    report = check_parity(load_signature(saved["dense"], "serving_default", "serve"), onnx_path, ParitySettings())
    assert not report.ok and len(report.failures) == 2  # batch 1 and batch 3
    assert report.failures[0].max_abs > 0.01 and "worst at index" in report.failures[0].describe()


def test_optimizer_failure_falls_back_to_skipping_optimizers(
    saved: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    from tf2onnx import optimizer

    real, calls = optimizer.optimize_graph, []

    def flaky(graph, catch_errors=True, optimizers=None):
        calls.append(catch_errors)
        if not catch_errors:
            graph.remove_node(graph.get_nodes()[0].name)  # half-done work must not leak into the result
            raise RuntimeError("an optimizer broke")
        return real(graph, catch_errors=catch_errors, optimizers=optimizers)

    monkeypatch.setattr(optimizer, "optimize_graph", flaky)
    result = convert_savedmodel(saved["conv"], tmp_path / "conv.onnx")
    assert calls == [False, True] and result.parity is not None and result.parity.ok


def test_tf2onnx_failure_shows_its_message(tmp_path: Path) -> None:
    class Gamma(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.math.igamma(tf.abs(x) + 1.0, tf.abs(x) + 0.5)}  # no ONNX mapping in tf2onnx

    module = Gamma()
    tf.saved_model.save(module, str(tmp_path / "gamma"), signatures={"serving_default": module.serve})
    with pytest.raises(ConversionFailed, match=r"tf2onnx could not convert signature 'serving_default'.*Igamma"):
        convert_savedmodel(tmp_path / "gamma", tmp_path / "gamma.onnx")
    assert not (tmp_path / "gamma.onnx").exists()


def test_tensorflow_missing_names_the_pip_install(saved: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # what `import tensorflow` sees when it is absent
    with pytest.raises(TensorFlowUnavailable, match=r"pip install 'dl_inference\[tensorflow\]'.*tensorflow-cpu"):
        convert_savedmodel(saved["dense"], tmp_path / "x.onnx")


def test_compare_output_rules() -> None:
    a = np.array([[1.0, np.nan], [0.0, 1e-7]], np.float32)
    ok = compare_output("y", a, a + np.array([[1e-4, np.nan], [5e-6, 0]], np.float32), 3, 1e-3, 1e-5)
    assert ok.ok and ok.max_abs == pytest.approx(1e-4, rel=1e-3) and ok.max_rel == pytest.approx(1e-4, rel=1e-3)
    bad = compare_output("y", a, a + np.float32(2e-5), 3, 1e-3, 1e-5)
    assert not bad.ok and "worst at index (1, 0)" in bad.detail and "(batch 3)" in bad.describe()
    nan = compare_output("y", a, np.where(np.isnan(a), 0, a), None, 1e-3, 1e-5)
    assert not nan.ok and nan.max_abs == np.inf
    ints = compare_output("k", np.array([1, 2, 3]), np.array([1, 2, 4]), None, 1.0, 1.0)
    assert not ints.ok and "1 element(s) differ, first at index (2,)" in ints.detail  # integers: exact
    shape = compare_output("y", np.zeros((2, 3)), np.zeros((3, 2)), None, 1e-3, 1e-5)
    assert not shape.ok and "shape (3, 2) in ONNX, (2, 3) in TF" in shape.detail
