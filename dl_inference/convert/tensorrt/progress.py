"""Progress lines for long TensorRT builds: phases and steps from the builder, and elapsed time.

TensorRT reports its optimizer's progress through an ``IProgressMonitor`` (``phase_start``,
``step_complete``, ``phase_finish``, called from builder threads). :class:`BuildProgress` holds the
logic (which phases to show, how often to show steps, cancellation) as plain Python so it is tested
without TensorRT; :func:`make_progress_monitor` wraps it in a ``trt.IProgressMonitor`` subclass.
:class:`ElapsedTicker` adds a line every ``interval`` seconds while the build runs, because some
phases (tactic timing of a big layer) run for minutes without a step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["BuildProgress", "ElapsedTicker", "make_progress_monitor"]


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


@dataclass
class _Phase:
    name: str
    depth: int
    steps: int
    started: float
    step: int = 0
    last_shown: float = 0.0


class BuildProgress:
    """Turns builder progress events into lines for ``emit``.

    Phases up to ``max_depth`` levels deep are shown when they start and finish; their steps at most
    every ``step_interval`` seconds (always the last one). ``cancel()`` makes the next
    ``step_complete`` return False, which asks TensorRT to stop the build.
    """

    def __init__(
        self,
        emit: Callable[[str], None],
        label: str,
        max_depth: int = 2,
        step_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit = emit
        self.label = label
        self.max_depth = max_depth
        self.step_interval = step_interval
        self.clock = clock
        self.started = clock()
        self._phases: dict[str, _Phase] = {}
        self._lock = threading.Lock()
        self._cancel = threading.Event()

    def _line(self, text: str, depth: int) -> None:
        self.emit(f"{self.label}: [{_elapsed(self.clock() - self.started):>7}] {'  ' * depth}{text}")

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            parent = self._phases.get(parent_phase) if parent_phase else None
            depth = parent.depth + 1 if parent else 0
            started = self.clock()
            phase = _Phase(phase_name, depth, num_steps, started, last_shown=started)
            self._phases[phase_name] = phase
            if depth < self.max_depth:
                self._line(f"{phase_name} ({num_steps} step{'s' if num_steps != 1 else ''})", depth)

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            phase = self._phases.get(phase_name)
            if phase is not None:
                phase.step = step + 1
                now = self.clock()
                last = phase.step >= phase.steps
                if (
                    phase.depth < self.max_depth
                    and phase.steps > 1
                    and (last or now - phase.last_shown >= self.step_interval)
                ):
                    phase.last_shown = now
                    self._line(f"{phase_name}: step {phase.step}/{phase.steps}", phase.depth)
        return not self._cancel.is_set()

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            phase = self._phases.pop(phase_name, None)
            if phase is not None and phase.depth < self.max_depth:
                self._line(f"{phase_name} done in {_elapsed(self.clock() - phase.started)}", phase.depth)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def current(self) -> str:
        """The innermost running phase and its step, e.g. ``Tactic selection (step 12/40)``."""
        with self._lock:
            if not self._phases:
                return "no phase running"
            phase = max(self._phases.values(), key=lambda p: (p.depth, p.started))
            return f"{phase.name} (step {phase.step}/{phase.steps})"


class ElapsedTicker:
    """A daemon thread that emits ``<label>: still building, <elapsed> elapsed; <phase>`` every
    ``interval`` seconds until :meth:`stop`."""

    def __init__(self, progress: BuildProgress, interval: float = 30.0) -> None:
        self.progress = progress
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trt-build-ticker", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            p = self.progress
            p.emit(f"{p.label}: still building, {_elapsed(p.clock() - p.started)} elapsed; {p.current()}")

    def __enter__(self) -> ElapsedTicker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def make_progress_monitor(trt: Any, progress: BuildProgress) -> Any:
    """A ``trt.IProgressMonitor`` forwarding to ``progress``. TensorRT needs the object to outlive
    the build: keep the returned reference until ``build_serialized_network`` returns."""

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)  # pybind11 trampolines need the base initialised

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return _Monitor()
