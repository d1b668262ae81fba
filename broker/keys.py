"""Idempotency keys: which task a submit key already made, mostly without a query.

Every submit carries a key (the client makes a time-ordered one when the
caller gives none), and a key seen before must return the task it made. The
newest keys live in memory; for the others the store is asked, except when a
key is provably new: every stored key below `HEX_LIMIT` that memory does not
hold is at most `floor`, so a key below `HEX_LIMIT` and above `floor` is in
no row. Client-made keys start with a hex timestamp, so they sort below
`HEX_LIMIT` and, made later, above the floor: a fresh submit costs no read.
A key from a client whose clock lags, or a caller's own key, is looked up.
"""

from __future__ import annotations

from collections import OrderedDict

from broker.store import Store

#: Keys remembered in memory; enough for the retries of every request in flight.
CACHE_SIZE = 10_000
#: Keys below this string (all that start with a hex digit) take part in the floor.
HEX_LIMIT = "g"


class KeyIndex:
    """Maps submit keys to task ids for one broker run."""

    def __init__(self, store: Store, cache_size: int = CACHE_SIZE) -> None:
        self._store = store
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cache_size = cache_size
        self.floor = store.largest_key_below(HEX_LIMIT) or ""
        #: Keys that needed a query (for tests and the curious).
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._cache)

    def is_new(self, key: str) -> bool:
        """True when no stored task can have this key (memory not included)."""
        return self.floor < key < HEX_LIMIT

    def in_memory(self, key: str) -> str | None:
        """Return the task id made with `key` if memory holds it, else None."""
        return self._cache.get(key)

    def find(self, key: str) -> str | None:
        """Return the task id made with `key`, or None."""
        found = self._cache.get(key)
        if found is not None or self.is_new(key):
            return found
        self.lookups += 1
        return self._store.task_id_for_key(key)

    def find_many(self, keys: list[str]) -> dict[str, str]:
        """Return {key: task id} for the keys of `keys` some task was made with."""
        found = {k: self._cache[k] for k in keys if k in self._cache}
        unsure = [k for k in keys if k not in found and not self.is_new(k)]
        if unsure:
            self.lookups += len(unsure)
            found.update(self._store.task_ids_for_keys(unsure))
        return found

    def add(self, key: str, task_id: str) -> None:
        """Remember that `key` made `task_id`; the oldest key leaves memory."""
        self._cache[key] = task_id
        if len(self._cache) > self._cache_size:
            old, _ = self._cache.popitem(last=False)
            if old < HEX_LIMIT and old > self.floor:
                self.floor = old

    def forget(self, keys: list[str]) -> None:
        """Drop keys whose tasks were pruned (a later submit makes a new task)."""
        for key in keys:
            self._cache.pop(key, None)
