"""The WAL checkpointer: copies committed pages from the WAL into the store
file on a thread of its own, so the broker's loop never pays for it.

SQLite would otherwise checkpoint inside whichever commit pushes the WAL past
1000 pages, stalling that turn for milliseconds. The store turns that off
(`wal_autocheckpoint=0`) and this thread runs a PASSIVE checkpoint every
INTERVAL_S on its own connection; sqlite3 releases the GIL while it works,
and a PASSIVE checkpoint never blocks the writer. When the WAL still grows
(the writer never pauses), a RESTART checkpoint waits for one commit to end
and makes the WAL start over.

Limits:
- A reader that holds an old snapshot for long keeps the WAL from being
  reused; it grows until that reader finishes.
"""

from __future__ import annotations

import sqlite3
import threading

from loguru import logger

#: Seconds between checkpoints.
INTERVAL_S = 0.05
#: WAL pages past which a RESTART checkpoint makes the next commit reuse the
#: WAL from its start (it waits for the commit in progress to end; PASSIVE
#: passes have copied most pages by then).
RESTART_AFTER_PAGES = 4000
#: Milliseconds a checkpoint waits for a lock before it tries again later.
BUSY_TIMEOUT_MS = 1000


class Checkpointer:
    """A daemon thread that checkpoints the WAL of the store at `path`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="hakobu-checkpointer", daemon=True
        )

    def start(self) -> None:
        """Start checkpointing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it; the store's close checkpoints last."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            while not self._stop.wait(INTERVAL_S):
                try:
                    _, log_pages, _ = conn.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)"
                    ).fetchone()
                    if log_pages > RESTART_AFTER_PAGES:
                        # A writer that never pauses keeps a PASSIVE checkpoint
                        # from ever catching up, and the WAL from being reused.
                        conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                except sqlite3.Error as exc:
                    self.failures += 1
                    logger.warning("store.checkpoint_failed error={}", exc)
        finally:
            conn.close()
