"""memtrim: glibc malloc_trim found and called; the periodic task calls it and stops when cancelled."""

from __future__ import annotations

import asyncio
import platform

import pytest

from dl_inference import memtrim


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_is_available_on_glibc() -> None:
    assert memtrim.available()
    assert memtrim.trim() in (True, False)


def test_trim_every_calls_trim_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(memtrim, "_TRIM", lambda pad: calls.append(pad) or 1)

    async def main() -> None:
        task = asyncio.create_task(memtrim.trim_every(0.01))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(calls) >= 3 and set(calls) == {0}


def test_trim_every_does_nothing_when_off_or_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(asyncio.wait_for(memtrim.trim_every(0), 1))  # returns at once
    monkeypatch.setattr(memtrim, "_TRIM", None)
    asyncio.run(asyncio.wait_for(memtrim.trim_every(0.01), 1))
    assert memtrim.trim() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_malloc_in_a_fresh_process_and_an_env_setting_wins() -> None:
    """In a process of its own (mallopt is process-wide): request-sized buffers then stay in the heap
    (no fresh mapping per buffer), and a MALLOC_*_ variable the user set is left alone."""
    import os
    import subprocess
    import sys

    probe = (
        "from dl_inference import memtrim; import resource\n"
        "print(memtrim.tune_malloc())\n"
        "b = [bytearray(600_000) for _ in range(3)]; del b\n"
        "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(200):\n"
        "    x = bytearray(600_000); x[::4096] = b'\\1' * len(x[::4096]); del x\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tuned, faults = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                   check=True).stdout.split()  # fmt: skip
    assert tuned == "True" and int(faults) < 200  # one 600 KB buffer = 147 pages: not faulted in each time
    untouched = subprocess.run([sys.executable, "-c", probe], env={**env, "MALLOC_TRIM_THRESHOLD_": "131072"},
                               capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert untouched[0] == "False"
