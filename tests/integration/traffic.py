"""Client threads sending real tritonclient gRPC requests in a loop, recording how each one ended."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


class Traffic:
    """``threads`` clients send ``x`` (input "x", FP32) to ``model`` until stopped (or ``limit`` requests).

    Every request is recorded as (start, end, outcome): outcome is "ok" or the gRPC status name.
    ``client_timeout`` is each request's gRPC deadline.
    """

    def __init__(
        self, url: str, model: str, threads: int, x: np.ndarray, *, client_timeout: float = 30.0, limit: int = 0
    ) -> None:
        self.url, self.model, self.x = url, model, x
        self.client_timeout = client_timeout
        self.limit = limit
        self.outcomes: Counter[str] = Counter()
        self.messages: list[str] = []
        self.records: list[tuple[float, float, str]] = []
        self.longest = 0.0
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        inp = grpcclient.InferInput("x", list(self.x.shape), "FP32")
        inp.set_data_from_numpy(self.x)
        while not self.done.is_set():
            start = time.monotonic()
            try:
                r = client.infer(self.model, [inp], client_timeout=self.client_timeout)
                assert r.as_numpy("y").shape == self.x.shape
                outcome, message = "ok", ""
            except InferenceServerException as exc:
                outcome, message = str(exc.status()), str(exc.message())
                time.sleep(0.05)
            end = time.monotonic()
            with self._lock:
                self.longest = max(self.longest, end - start)
                self.outcomes[outcome] += 1
                self.records.append((start, end, outcome))
                if message:
                    self.messages.append(message)
                if self.limit and len(self.records) >= self.limit:
                    self.done.set()

    def total(self) -> int:
        with self._lock:
            return len(self.records)

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for t in self._threads:
            t.join(self.client_timeout + 5)
        assert not any(t.is_alive() for t in self._threads), "a client thread is stuck"


def wait_for(predicate: object, timeout: float) -> float:
    """Poll ``predicate`` until true; return how long it took (AssertionError on timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")
