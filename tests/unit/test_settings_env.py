"""Server settings from DL_INFERENCE_* environment variables: typed like each setting, between the YAML
file and the flags, bad values refused naming the variable, and the real server started from them alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dl_inference.config import load_settings, settings_from_env
from dl_inference.errors import InvalidArgument
from dl_inference.examples import make_example_repository
from tests.integration.server import free_port


def test_values_are_typed_like_the_settings(tmp_path: Path) -> None:
    env = {
        "DL_INFERENCE_HTTP_PORT": "9000",
        "DL_INFERENCE_REPOSITORY_POLL_SECS": "2.5",
        "DL_INFERENCE_EXIT_ON_ERROR": "false",
        "DL_INFERENCE_STRICT_READINESS": "Yes",
        "DL_INFERENCE_LOAD_MODELS": "a, b,",
        "DL_INFERENCE_NODES": '["n1:8001@2", {address: "n2:8001", weight: 1}]',
        "DL_INFERENCE_BALANCER": "{policy: weighted_round_robin}",
        "DL_INFERENCE_MODEL_CONTROL_MODE": "explicit",
        "DL_INFERENCE_CACHE_DIR": "/somewhere",  # not a setting, and known not to be one
        "HTTP_PORT": "1",  # no prefix: not ours
    }
    values, warnings = settings_from_env(env)
    assert values == {
        "http_port": 9000,
        "repository_poll_secs": 2.5,
        "exit_on_error": False,
        "strict_readiness": True,
        "load_models": ["a", "b"],
        "nodes": ["n1:8001@2", {"address": "n2:8001", "weight": 1}],
        "balancer": {"policy": "weighted_round_robin"},
        "model_control_mode": "explicit",
    }
    assert warnings == []
    _, warnings = settings_from_env({"DL_INFERENCE_HTTP_PROT": "9000"})
    assert warnings == ["environment variable DL_INFERENCE_HTTP_PROT is not a server setting; ignored"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("DL_INFERENCE_HTTP_PORT", "eighty", "DL_INFERENCE_HTTP_PORT='eighty': not a valid int"),
        ("DL_INFERENCE_EXIT_ON_ERROR", "maybe", "DL_INFERENCE_EXIT_ON_ERROR='maybe': not a valid bool"),
        ("DL_INFERENCE_BALANCER", "[1, 2]", "DL_INFERENCE_BALANCER='\\[1, 2\\]': not a valid dict"),
        ("DL_INFERENCE_STOP_GRACE_S", "soon", "DL_INFERENCE_STOP_GRACE_S='soon': not a valid float"),
    ],
)
def test_bad_values_name_the_variable(key: str, value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        settings_from_env({key: value})


def test_yaml_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(f"model_repository: {tmp_path}\nhttp_port: 7000\ngrpc_port: 7001\nmetrics_port: 7002\n")
    env = {"DL_INFERENCE_GRPC_PORT": "8101", "DL_INFERENCE_METRICS_PORT": "8102"}
    settings = load_settings(str(config), {"metrics_port": 9102, "http_port": None}, environ=env)
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == (7000, 8101, 9102)


def test_the_server_starts_from_environment_variables_alone(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_example_repository(repo)
    http = free_port()
    env = dict(
        os.environ,
        DL_INFERENCE_MODEL_REPOSITORY=str(repo),
        DL_INFERENCE_HOST="127.0.0.1",
        DL_INFERENCE_HTTP_PORT=str(http),
        DL_INFERENCE_GRPC_PORT=str(free_port()),
        DL_INFERENCE_METRICS_PORT="0",
        DL_INFERENCE_MODEL_CONTROL_MODE="explicit",
        DL_INFERENCE_LOAD_MODELS="simple",
        DL_INFERENCE_FRONTENDS="1",
    )
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dl_inference", "serve"], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/repository/index", data=b"{}", timeout=5) as r:
            index = {m["name"]: m.get("state", "") for m in json.load(r)}
        assert index["simple"] == "READY" and index["versioned"] == ""  # explicit mode: only the one asked for
    finally:
        proc.terminate()
        proc.wait(30)
