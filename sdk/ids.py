"""Task ids and submit keys: 32 hex digits, microsecond time first.

Ids made later sort later, so the broker's new rows land at the end of its
id and key indexes instead of on random pages; the 76 random bits that
follow keep ids made in the same microsecond apart. They come from a
generator of this module's own, seeded from the OS at import and again in
every forked child (so neither a caller's random.seed() nor a fork can make
two processes draw the same bits), not from os.urandom: a system call per id
costs more than the id is worth, and the ids need to be distinct, not secret.
"""

from __future__ import annotations

import os
import random
import time

_RANDOM_BITS = 76
_random = random.Random()
os.register_at_fork(after_in_child=_random.seed)


def time_ordered_id() -> str:
    """Return a fresh 32-hex-digit id that sorts after those made earlier."""
    return f"{time.time_ns() // 1000:013x}{_random.getrandbits(_RANDOM_BITS):019x}"
