"""Fixtures of the store tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A real store file in the test's folder, closed afterwards."""
    opened = Store(str(tmp_path / "store.db"))
    try:
        yield opened
    finally:
        opened.close()
