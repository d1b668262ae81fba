"""Wake the worker's poll loop from a signal handler or another thread."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

#: Signals that make a worker drain.
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Wakeup:
    """A socket pair: `wake()` makes the read end readable for the poller."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    @property
    def reader(self) -> socket.socket:
        """The end to register with the poller."""
        return self._reader

    def wake(self) -> None:
        """Make the poll return; safe in signal handlers and from any thread."""
        try:
            self._writer.send(b"\0")
        except OSError:
            pass  # full (a wake-up is pending anyway) or already closed

    def clear(self) -> None:
        """Consume pending wake-ups."""
        try:
            while self._reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


def install_signal_handlers(record: Callable[[int], None]) -> Callable[[], None]:
    """Route SIGTERM/SIGINT to `record` (main thread only); return an undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        record(signum)

    previous: dict[int, Any] = {}
    for signum in DRAIN_SIGNALS:
        old = signal.signal(signum, handler)
        if old is not None:
            previous[signum] = old

    def restore() -> None:
        for signum, old in previous.items():
            signal.signal(signum, old)

    return restore
