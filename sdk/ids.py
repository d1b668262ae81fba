"""Task ids and submit keys: 32 hex digits, microsecond time first.

Ids made later sort later, so the broker's new rows land at the end of its
id and key indexes instead of on random pages; the 76 random bits that
follow keep ids made in the same microsecond apart.
"""

from __future__ import annotations

import os
import time


def time_ordered_id() -> str:
    """Return a fresh 32-hex-digit id that sorts after those made earlier."""
    return f"{time.time_ns() // 1000:013x}{os.urandom(10).hex()[:19]}"
