"""Worker environments: settings, the CLI flag, per-model interpreter resolution, the old-protobuf stand-in."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dl_inference import cli
from dl_inference.config import ServerSettings, load_settings, parse_worker_environment
from dl_inference.errors import InvalidArgument
from dl_inference.gateway.router import GatewayDataPlane
from dl_inference.gateway.workers import worker_python
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.repository.scan import ModelSource

ROOT = Path(__file__).resolve().parents[2]


def _config(environment: str | None = None, instances: int = 1) -> mc.ModelConfig:
    config = mc.ModelConfig(name="m", backend="onnxruntime")
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    if environment is not None:
        config.parameters["worker_environment"].string_value = environment
    return config


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """An executable reached through a symlink, as a venv's bin/python is."""
    real = tmp_path / "real-python"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(real)
    return venv_bin / "python"


# -- resolution ------------------------------------------------------------------------------------
def test_no_environment_means_the_gateways_interpreter(fake_python: Path) -> None:
    assert worker_python("m", _config(), {"itex": str(fake_python)}) == sys.executable
    assert worker_python("m", _config("  "), {"itex": str(fake_python)}) == sys.executable


def test_named_environment_gives_its_interpreter_without_following_the_venv_symlink(fake_python: Path) -> None:
    assert worker_python("m", _config("itex"), {"itex": str(fake_python)}) == str(fake_python)
    assert worker_python("m", _config(" itex "), {"itex": str(fake_python)}) == str(fake_python)


def test_relative_interpreter_is_made_absolute_from_the_cwd(
    fake_python: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert worker_python("m", _config("itex"), {"itex": "venv/bin/python"}) == str(fake_python)


def test_unknown_environment_names_model_environment_and_what_is_configured(fake_python: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        worker_python("resnet", _config("itex"), {"other": str(fake_python)})
    message = err.value.message
    assert "model 'resnet'" in message and "'itex'" in message and "configured: other" in message
    assert "--worker-environment itex=" in message
    with pytest.raises(InvalidArgument, match="configured: none"):
        worker_python("resnet", _config("itex"), {})


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: p / "missing" / "python", "does not exist"),
        (lambda p: p, "is not a file"),
        (lambda p: p / "plain-file", "is not executable"),
    ],
)
def test_unusable_interpreter_names_model_environment_and_path(tmp_path: Path, make, problem: str) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "plain-file").write_text("")
    (tmp_path / "plain-file").chmod(0o644)
    path = make(tmp_path)
    with pytest.raises(InvalidArgument) as err:
        worker_python("resnet", _config("itex"), {"itex": str(path)})
    message = err.value.message
    assert "model 'resnet'" in message and "'itex'" in message and str(path) in message and problem in message


def test_dangling_venv_symlink_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "python").symlink_to(tmp_path / "gone")
    with pytest.raises(InvalidArgument, match="does not exist"):
        worker_python("m", _config("itex"), {"itex": str(tmp_path / "python")})


# -- settings and the CLI flag ----------------------------------------------------------------------
def test_parse_worker_environment() -> None:
    assert parse_worker_environment("itex=.venv-itex/bin/python") == ("itex", ".venv-itex/bin/python")
    assert parse_worker_environment(" tf-2.15 = /opt/py=odd/python ") == ("tf-2.15", "/opt/py=odd/python")
    for bad in ("itex", "=python", "itex=", " = ", "it ex=/usr/bin/python3", "-x=/usr/bin/python3"):
        with pytest.raises(InvalidArgument, match=r"worker.environment"):
            parse_worker_environment(bad)


def test_settings_from_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text("worker_environments:\n  itex: .venv-itex/bin/python\n")
    settings = load_settings(str(cfg), {"model_repository": str(tmp_path)})
    assert settings.worker_environments == {"itex": ".venv-itex/bin/python"}
    # Existence is a per-model matter: a missing interpreter does not stop the server starting.
    cfg.write_text("worker_environments: {itex: /nonexistent/python}\n")
    assert load_settings(str(cfg), {"model_repository": str(tmp_path)}).worker_environments


