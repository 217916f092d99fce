"""load_tests.lib: the plumbing the load_tests scripts share (servers as subprocesses, /proc readers,
reports and result files, send schedules)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from load_tests.lib.load import arrival_times
from load_tests.lib.procs import (
    child_pids,
    descendants,
    group_cpu_seconds,
    rss_bytes,
    tree_cpu_seconds,
    tree_rss,
)
from load_tests.lib.report import (
    finish,
    int_list,
    median,
    num,
    percentile,
    ratio,
    round_medians,
    to_json,
    write_json_and_text,
)
from load_tests.lib.server import (
    REPO_ROOT,
    BenchError,
    Server,
    free_port,
    log_tail,
    ours_command,
    run_in_workdir,
    start_server,
    stop_server,
    wait_ready,
)

# ---------------------------------------------------------------------------------------------
# report


def test_median_skips_missing_values() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0]) == 2.5
    assert median([None, None]) is None and median([]) is None


def test_round_medians_of_loadgen_reports() -> None:
    reports = [
        {"throughput_rps": 100.0, "latency_ms": {"p50": 1.0, "p99": 4.0}},
        {"throughput_rps": 300.0, "latency_ms": {"p50": None, "p99": None}},  # a round without answers
        {"throughput_rps": 200.0, "latency_ms": {"p50": 3.0, "p99": 8.0}},
    ]
    row = round_medians(reports)
    assert row == {"rounds": 3, "throughput_rps": 200.0, "p50_ms": 2.0, "p99_ms": 6.0}
    assert list(row) == ["rounds", "throughput_rps", "p50_ms", "p99_ms"]  # the order of the result files' keys


def test_num_formats_or_dashes() -> None:
    assert num(1.23456, "6.2f") == "  1.23"
    assert num(None, "6.2f") == "-" and num(0.0, ".1f") == "0.0"


def test_int_list_sorts_dedupes_and_rejects_nonpositive() -> None:
    assert int_list("16, 1,4,16,") == [1, 4, 16]
    for bad in ("", " , ", "0,4", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(bad)
    with pytest.raises(ValueError):
        int_list("1,x")


def test_ratio_is_none_without_both_numbers() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(3.0, None) is None and ratio(3.0, 0.0) is None
    assert ratio(0.0, 2.0) == 0.0


def test_percentile_takes_an_observed_value() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == 5.0 and percentile(values, 0) == 1.0
    assert percentile([1.0, 2.0], 50) == 2.0  # "higher": no interpolation between 1 and 2
    assert percentile(iter([]), 50) is None


def test_finish_prints_and_writes_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = {"rows": [1, 2]}
    path = tmp_path / "out" / "bench.json"
    assert finish(result, lambda r: f"rows: {len(r['rows'])}", path) == 0
    assert json.loads(path.read_text()) == result
    assert path.with_suffix(".txt").read_text() == "rows: 2\n"
    assert "rows: 2" in capsys.readouterr().out
    assert finish(result, lambda r: "table", None) == 0  # no path: print only
    assert finish(None, lambda r: "never", path) == 1


def test_write_json_and_text_creates_parents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    j, t = tmp_path / "a" / "r.json", tmp_path / "b" / "r.txt"
    write_json_and_text(j, "{}\n", t, "table")
    assert j.read_text() == "{}\n" and t.read_text() == "table"
    assert capsys.readouterr().out == f"wrote {j} and {t}\n"


# ---------------------------------------------------------------------------------------------
# server


def test_free_port_never_hands_out_a_port_twice() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports) and all(0 < p < 65536 for p in ports)


def test_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    assert log_tail(log) == "(no log)"
    log.write_text("")
    assert log_tail(log) == "(empty log)"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert log_tail(log, 3) == "line 97\nline 98\nline 99"


def test_ours_command_serves_the_repository_on_the_given_ports(tmp_path: Path) -> None:
    cmd = ours_command(tmp_path, 1001, 1002, 1003)
    assert cmd[-9:] == ["serve", "--model-repository", str(tmp_path), "--grpc-port", "1001",
                        "--http-port", "1002", "--metrics-port", "1003"]  # fmt: skip


def _sleeper_with_child(tmp_path: Path, name: str = "sleeper") -> Server:
    code = "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    code += "print('started', flush=True)\ntime.sleep(60)"
    return start_server(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", "127.0.0.1:1")


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_stop_server_takes_the_whole_process_group_down(tmp_path: Path) -> None:
    server = _sleeper_with_child(tmp_path)
    try:
        _wait_for(lambda: len(child_pids(server.proc.pid)) == 1)
        (child,) = child_pids(server.proc.pid)
        assert descendants(server.proc.pid) == [child]
        assert os.getpgid(child) == server.proc.pid  # the server leads a group of its own
        rss = tree_rss(server.proc.pid)
        assert rss["processes"] == 2 and rss["total"] == rss["gateway"] + rss["workers"] > 0
    finally:
        stop_server(server, grace=2.0)
    assert server.proc.returncode is not None
    _wait_for(lambda: rss_bytes(child) is None)
    assert rss_bytes(child) is None  # the child went with it (reaped by init)
    stop_server(server)  # a second stop is harmless


def test_wait_ready_reports_a_server_that_died(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    server = start_server("doomed", cmd, tmp_path / "doomed.log", f"127.0.0.1:{free_port()}")
    with pytest.raises(BenchError, match=r"doomed exited with status 3 .*\n.*no model here"):
        wait_ready(server, timeout=30)


def test_wait_ready_times_out_with_the_log(tmp_path: Path) -> None:
    server = _sleeper_with_child(tmp_path, "silent")
    try:
        with pytest.raises(BenchError, match=r"silent not ready after 1 s \(UNAVAILABLE.*\n.*started"):
            wait_ready(server, timeout=1.0)
    finally:
        stop_server(server, grace=2.0)


def test_sigterm_as_interrupt() -> None:
    # In a child process: a SIGTERM to pytest itself ends the whole run silently if anything in the
    # session (a native library, an event loop) has the signal at its default when it arrives.
    script = (
        "import os, signal, time\n"
        "from load_tests.lib.server import sigterm_as_interrupt\n"
        "previous = signal.getsignal(signal.SIGTERM)\n"
        "try:\n"
        "    with sigterm_as_interrupt():\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', signal.getsignal(signal.SIGTERM) == previous)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "interrupted True", proc.stdout + proc.stderr


def test_run_in_workdir_removes_or_keeps_the_directory(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[Path] = []

    def ok(workdir: Path) -> dict[str, Any]:
        seen.append(workdir)
        (workdir / "server.log").write_text("x")
        return {"fine": True}

    assert run_in_workdir("t", False, ok) == {"fine": True}
    assert not seen[-1].exists()

    def fails(workdir: Path) -> dict[str, Any]:
        seen.append(workdir)
        raise BenchError("server did not start")

    assert run_in_workdir("t", False, fails) is None
    err = capsys.readouterr().err
    assert seen[-1].is_dir() and "t: server did not start" in err and str(seen[-1]) in err  # logs kept
    assert run_in_workdir("t", True, ok) == {"fine": True} and seen[-1].is_dir()  # --keep-logs

    def interrupted(workdir: Path) -> dict[str, Any]:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        run_in_workdir("t", False, interrupted)
    assert exc.value.code == 130
    for workdir in seen:
        shutil.rmtree(workdir, ignore_errors=True)


def test_repo_root_is_the_checkout() -> None:
    assert (REPO_ROOT / "load_tests" / "lib" / "server.py").is_file() and (REPO_ROOT / "dl_inference").is_dir()


# ---------------------------------------------------------------------------------------------
# procs and load (moved from the scripts' tests)


def test_group_cpu_counts_every_process_of_the_group() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(30)"
    leader = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {burn!r}])\n{burn}"],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while group_cpu_seconds(leader.pid) < 1.1 and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu = group_cpu_seconds(leader.pid)
        assert 1.1 <= cpu < 5, cpu  # two processes burned 0.6 s each (plus start-up)
        assert group_cpu_seconds(os.getpgrp()) > 0  # ours: not theirs
        assert group_cpu_seconds(leader.pid) < cpu + 0.5  # both sleep now: it stops growing
    finally:
        os.killpg(leader.pid, 9)
        leader.wait()


def test_tree_cpu_seconds_counts_this_process() -> None:
    sum(i * i for i in range(200_000))  # burn a little CPU
    assert tree_cpu_seconds([os.getpid()])[os.getpid()] > 0


def test_to_json_round_trips_with_one_line_per_row() -> None:
    obj = {"a": 1, "rows": [[0.0, "healthy", 3], [0.1, "down", 4]], "nested": {"x": [1, 2], "y": {"z": None}}}
    text = to_json(obj)
    assert json.loads(text) == obj
    assert text.splitlines()[3] == '  [0.0, "healthy", 3],'
    assert to_json({"x": 1, "y": "z"}) == '{"x": 1, "y": "z"}' and to_json([1, 2]) == "[1, 2]"


def test_arrival_times() -> None:
    constant = arrival_times(100.0, "constant", 10.0, np.random.default_rng(0))
    first = [next(iter(constant)) for _ in range(3)]
    assert first == pytest.approx([10.0, 10.01, 10.02])
    gen = iter(arrival_times(200.0, "poisson", 0.0, np.random.default_rng(0)))
    times = np.array([next(gen) for _ in range(20_000)])
    gaps = np.diff(times)
    assert gaps.min() >= 0
    assert gaps.mean() == pytest.approx(1 / 200, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
