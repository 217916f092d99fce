"""A model served from the Intel Extension for TensorFlow worker environment (``make itex-env``).

The same Keras SavedModel is in the repository twice: ``itex_model`` says ``worker_environment: itex``
and runs its worker under ``.venv-itex`` (TensorFlow 2.15 + ITEX, protobuf 4.23), ``main_model`` runs
under the gateway's own venv. Both answer the same inputs alike; the ITEX worker really is that
interpreter with ITEX's CPU plugin mapped into it; a model naming an unknown environment fails alone.
Skipped when ``.venv-itex`` is absent.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
ITEX_VENV = Path(os.environ.get("ITEX_VENV", ROOT / ".venv-itex"))
ITEX_PYTHON = (ROOT / ITEX_VENV / "bin" / "python").absolute()

pytestmark = pytest.mark.skipif(
    not ITEX_PYTHON.exists(), reason=f"{ITEX_VENV} is absent: build it with `make itex-env`"
)

import tritonclient.grpc as grpcclient  # noqa: E402

from tests.integration.server import RunningServer, free_port, run_process, run_server  # noqa: E402

# Builds a small Conv + Dense Keras model with fixed random weights, exports it as a SavedModel
# (Keras 3 under TensorFlow 2.21, Keras 2 under 2.15: both have Model.export) and saves the
# exporting TensorFlow's own answer for a fixed input.
EXPORT_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras

    out_dir, reference = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(2024)
    image = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(image)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="valid", activation="relu")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="tanh")(x)
    logits = keras.layers.Dense(5)(x)
    model = keras.Model(image, logits)
    for w in model.weights:
        w.assign((rng.standard_normal(tuple(w.shape)) * 0.2).astype("float32"))
    model.export(out_dir)
    inputs = rng.standard_normal((3, 12, 12, 3)).astype("float32")
    np.savez(reference, inputs=inputs, outputs=np.asarray(model(inputs)))
    """
)


@dataclass
class ItexSetup:
    server: RunningServer
    repository: Path
    inputs: np.ndarray
    reference: np.ndarray


def _exporting_python() -> str:
    """The main venv's interpreter when it has TensorFlow; else the ITEX env's (TensorFlow 2.15)."""
    return sys.executable if importlib.util.find_spec("tensorflow") is not None else str(ITEX_PYTHON)


