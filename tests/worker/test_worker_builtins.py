"""The built-in handlers, called directly."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from worker.builtins import checksum, echo, fail, sleep
from worker.context import TaskCancelled, TaskContext


def ctx(flag=None):
    return TaskContext("t1", 1, "w1", flag)


def test_echo_returns_its_payload():
    payload = {"a": [1, 2.5, None, b"\x00"], 3: "x"}
    assert echo(payload) is payload


def test_sleep_returns_its_seconds():
    started = time.monotonic()
    assert sleep(0.1, ctx()) == 0.1
    assert time.monotonic() - started >= 0.1
    assert sleep(0, ctx()) == 0


@pytest.mark.parametrize("bad", [True, "1", None, -1, float("inf"), float("nan")])
def test_sleep_refuses_bad_seconds(bad):
    with pytest.raises((TypeError, ValueError)):
        sleep(bad, ctx())


def test_sleep_notices_cancel_quickly():
    flag = threading.Event()
    flag.set()
    started = time.monotonic()
    with pytest.raises(TaskCancelled):
        sleep(30, ctx(flag))
    assert time.monotonic() - started < 0.5


def test_fail_raises_with_the_payload_as_message():
    with pytest.raises(RuntimeError, match="^boom$"):
        fail("boom")
    with pytest.raises(RuntimeError, match="1, 2"):
        fail([1, 2])


def test_checksum_of_a_file(tmp_path):
    data = b"hakobu" * 1000
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = {
        "path": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    assert checksum(str(path), ctx()) == expected
    assert checksum({"path": str(path)}, ctx()) == expected


def test_checksum_errors_are_clear(tmp_path):
    with pytest.raises(IsADirectoryError, match="directory"):
        checksum(str(tmp_path), ctx())
    with pytest.raises(FileNotFoundError, match="no such file"):
        checksum(str(tmp_path / "missing"), ctx())
    with pytest.raises(TypeError, match="path"):
        checksum(42, ctx())


def test_context_reports_its_fields():
    context = ctx()
    assert (context.task_id, context.attempt, context.worker_id) == ("t1", 1, "w1")
    assert not context.cancelled
    context.raise_if_cancelled()
