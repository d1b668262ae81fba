"""The executor with real spawned child processes."""

from __future__ import annotations

import os
import time

import pytest

from sdk.protocol import pack_value, unpack_value
from worker import registry
from worker.executor import Executor, Job, Outcome, describe_exit

PROBES = "worker_probe_tasks"
LIMIT = 1 << 20


@pytest.fixture
def executor():
    registry.import_task_modules(["worker.builtins", PROBES])
    ex = Executor(2, "w-exec", [PROBES], LIMIT)
    ex.launch()
    yield ex
    ex.shutdown(1.0)


def job(task, name, payload=None, *, attempt=1, timeout_s=None):
    return Job(task, attempt, name, pack_value(payload, LIMIT), timeout_s)


def run_until_done(executor, timeout_s=10.0):
    """Drive `collect` until some outcome arrives; return the outcomes."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        found = executor.collect(time.monotonic())
        if found:
            return found
        time.sleep(0.005)
    pytest.fail(f"no outcome within {timeout_s} s")


def wait_started(executor, key, timeout_s=10.0):
    """Drive `collect` until `key` was handed to its child process."""
    end = time.monotonic() + timeout_s
    while not executor.is_started(key):
        assert executor.collect(time.monotonic()) == []
        if time.monotonic() > end:
            pytest.fail(f"{key} not started within {timeout_s} s")
        time.sleep(0.005)


def run_one(executor, the_job, timeout_s=10.0) -> Outcome:
    slot = executor.free_slots()[0]
    executor.start(slot, the_job, time.monotonic())
    (outcome,) = run_until_done(executor, timeout_s)
    assert outcome.key == the_job.key
    return outcome


def test_echo_returns_packed_value(executor):
    outcome = run_one(executor, job("t1", "echo", {"a": [1, b"x", None]}))
    assert outcome.ok
    assert unpack_value(outcome.value) == {"a": [1, b"x", None]}
    assert executor.free_count == 2


def test_handler_error_carries_type_message_and_traceback(executor):
    outcome = run_one(executor, job("t1", "fail", "boom"))
    assert (outcome.ok, outcome.error_type, outcome.error) == (
        False,
        "RuntimeError",
        "boom",
    )
    assert "Traceback" in outcome.traceback and "fail" in outcome.traceback


def test_unknown_task_names_the_handlers_it_has(executor):
    outcome = run_one(executor, job("t1", "no_such_task"))
    assert outcome.error_type == "UnknownTask"
    assert "no_such_task" in outcome.error and "echo" in outcome.error


def test_result_too_large_is_an_error(executor):
    outcome = run_one(executor, job("t1", "probe_big", LIMIT + 10))
    assert (outcome.ok, outcome.error_type) == (False, "PayloadTooLarge")


@pytest.mark.parametrize(
    ("name", "payload", "expected"),
    [
        ("probe_segv", None, "handler process died with signal SIGSEGV (-11)"),
        ("probe_exit", 3, "handler process exited with code 3"),
    ],
)
def test_crash_is_reported_and_the_slot_comes_back(executor, name, payload, expected):
    outcome = run_one(executor, job("t1", name, payload))
    assert (outcome.ok, outcome.error_type, outcome.error) == (
        False,
        "HandlerCrashed",
        expected,
    )
    assert run_one(executor, job("t2", "echo", 5)).ok
    assert executor.free_count == 2


def test_timeout_kills_a_gil_bound_handler(executor):
    started = time.monotonic()
    outcome = run_one(executor, job("t1", "probe_spin", 30, timeout_s=0.3))
    assert outcome.error_type == "TaskTimeout"
    assert time.monotonic() - started < 5.0
    assert run_one(executor, job("t2", "echo", 1)).ok


def test_abort_of_a_cooperative_handler(executor):
    the_job = job("t1", "sleep", 30)
    executor.start(0, the_job, time.monotonic())
    wait_started(executor, the_job.key)
    assert executor.abort(the_job.key, time.monotonic(), "user asked")
    (outcome,) = run_until_done(executor, 5.0)
    assert (outcome.cancelled, outcome.error_type) == (True, "Cancelled")
    assert "user asked" in outcome.error and "stopped" in outcome.error


def test_abort_kills_a_handler_that_ignores_it(executor):
    the_job = job("t1", "probe_ignore_cancel", 30)
    executor.start(0, the_job, time.monotonic())
    wait_started(executor, the_job.key)
    started = time.monotonic()
    assert executor.abort(the_job.key, time.monotonic(), "")
    (outcome,) = run_until_done(executor, 5.0)
    assert outcome.cancelled and "killed" in outcome.error
    assert 0.4 <= time.monotonic() - started < 3.0


def test_abort_of_unknown_attempt_is_false(executor):
    assert not executor.abort(("nope", 1), time.monotonic())
    assert not executor.kill(("nope", 1))


@pytest.mark.parametrize(
    "how", ["subprocess", "fork", "fork_return", "pool", "pool_terminate"]
)
def test_forks_inside_handlers_are_harmless(executor, how):
    outcome = run_one(executor, job(f"t-{how}", "probe_fork", how), timeout_s=20.0)
    assert outcome.ok, outcome.error
    assert unpack_value(outcome.value) == how
    # Nothing else arrives from a forked copy.
    assert run_one(executor, job("t2", "echo", 2)).ok


def test_context_reaches_the_handler(executor, tmp_path):
    ledger = tmp_path / "ledger"
    outcome = run_one(
        executor, job("t7", "probe_ledger", {"path": str(ledger)}, attempt=3)
    )
    assert unpack_value(outcome.value) == {
        "task": "t7",
        "attempt": 3,
        "worker": "w-exec",
    }
    (line,) = ledger.read_text().splitlines()
    task_id, attempt, worker_id, pid = line.split()
    assert (task_id, attempt, worker_id) == ("t7", "3", "w-exec")
    assert int(pid) != os.getpid()


def test_capacity_slots_run_in_parallel(executor):
    started = time.monotonic()
    executor.start(0, job("a", "sleep", 0.5), started)
    executor.start(1, job("b", "sleep", 0.5), started)
    assert executor.free_slots() == []
    assert sorted(executor.running()) == [("a", 1), ("b", 1)]
    done = []
    while len(done) < 2:
        done += run_until_done(executor, 5.0)
    assert {o.task for o in done} == {"a", "b"}
    assert time.monotonic() - started < 0.95 + 1.0


def test_shutdown_is_bounded_with_busy_children():
    registry.import_task_modules(["worker.builtins", PROBES])
    ex = Executor(2, "w-exec", [PROBES], LIMIT)
    ex.launch()
    ex.start(0, job("a", "probe_ignore_cancel", 30), time.monotonic())
    ex.start(1, job("b", "probe_spin", 30), time.monotonic())
    wait_started(ex, ("a", 1))
    wait_started(ex, ("b", 1))
    started = time.monotonic()
    ex.shutdown(0.5)
    assert time.monotonic() - started < 2.0
    assert ex.fds() == []


def test_describe_exit():
    assert describe_exit(-9) == "died with signal SIGKILL (-9)"
    assert describe_exit(2) == "exited with code 2"
    assert "code 0" in describe_exit(0)
    assert "unknown" in describe_exit(None)