def _write_model(repository: Path, name: str, savedmodel: Path, environment: str | None) -> None:
    version = repository / name / "1"
    version.mkdir(parents=True)
    (version / "model.savedmodel").symlink_to(savedmodel, target_is_directory=True)
    params = "" if environment is None else (
        f'parameters {{ key: "worker_environment" value {{ string_value: "{environment}" }} }}\n'
    )  # fmt: skip
    (repository / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "tensorflow"\n{params}')


@pytest.fixture(scope="module")
def itex(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ItexSetup]:
    work = tmp_path_factory.mktemp("itex")
    savedmodel, reference = work / "conv_dense.savedmodel", work / "reference.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [_exporting_python(), "-c", EXPORT_SCRIPT, str(savedmodel), str(reference)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    repository = work / "repo"
    _write_model(repository, "itex_model", savedmodel, "itex")
    _write_model(repository, "main_model", savedmodel, None)
    _write_model(repository, "bad_env", savedmodel, "no_such_env")
    data = np.load(reference)
    with run_server(
        repository, work / "server.log", "--worker-environment", f"itex={ITEX_PYTHON}",
        "--exit-on-error=false", "--strict-readiness=false", ready_timeout=240,  # bad_env fails on purpose
    ) as server:  # fmt: skip
        yield ItexSetup(server, repository, data["inputs"], data["outputs"])


def _infer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = client.infer(model, [inp]).as_numpy("output_0")
    assert out is not None
    return out


def _one_worker(server: RunningServer, model: str) -> int:
    pids = server.worker_pids(model)
    assert len(pids) == 1, (model, pids)
    return pids[0]


def _argv0(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()


def _mapped_itex_libraries(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {Path(line.split()[-1]).name for line in maps if "libitex" in line}


def test_worker_env_imports_the_worker_path_under_old_protobuf() -> None:
    """Everything `python -m dl_inference worker` imports (standalone gRPC included) loads there."""
    script = textwrap.dedent(
        """
        import google.protobuf, grpc, ml_dtypes, numpy
        import dl_inference.cli, dl_inference.worker.main, dl_inference.worker.dataplane, dl_inference.eventloop
        import dl_inference.frontends.grpc_server, dl_inference.backends.tensorflow_backend
        from dl_inference.protocol.datatypes import V2_DATATYPES, numpy_dtype
        from dl_inference.protocol.generated import grpc_service_pb2 as pb
        from dl_inference.protocol.tensors import build_response, decode_inputs, response_to_numpy, tensor_to_raw

        # Every V2 datatype through the worker's codec under numpy 1.x / ml_dtypes / protobuf 4.
        arrays = {}
        for datatype in V2_DATATYPES:
            if datatype == "BYTES":
                arrays[datatype] = numpy.array([[b"a", b""], [b"\\xff", "\u00fc".encode()]], dtype=object)
            else:
                arrays[datatype] = (numpy.arange(4) % 2).reshape(2, 2).astype(numpy_dtype(datatype))
        req = pb.ModelInferRequest(model_name="m")
        for datatype, array in arrays.items():
            req.inputs.add(name=datatype, datatype=datatype, shape=array.shape)
            req.raw_input_contents.append(tensor_to_raw(array, datatype))
        decoded = decode_inputs(pb.ModelInferRequest.FromString(req.SerializeToString()))
        response = build_response("m", "1", "id", list(decoded.items()))
        back = response_to_numpy(pb.ModelInferResponse.FromString(response.SerializeToString()))
        for datatype, array in arrays.items():
            assert back[datatype].dtype == array.dtype and (back[datatype] == array).all(), datatype
        typed = pb.ModelInferRequest(model_name="m")
        typed.inputs.add(name="x", datatype="INT64", shape=[3]).contents.int64_contents.extend([1, -2, 3])
        assert decode_inputs(typed)["x"].tolist() == [1, -2, 3]
        print(google.protobuf.__version__, numpy.__version__, ml_dtypes.__version__, grpc.__version__)
        """
    )
    proc = subprocess.run([str(ITEX_PYTHON), "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    protobuf, numpy_version = proc.stdout.split()[:2]
    assert protobuf.startswith("4."), protobuf  # the old runtime the generated code must live with
    assert numpy_version.startswith("1."), numpy_version


def test_both_environments_answer_alike(itex: ItexSetup) -> None:
    url = itex.server.grpc_url
    via_itex = _infer(url, "itex_model", itex.inputs)
    via_main = _infer(url, "main_model", itex.inputs)
    # Different TensorFlow builds (2.15 + ITEX's oneDNN kernels vs 2.21) may sum in another order.
    np.testing.assert_allclose(via_itex, via_main, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(via_itex, itex.reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_infer(url, "itex_model", itex.inputs[1:2]), via_itex[1:2], rtol=1e-5, atol=1e-6)


def test_itex_worker_runs_the_itex_interpreter_with_the_plugin_loaded(itex: ItexSetup) -> None:
    itex_pid, main_pid = _one_worker(itex.server, "itex_model"), _one_worker(itex.server, "main_model")
    # argv[0], not /proc/PID/exe: both venvs' python links to the same base interpreter.
    assert _argv0(itex_pid) == str(ITEX_PYTHON)
    assert _argv0(main_pid) == sys.executable
    libraries = _mapped_itex_libraries(itex_pid)
    assert "libitex_cpu.so" in libraries, libraries  # TensorFlow loaded ITEX's CPU plugin
    assert any(name.startswith("libitex_cpu_internal_") for name in libraries), libraries  # its AVX2/AVX512 core
    assert not _mapped_itex_libraries(main_pid)


def test_backend_reports_the_runtime_in_the_model_config(itex: ItexSetup) -> None:
    client = grpcclient.InferenceServerClient(itex.server.grpc_url)
    itex_runtime = client.get_model_config("itex_model").config.parameters["tensorflow_runtime"].string_value
    main_runtime = client.get_model_config("main_model").config.parameters["tensorflow_runtime"].string_value
    assert itex_runtime.startswith("TensorFlow 2.15"), itex_runtime
    assert "Intel Extension for TensorFlow 2.15" in itex_runtime and "(plugin loaded)" in itex_runtime, itex_runtime
    assert "Intel Extension" not in main_runtime, main_runtime


def test_unknown_environment_fails_only_its_model(itex: ItexSetup) -> None:
    client = grpcclient.InferenceServerClient(itex.server.grpc_url)
    assert client.is_server_ready()
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["bad_env"].state == "UNAVAILABLE"
    assert "worker environment 'no_such_env'" in index["bad_env"].reason
    assert "configured: itex" in index["bad_env"].reason
    assert client.is_model_ready("itex_model") and client.is_model_ready("main_model")
    assert not itex.server.worker_pids("bad_env")


def test_standalone_worker_in_the_itex_env_serves_v2_grpc(itex: ItexSetup, tmp_path: Path) -> None:
    """`dl-inference worker --grpc-port` under .venv-itex: its gRPC frontend (health, reflection) works."""
    port = free_port()
    cmd = [
        str(ITEX_PYTHON), "-m", "dl_inference", "worker", "--model-repository", str(itex.repository),
        "--model", "itex_model", "--host", "127.0.0.1", "--grpc-port", str(port),
    ]  # fmt: skip
    with run_process(cmd, port, tmp_path / "worker.log", ready_timeout=180) as node:
        out = _infer(node.address, "itex_model", itex.inputs)
        np.testing.assert_allclose(out, itex.reference, rtol=1e-4, atol=1e-5)
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(node.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_killed_itex_worker_comes_back_in_the_same_environment(itex: ItexSetup) -> None:
    """Last in the module: it kills the ITEX worker; the restart must use .venv-itex again."""
    old = _one_worker(itex.server, "itex_model")
    os.kill(old, signal.SIGKILL)
    client = grpcclient.InferenceServerClient(itex.server.grpc_url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = [p for p in itex.server.worker_pids("itex_model") if p != old]
        if pids and client.is_model_ready("itex_model"):
            break
        time.sleep(0.2)
    new = _one_worker(itex.server, "itex_model")
    assert new != old
    assert _argv0(new) == str(ITEX_PYTHON)
    assert "libitex_cpu.so" in _mapped_itex_libraries(new)
    np.testing.assert_allclose(
        _infer(itex.server.grpc_url, "itex_model", itex.inputs), itex.reference, rtol=1e-4, atol=1e-5
    )
