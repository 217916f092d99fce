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
