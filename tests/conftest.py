"""Shared fixtures: a clean HAKOBU_* environment, waiting, ports, the ledger
and a cluster of real broker and worker processes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# NOTE: tests/ holds folders named like the packages (sdk, config, worker);
# the project root goes first so `import sdk` always means the real package.
PROJECT_DIR = Path(__file__).resolve().parent.parent
if str(PROJECT_DIR) not in sys.path[:1]:
    sys.path.insert(0, str(PROJECT_DIR))

from helpers.cluster import Cluster  # noqa: E402
from helpers.ledger import Ledger  # noqa: E402
from helpers.raw import RawSockets  # noqa: E402
from helpers.waiting import free_port, wait_until  # noqa: E402

__all__ = ["free_port", "wait_until"]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Remember each phase's report on the item, so fixtures can see failures."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def _clean_hakobu_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every HAKOBU_* variable so no test sees the caller's settings."""
    import os

    for name in list(os.environ):
        if name.startswith("HAKOBU_"):
            monkeypatch.delenv(name)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    """The execution ledger file of this test (workers get it as an env var)."""
    return Ledger(tmp_path / "ledger.jsonl")


@pytest.fixture
def cluster(
    tmp_path: Path, ledger: Ledger, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """A process factory: start_broker, start_worker, kill, restart, client.

    Every process it started is stopped at teardown; when the test failed,
    the tails of all process logs are printed.
    """
    instance = Cluster(tmp_path, ledger)
    try:
        yield instance
    finally:
        instance.stop()
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed:
            print(f"\n=== cluster logs under {tmp_path}")
            print(instance.tail())


@pytest.fixture
def raw() -> Iterator[RawSockets]:
    """Bare pyzmq sockets, closed with linger 0 at teardown."""
    sockets = RawSockets()
    try:
        yield sockets
    finally:
        sockets.close()
