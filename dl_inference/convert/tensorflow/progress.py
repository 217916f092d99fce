"""Phase lines with elapsed time for long conversions, and a heartbeat while one phase runs long.

    clock = PhaseClock(print, "tf-to-onnx")
    with clock.phase("converting", "with tf2onnx 1.17.0, opset 17"):
        ...
    clock.durations  # {"converting": 12.3}

Each line reads ``<label>: [<elapsed since start>] <text>``; a phase that runs longer than
``heartbeat`` seconds adds ``still <phase> (<time in phase>)`` lines, because tf2onnx converts a big
graph for minutes without saying anything.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["PhaseClock", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``4.2s``, or ``2m05s`` from a minute on."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


class PhaseClock:
    """Emits phase lines through ``emit`` and records how long each phase took."""

    def __init__(
        self,
        emit: Callable[[str], None],
        label: str,
        heartbeat: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit = emit
        self.label = label
        self.heartbeat = heartbeat
        self.clock = clock
        self.started = clock()
        self.durations: dict[str, float] = {}

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def line(self, text: str) -> None:
        self.emit(f"{self.label}: [{format_seconds(self.elapsed):>6}] {text}")

    @contextlib.contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[None]:
        """Say that phase ``name`` starts, beat while it runs, record its duration when it ends."""
        self.line(f"{name} {detail}".rstrip())
        begun = self.clock()
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat):
                self.line(f"still {name} ({format_seconds(self.clock() - begun)} in this phase)")

        ticker = threading.Thread(target=beat, name=f"{self.label}-heartbeat", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join(timeout=5)
            self.durations[name] = self.durations.get(name, 0.0) + self.clock() - begun

    def summary(self) -> str:
        """``loading 1.2s, converting 3.4s, ...`` in phase order."""
        return ", ".join(f"{name} {format_seconds(secs)}" for name, secs in self.durations.items())
