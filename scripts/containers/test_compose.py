"""End-to-end test of the container images and docker/docker-compose.yml on podman (`make test-containers`).

Run as root from the main venv (it needs tritonclient, onnxruntime and TensorFlow for the example models):

    .venv/bin/python scripts/containers/test_compose.py [--itex] [--no-build] [--keep-up]

Steps, each timed (table at the end): set up podman and its Docker-compatible socket (setup_podman.sh), lint the
container files (lint.sh), make the Debian base image (make_base_image.sh), build the gateway, CPU worker and
TensorFlow worker images (build_images.sh; --itex adds the ITEX worker) and check the GPU Dockerfile's runtime
stage, check the images (uid, no compilers, HEALTHCHECK, the frameworks import), write the example model
repository, bring the compose stack up with docker-compose 1.29 against podman's socket (the default CPU stack, two
`worker-simple` containers), wait until every container's health check passes (podman runs HEALTHCHECKs from
systemd timers, absent here, so this script runs `podman healthcheck run` itself, every few seconds, for the
whole test), infer through the gateway with tritonclient over gRPC and HTTP and check the answers, then kill one
`worker-simple` container (`podman kill`) while clients keep sending and check that traffic goes on through the
other, that the gateway's endpoint table (`GET /v2/endpoints`) shows the killed one down, and that it serves
again after `podman start`; then SIGKILL the other worker's process (a crash: the restart policy brings it
back). The stack is always brought down at the end (also on failure or Ctrl-C), unless --keep-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "containers"
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
SOCKET = os.environ.get("PODMAN_SOCKET", "/run/podman/podman.sock")
TAG = os.environ.get("DL_INFERENCE_TAG", "0.1.0")
UID = 1000


class StepFailed(Exception):
    pass


@dataclass
class Step:
    name: str
    seconds: float = 0.0
    result: str = "ok"
    note: str = ""


@dataclass
class Run:
    log_dir: Path
    steps: list[Step] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        step = Step(name)
        self.steps.append(step)
        print(f"--- {name}", flush=True)
        start = time.monotonic()
        try:
            yield step
        except BaseException as exc:
            step.result = "FAILED"
            step.note = (step.note + "; " if step.note else "") + (str(exc) or type(exc).__name__)
            raise
        finally:
            step.seconds = time.monotonic() - start
            print(f"    {step.result} in {step.seconds:.1f} s{': ' + step.note if step.note else ''}", flush=True)

    def sh(self, args: list[str], log: str, timeout: float = 1800, env: dict[str, str] | None = None) -> str:
        """Run a command, its output (each line stamped with seconds since the start) into log_dir/<log>.log;
        StepFailed with the output's tail on failure."""
        path = self.log_dir / f"{log}.log"
        lines: list[str] = []
        start = time.monotonic()
        with path.open("a") as out:
            out.write(f"$ {' '.join(args)}\n")
            out.flush()
            proc = subprocess.Popen(
                args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append(line)
                    out.write(f"[{time.monotonic() - start:7.1f}] {line}")
                    out.flush()
                returncode = proc.wait()
            finally:
                timer.cancel()
        if time.monotonic() - start >= timeout:
            raise StepFailed(f"{args[0]} timed out after {timeout:.0f} s (log: {path})")
        if returncode != 0:
            print("".join(lines[-25:]), file=sys.stderr, end="")
            raise StepFailed(f"{' '.join(args[:3])} exited {returncode} (log: {path})")
        return "".join(lines)

    def table(self, total: float) -> str:
        width = max(len(s.name) for s in self.steps)
        lines = [f"{'step':<{width}}  {'seconds':>8}  result  note", f"{'-' * width}  {'-' * 8}  ------  ----"]
        for s in self.steps:
            lines.append(f"{s.name:<{width}}  {s.seconds:8.1f}  {s.result:<6}  {s.note}")
        lines.append(f"{'total':<{width}}  {total:8.1f}")
        return "\n".join(lines)


# -- podman / compose helpers ------------------------------------------------------------------------------------
def podman(*args: str, timeout: float = 60, check: bool = True) -> str:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise StepFailed(f"podman {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def containers(project: str) -> list[dict[str, Any]]:
    out = podman("ps", "-a", "--filter", f"label=com.docker.compose.project={project}", "--format", "json")
    return json.loads(out or "[]")


def service_of(container: dict[str, Any]) -> str:
    return str(container.get("Labels", {}).get("com.docker.compose.service", ""))


def name_of(container: dict[str, Any]) -> str:
    return str(container["Names"][0])


def inspect(name: str) -> dict[str, Any]:
    return json.loads(podman("inspect", name))[0]


def ip_of(name: str) -> str:
    networks = inspect(name)["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


class HealthLoop(threading.Thread):
    """Runs `podman healthcheck run` on every running container of the project that has one, every few seconds:
    podman starts HEALTHCHECKs from systemd timers, and without systemd nothing runs them."""

    def __init__(self, project: str, interval_s: float = 3.0) -> None:
        super().__init__(daemon=True)
        self.project, self.interval_s = project, interval_s
        self.stopped = threading.Event()
        self.status: dict[str, str] = {}

    def check_all(self) -> dict[str, str]:
        status = {}
        for c in containers(self.project):
            name = name_of(c)
            if c.get("State") != "running":
                status[name] = str(c.get("State"))
                continue
            if not inspect(name)["Config"].get("Healthcheck"):
                status[name] = "running (no healthcheck)"
                continue
            proc = subprocess.run(["podman", "healthcheck", "run", name], capture_output=True, text=True, timeout=30)
            status[name] = "healthy" if proc.returncode == 0 else "unhealthy"
        self.status = status
        return status

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            with contextlib.suppress(Exception):
                self.check_all()


# -- gateway helpers ---------------------------------------------------------------------------------------------
def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def endpoint_table(http: str) -> list[dict[str, Any]]:
    status, body = http_get(f"http://{http}/v2/endpoints")
    return json.loads(body)["endpoints"] if status == 200 else []


def model_endpoints(http: str, model: str) -> dict[str, str]:
    """{endpoint address: state} of the endpoints serving ``model`` (any version)."""
    return {
        e["endpoint"]: e["state"] for e in endpoint_table(http) if any(m.split(":")[0] == model for m in e["models"])
    }


def answered(http: str, address: str) -> int:
    """Requests an endpoint has answered (its requests less its failures, from the gateway's table)."""
    return next((e["requests"] - e["failures"] for e in endpoint_table(http) if e["endpoint"] == address), 0)


# -- the test ----------------------------------------------------------------------------------------------------
def expected_answers(repository: Path) -> dict[str, Any]:
    """Inputs and the answers the example models must give (computed here, not by the server)."""
    import numpy as np
    import onnxruntime as ort

    from dl_inference.examples_tensorflow import LINEAR_B, LINEAR_W

    rng = np.random.default_rng(7)
    x16 = rng.standard_normal((3, 16)).astype(np.float32)
    a, b = rng.standard_normal((2, 2, 16)).astype(np.float32)
    x4 = np.array([[1, 2, 3, 4], [0.5, -1, 2, 0]], dtype=np.float32)
    session = ort.InferenceSession(str(repository / "simple" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    linear = x4 @ LINEAR_W + LINEAR_B
    return {
        "simple": ({"x": x16}, {"y": session.run(["y"], {"x": x16})[0]}),
        "add_sub": ({"INPUT0": a, "INPUT1": b}, {"OUTPUT0": a + b, "OUTPUT1": a - b}),
        "tf_linear": ({"x": x4}, {"y": linear}),
        "tf_linear_onnx": ({"x": x4}, {"y": linear}),
    }


def infer(module: Any, client: Any, model: str, inputs: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, array in inputs.items():
        t = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        tensors.append(t)
    result = client.infer(model, tensors, outputs=[module.InferRequestedOutput(o) for o in outputs])
    return {o: result.as_numpy(o) for o in outputs}


def check_inference(grpc_addr: str, http_addr: str, answers: dict[str, Any]) -> str:
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    checked = []
    for module, client in ((grpcclient, grpcclient.InferenceServerClient(grpc_addr)),
                           (httpclient, httpclient.InferenceServerClient(http_addr))):  # fmt: skip
        for model, (inputs, want) in answers.items():
            got = infer(module, client, model, inputs, list(want))
            for name, value in want.items():
                if got[name].shape != value.shape or not np.allclose(got[name], value, rtol=1e-5, atol=1e-5):
                    raise StepFailed(f"{model} over {module.__name__}: output {name} {got[name]!r}, expected {value!r}")
            checked.append(model)
        client.close()
    # Models with several workers (worker-simple x2; tf_linear on stock TensorFlow and, with --itex, on ITEX):
    # every worker must have answered correctly, not only the one the balancer happened to pick.
    spread = []
    client = grpcclient.InferenceServerClient(grpc_addr)
    for model, (inputs, want) in answers.items():
        addresses = list(model_endpoints(http_addr, model))
        if len(addresses) < 2:
            continue
        for _ in range(200):
            got = infer(grpcclient, client, model, inputs, list(want))
            if not all(np.allclose(got[n], v, rtol=1e-5, atol=1e-5) for n, v in want.items()):
                raise StepFailed(f"{model}: a wrong answer from one of its workers {addresses}")
            if all(answered(http_addr, a) > 0 for a in addresses):
                break
        else:
            raise StepFailed(f"{model}: not every worker answered in 200 requests: {addresses}")
        spread.append(f"{model} x{len(addresses)}")
    client.close()
    models = ", ".join(answers)
    return f"{len(checked)} inferences (gRPC + HTTP: {models}) match; every worker answered: {', '.join(spread)}"


@dataclass
class Load:
    """Clients sending `simple` requests over gRPC in a closed loop; every failure is kept with its time."""

    grpc_addr: str
    inputs: dict[str, Any]
    clients: int = 2
    ok: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_addr)
        x = grpcclient.InferInput("x", list(self.inputs["x"].shape), "FP32")
        x.set_data_from_numpy(self.inputs["x"])
        while not self.stopped.is_set():
            start = time.monotonic()
            try:
                client.infer("simple", [x], client_timeout=10)
            except Exception as exc:
                with self.lock:
                    self.failures.append((time.monotonic(), str(exc).splitlines()[0][:200]))
                time.sleep(0.05)
            else:
                with self.lock:
                    self.ok += 1
                    self.latencies.append(time.monotonic() - start)
        client.close()

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(15)

    def count(self) -> tuple[int, int]:
        with self.lock:
            return self.ok, len(self.failures)


def wait_for(what: str, condition: Any, timeout: float, interval: float = 0.1) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(interval)
    raise StepFailed(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_and_restore(run: Run, step: Step, project: str, http: str, grpc_addr: str, inputs: dict[str, Any]) -> None:
    """podman kill one worker-simple container under load; the other carries on; podman start brings it back."""
    workers = sorted(name_of(c) for c in containers(project) if service_of(c) == "worker-simple")
    if len(workers) < 2:
        raise StepFailed(f"need two worker-simple containers, found {workers}")
    victim, survivor = workers
    victim_ip, survivor_ip = f"{ip_of(victim)}:8001", f"{ip_of(survivor)}:8001"

    def served(address: str) -> int:
        return answered(http, address)

    notes = []
    with Load(grpc_addr, inputs) as load:
        time.sleep(3)
        ok_before, _ = load.count()
        if ok_before == 0:
            raise StepFailed("no request succeeded before the kill")
        survivor_before = served(survivor_ip)
        killed_at = time.monotonic()
        podman("kill", victim)
        seen: dict[str, float] = {}

        def victim_down() -> bool:
            state = model_endpoints(http, "simple").get(victim_ip)
            if state is None:
                seen.setdefault("removed (DNS record gone)", time.monotonic() - killed_at)
                return True
            if state != "healthy":
                seen.setdefault(state, time.monotonic() - killed_at)
            return False

        wait_for(f"{victim_ip} to leave the endpoint table", victim_down, 30)
        states = ", ".join(f"{s} after {t:.1f} s" for s, t in sorted(seen.items(), key=lambda kv: kv[1]))
        notes.append(f"killed {victim} ({victim_ip}): endpoint table showed it {states}")
        time.sleep(3)  # traffic must go on through the survivor alone
        ok_mid, _ = load.count()
        survivor_gain = served(survivor_ip) - survivor_before
        if ok_mid <= ok_before or survivor_gain <= 0:
            raise StepFailed(f"traffic stopped after the kill ({ok_before} -> {ok_mid} ok)")
        notes.append(f"{survivor} answered {survivor_gain} requests meanwhile")

        started_at = time.monotonic()
        podman("start", victim)
        new_ip = f"{ip_of(victim)}:8001"
        wait_for(
            f"{victim} back in the endpoint table",
            lambda: model_endpoints(http, "simple").get(new_ip) == "healthy",
            60,
        )
        back = time.monotonic() - started_at
        wait_for(f"{victim} to take requests", lambda: served(new_ip) > 0, 30)
        notes.append(f"podman start: healthy in the table after {back:.1f} s at {new_ip}, taking requests")
        time.sleep(2)
    ok, failed = load.count()
    lat = sorted(load.latencies)
    notes.append(
        f"load: {ok} ok, {failed} failed (2 gRPC clients, closed loop), p50 {lat[len(lat) // 2] * 1e3:.1f} ms, "
        f"max {lat[-1] * 1e3:.0f} ms"
    )
    if load.failures:
        notes.append("failures: " + "; ".join(f"+{t - killed_at:.2f} s {msg}" for t, msg in load.failures[:5]))
    step.note = ". ".join(notes)
    if failed:
        step.result = "FAILED"
        raise StepFailed(f"{failed} request(s) failed during the kill")


def crash_worker(step: Step, project: str, http: str, grpc_addr: str, inputs: dict[str, Any]) -> None:
    """SIGKILL a worker's process (a crash, not a user stop): the restart policy brings the container back, and
    the gateway sends it requests again."""
    name = sorted(name_of(c) for c in containers(project) if service_of(c) == "worker-simple")[-1]
    restarts = inspect(name)["RestartCount"]
    pid = inspect(name)["State"]["Pid"]

    def served(address: str) -> int:
        return answered(http, address)

    states: dict[str, float] = {}
    with Load(grpc_addr, inputs) as load:
        time.sleep(2)
        os.kill(pid, 9)
        crashed_at = time.monotonic()
        wait_for(f"{name} restarted", lambda: inspect(name)["RestartCount"] > restarts, 30)
        restarted = time.monotonic() - crashed_at
        address = f"{ip_of(name)}:8001"
        before = served(address)

        def serving_again() -> bool:
            state = model_endpoints(http, "simple").get(address, "absent")
            if state != "healthy":
                states.setdefault(state, time.monotonic() - crashed_at)
            own = subprocess.run(["podman", "healthcheck", "run", name], capture_output=True, timeout=30).returncode
            return own == 0 and state == "healthy" and served(address) > before

        wait_for(f"{name} serving again", serving_again, 60, interval=0.2)
        back = time.monotonic() - crashed_at
        time.sleep(1)
    ok, failed = load.count()
    seen = ", ".join(f"{s} at +{t:.1f} s" for s, t in states.items()) or "never seen down (restarted within a check)"
    step.note = (
        f"SIGKILL to {name}'s worker process: restarted by the restart policy after {restarted:.1f} s (at "
        f"{address}), its health check passing and taking requests again after {back:.1f} s; in the gateway's "
        f"table: {seen}; load {ok} ok, {failed} failed"
    )
    if load.failures:
        step.note += ": " + "; ".join(msg for _, msg in load.failures[:3])
    if failed:
        raise StepFailed(f"{failed} request(s) failed during the crash")


def stop_stack(run: Run, compose: list[str], env: dict[str, str], project: str) -> str:
    """`compose stop`: SIGTERM to every container at once (as `down` does); each must exit by itself.

    The gateway drains (drain_delay_s + in-flight requests) and exits 0 well inside its 15 s
    stop_grace_period; exit code 137 means the engine had to SIGKILL it: something held its shutdown
    (a DNS lookup of the workers' alias, whose records vanish with the workers, once did)."""
    start = time.monotonic()
    run.sh([*compose, "stop"], "compose", env=env, timeout=120)
    took = time.monotonic() - start
    codes: dict[str, int] = {}
    for c in containers(project):  # the one-shot `convert` job exited 0 long ago
        state = inspect(name_of(c))["State"]
        codes[name_of(c)] = int(state["ExitCode"])
    killed = {n: code for n, code in codes.items() if code != 0}
    if killed:
        raise StepFailed(f"not a clean exit on SIGTERM (exit codes): {killed}; compose stop took {took:.1f} s")
    return f"{len(codes)} containers exited 0 on SIGTERM; compose stop took {took:.1f} s"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--itex", action="store_true", help="also build the ITEX worker image and run the itex profile")
    p.add_argument("--no-build", action="store_true", help="use the images already built (no setup, lint, builds)")
    p.add_argument("--keep-up", action="store_true", help="leave the stack running at the end")
    p.add_argument("--project", default="dl-inference-test", help="compose project name")
    p.add_argument("--port-base", type=int, default=18000, help="host ports: HTTP, gRPC, metrics = base, +1, +2")
    p.add_argument("--log-dir", type=Path, help="where command logs go (default: a new folder in /tmp)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("test_compose.py: run as root (podman as root, package installation)", file=sys.stderr)
        return 2

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="dl-inference-containers-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    run = Run(log_dir)
    http, grpc_addr = f"127.0.0.1:{args.port_base}", f"127.0.0.1:{args.port_base + 1}"
    env = {
        "DOCKER_HOST": f"unix://{SOCKET}",
        "DL_INFERENCE_HTTP_PORT": str(args.port_base),
        "DL_INFERENCE_GRPC_PORT": str(args.port_base + 1),
        "DL_INFERENCE_METRICS_PORT": str(args.port_base + 2),
        "DL_INFERENCE_TAG": TAG,
    }
    profiles = ["--profile", "itex"] if args.itex else []  # no profile: the CPU stack is the default
    compose = ["docker-compose", "-p", args.project, "-f", str(COMPOSE_FILE), *profiles]
    repository = Path(tempfile.mkdtemp(prefix="dl-inference-models-", dir="/var/tmp"))
    env["MODEL_REPOSITORY"] = str(repository)
    health = HealthLoop(args.project)
    stack_up = False
    started = time.monotonic()
    failed = False
    try:
        if not args.no_build:
            with run.step("setup podman + socket") as s:
                run.sh([str(SCRIPTS / "setup_podman.sh")], "setup")
                s.note = podman("--version").strip() + ", " + run.sh(["docker-compose", "--version"], "setup").strip()
            with run.step("lint (hadolint, shellcheck, compose config)"):
                run.sh([str(SCRIPTS / "lint.sh")], "lint")
            with run.step("base image (debootstrap + import)") as s:
                s.note = run.sh([str(SCRIPTS / "make_base_image.sh")], "base").strip().splitlines()[-1]
            images = ["gateway", "worker-cpu", "worker-tensorflow"] + (["worker-itex"] if args.itex else [])
            for image in [*images, "gpu-runtime-check"]:
                with run.step(f"build {image}") as s:
                    out = run.sh([str(SCRIPTS / "build_images.sh"), image], f"build-{image}")
                    s.note = out.strip().splitlines()[-1]
        with run.step("image checks") as s:
            s.note = check_images(args.itex)
        with run.step("model repository (make-examples)") as s:
            run.sh([sys.executable, "-m", "dl_inference", "make-examples", str(repository)], "repository")
            shutil.chown(repository, UID, UID)
            for path in repository.rglob("*"):
                os.chown(path, UID, UID, follow_symlinks=False)
            s.note = f"{repository}, owned by uid {UID}"
        with run.step("compose up (default CPU stack, worker-simple x2)") as s:
            stack_up = True
            run.sh([*compose, "up", "-d", "--no-build", "--scale", "worker-simple=2"], "compose", env=env, timeout=600)
            s.note = f"{len(containers(args.project))} containers"
        with run.step("healthy (podman healthcheck run loop)") as s:
            s.note = wait_healthy(args.project, http, health, args.itex)
            health.start()
        answers = expected_answers(repository)
        with run.step("inference through the gateway") as s:
            s.note = check_inference(grpc_addr, http, answers)
            status, body = http_get(f"http://127.0.0.1:{args.port_base + 2}/metrics")
            if status != 200 or b"dl_inference_endpoint_requests_total" not in body:
                raise StepFailed(f"metrics port: HTTP {status}, no dl_inference_endpoint_requests_total")
            s.note += "; metrics port serves dl_inference_endpoint_*"
        with run.step("podman kill a worker under load") as s:
            kill_and_restore(run, s, args.project, http, grpc_addr, answers["simple"][0])
        with run.step("crash a worker process under load") as s:
            crash_worker(s, args.project, http, grpc_addr, answers["simple"][0])
        with run.step("compose stop (SIGTERM; every container exits 0)") as s:
            s.note = stop_stack(run, compose, env, args.project)
    except (StepFailed, subprocess.SubprocessError, OSError, KeyboardInterrupt) as exc:
        failed = True
        print(f"FAILED: {exc}", file=sys.stderr)
        if stack_up:
            with contextlib.suppress(Exception):
                run.sh([*compose, "logs", "--tail", "40"], "compose-logs", env=env, timeout=60)
                print(f"container logs: {log_dir}/compose-logs.log", file=sys.stderr)
    finally:
        health.stopped.set()
        if stack_up and not args.keep_up:
            with run.step("compose down") as s:
                try:
                    run.sh([*compose, "down", "--volumes", "--remove-orphans"], "compose", env=env, timeout=300)
                    left = containers(args.project)
                    s.note = "no container left" if not left else f"LEFT: {[name_of(c) for c in left]}"
                except StepFailed:
                    failed = True
        if not args.keep_up:
            shutil.rmtree(repository, ignore_errors=True)
    total = time.monotonic() - started
    print()
    print(run.table(total))
    print(f"\nlogs: {log_dir}")
    with contextlib.suppress(Exception):
        store = podman("info", "--format", "{{.Store.GraphRoot}}").strip()
        used = subprocess.run(["du", "-sh", store], capture_output=True, text=True).stdout.split()[0]
        print(f"podman storage: {used} in {store}")
    return 1 if failed else 0


def check_images(itex: bool) -> str:
    """Each image runs as uid 1000, has a HEALTHCHECK, no compiler, and its frameworks import."""
    imports = {
        "gateway": "import dl_inference.gateway.server",
        "worker-cpu": "import torch, onnxruntime; assert torch.ones(2, 2).sum().item() == 4; print(torch.__version__)",
        "worker-tensorflow": "import tensorflow as tf, tf2onnx; print(tf.__version__)",
    }
    if itex:
        imports["worker-itex"] = "import intel_extension_for_tensorflow as itex; print(itex.__version__)"
    notes = []
    for name, code in imports.items():
        image = f"dl-inference/{name}:{TAG}"
        details = json.loads(podman("image", "inspect", image))[0]
        if not details.get("Healthcheck") and not details["Config"].get("Healthcheck"):
            raise StepFailed(f"{image} has no HEALTHCHECK (built without --format docker?)")
        script = (
            'set -e; test "$(id -u)" = 1000; '
            "for c in gcc cc g++ c++ make; do if command -v $c >/dev/null; then echo compiler $c; exit 1; fi; done; "
            f"TF_CPP_MIN_LOG_LEVEL=3 python -c '{code}'"
        )
        out = podman("run", "--rm", "--entrypoint", "sh", image, "-c", script, timeout=120).strip()
        size = int(details["Size"])
        notes.append(f"{name} {size / 2**30:.2f} GiB" + (f" ({out.splitlines()[-1]})" if out else ""))
    return "uid 1000, HEALTHCHECK, no compiler; " + ", ".join(notes)


def wait_healthy(project: str, http: str, health: HealthLoop, itex: bool) -> str:
    """Every container healthy (convert exited 0), the gateway ready and its table holding every worker."""
    want = {"simple": 2, "add_sub": 1, "tf_linear": 2 if itex else 1, "tf_linear_onnx": 1}
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < 300:
        status = health.check_all()
        converted = [c for c in containers(project) if service_of(c) == "convert"]
        if converted and converted[0].get("State") == "exited" and converted[0].get("ExitCode") != 0:
            raise StepFailed("the convert service failed")
        unhealthy = {n: s for n, s in status.items() if s != "healthy" and not n.endswith("convert_1")}
        ready = http_get(f"http://{http}/v2/health/ready")[0] == 200
        counts = {m: list(model_endpoints(http, m).values()).count("healthy") for m in want}
        last = f"not healthy: {unhealthy}, gateway ready: {ready}, healthy endpoints: {counts}"
        if not unhealthy and ready and counts == want:
            return (
                f"{len(status)} containers ({len(status) - 1} healthy + convert exited 0), gateway ready, "
                f"endpoints {counts}"
            )
        time.sleep(1)
    raise StepFailed(f"not healthy after 300 s: {last}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
