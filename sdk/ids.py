"""Task ids and submit keys: 32 hex digits, microsecond time first.

Ids made later sort later, so the broker's new rows land at the end of its
id and key indexes instead of on random pages; the 76 random bits that
follow keep ids made in the same microsecond apart. They come from the
`random` module (reseeded from the OS at start and in every forked child),
not from os.urandom: a system call per id costs more than the id is worth,
and the ids need to be distinct, not secret.
"""

from __future__ import annotations

import random
import time

_RANDOM_BITS = 76


def time_ordered_id() -> str:
    """Return a fresh 32-hex-digit id that sorts after those made earlier."""
    return f"{time.time_ns() // 1000:013x}{random.getrandbits(_RANDOM_BITS):019x}"