@pytest.mark.parametrize(
    "text",
    ["worker_environments: [itex]\n", "worker_environments: {itex: ''}\n", "worker_environments: {'a b': /x}\n"],
)
def test_bad_settings_refused(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text(text)
    with pytest.raises(InvalidArgument, match=r"worker.environment"):
        load_settings(str(cfg), {"model_repository": str(tmp_path)})


def test_example_server_config_declares_the_setting() -> None:
    settings = load_settings(str(ROOT / "configs" / "server.yaml"), {"model_repository": str(ROOT)})
    assert settings.worker_environments == {}


def test_cli_flag_is_repeatable_and_malformed_flags_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli._parser().parse_args(
        ["serve", "--worker-environment", "itex=/a/python", "--worker-environment", "old=/b/python"]
    )
    assert args.worker_environments == ["itex=/a/python", "old=/b/python"]
    code = cli.main(["serve", "--model-repository", str(tmp_path), "--worker-environment", "itex"])
    assert code == 2
    assert "--worker-environment takes NAME=PYTHON" in capsys.readouterr().err


# -- the router ---------------------------------------------------------------------------------------
@pytest.fixture
def dataplane(tmp_path: Path, fake_python: Path) -> Iterator[GatewayDataPlane]:
    settings = ServerSettings(model_repository=str(tmp_path), worker_environments={"itex": str(fake_python)})
    dp = GatewayDataPlane(settings)
    yield dp
    shutil.rmtree(os.path.dirname(dp.pool.socket_path), ignore_errors=True)


def _source(tmp_path: Path, config: mc.ModelConfig, name: str = "m") -> ModelSource:
    config.name = name
    return ModelSource(name, tmp_path / name, config, {1: tmp_path / name / "1"}, "fingerprint-1")


def test_specs_carry_the_environments_interpreter(dataplane: GatewayDataPlane, tmp_path: Path) -> None:
    fake = dataplane.settings.worker_environments["itex"]
    specs = dataplane.lifecycle._specs(_source(tmp_path, _config("itex", instances=2)), 1)
    assert [s.python for s in specs] == [fake, fake]
    assert [s.python for s in dataplane.lifecycle._specs(_source(tmp_path, _config()), 1)] == [sys.executable]


def test_unknown_environment_fails_only_that_models_load(dataplane: GatewayDataPlane, tmp_path: Path) -> None:
    source = _source(tmp_path, _config("nope"), name="bad")
    with pytest.raises(InvalidArgument, match="model 'bad' asks for worker environment 'nope'"):
        asyncio.run(dataplane.lifecycle.load_source(source))
    assert "worker environment 'nope'" in dataplane.load_errors["bad"]
    assert dataplane.lifecycle.failed_fingerprints["bad"] == "fingerprint-1"
    assert "bad" not in dataplane.models
    assert dataplane.lifecycle.pool._by_token == {}  # no worker was spawned


# -- generated code under an old protobuf -------------------------------------------------------------
def test_generated_modules_load_without_protobuf_runtime_version() -> None:
    """protobuf < 5.26 has no google.protobuf.runtime_version; the generated package stands in for it."""
    script = textwrap.dedent(
        """
        import sys
        from importlib.abc import MetaPathFinder

        class HideRuntimeVersion(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "google.protobuf.runtime_version":
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, HideRuntimeVersion())
        from dl_inference.protocol.generated import grpc_service_pb2 as pb, grpc_service_pb2_grpc  # noqa: F401
        from dl_inference.protocol.generated import model_config_pb2 as mc

        assert "stand-in" in (sys.modules["google.protobuf.runtime_version"].__doc__ or "")
        request = pb.ModelInferRequest(model_name="m", id="7")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
        assert pb.ModelInferRequest.FromString(request.SerializeToString()) == request
        assert mc.ModelConfig(name="m").name == "m"
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_real_runtime_version_is_used_where_it_exists() -> None:
    import google.protobuf.runtime_version as runtime_version

    assert "stand-in" not in (runtime_version.__doc__ or "")
    assert runtime_version.__file__ is not None
