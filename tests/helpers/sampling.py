"""Observe a running cluster from a background thread at a fixed rate."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sdk import Client


class Sampler:
    """Call `sample(client)` every `interval_s` from its own thread and client.

    Samples are kept with their monotonic time; exceptions are kept too, so
    a test can assert there were none.
    """

    def __init__(
        self,
        endpoint: str,
        sample: Callable[[Client], Any],
        interval_s: float = 0.1,
        request_timeout: float = 5.0,
    ) -> None:
        self.endpoint = endpoint
        self.sample = sample
        self.interval_s = interval_s
        self.request_timeout = request_timeout
        self.samples: list[tuple[float, Any]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def values(self) -> list[Any]:
        """Return the sampled values, oldest first."""
        return [value for _, value in self.samples]

    def _run(self) -> None:
        with Client(self.endpoint, request_timeout=self.request_timeout) as client:
            while not self._stop.is_set():
                try:
                    self.samples.append((time.monotonic(), self.sample(client)))
                except Exception as exc:  # reported by the test, not lost
                    self.errors.append(exc)
                self._stop.wait(self.interval_s)
