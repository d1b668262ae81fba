"""The worker runtime against a fake broker on a real ROUTER socket."""

from __future__ import annotations

import time

import pytest

from config.errors import ConfigError
from sdk import protocol
from sdk.protocol import (
    Abort,
    Ack,
    Bye,
    Drain,
    Heartbeat,
    Ready,
    Reconnect,
    Release,
    Result,
    Stop,
    Stored,
    Welcome,
    unpack_value,
)
from worker import Worker


def collect_for(broker, seconds):
    """Return every message the fake broker receives during `seconds`."""
    found = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if broker.socket.poll(int(left * 1000) + 1):
            found.append(broker.recv(0.01)[1])
    return found


def ledger_lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_ready_assign_ack_result_stored(broker, start_worker):
    # Given a worker that registered
    running = start_worker("w1", capacity=2, tags=("gpu",))
    identity, ready = broker.register()
    assert identity == b"w1"
    assert ready.worker_id == "w1" and ready.capacity == 2 and ready.tags == ["gpu"]
    assert {"echo", "sleep", "fail", "checksum", "probe_segv"} <= set(ready.handlers)
    assert ready.handlers == sorted(ready.handlers)
    assert ready.held == [] and ready.draining is False and ready.pid > 0

    # When the broker assigns an echo
    n = broker.assign(identity, ready.s, "t1", "echo", {"k": [1, 2]})

    # Then it is acknowledged at once and answered
    assert broker.expect(Ack).n == [n]
    result = broker.expect(Result)
    assert (result.task, result.attempt, result.ok, result.s) == (
        "t1",
        1,
        True,
        ready.s,
    )
    assert unpack_value(result.value) == {"k": [1, 2]}
    broker.send(identity, Stored(s=ready.s, task="t1", attempt=1))
    running.worker.request_stop()
    assert running.join(5.0) == 0


def test_ack_leads_a_quick_result_and_goes_alone_for_a_long_job(broker, start_worker):
    # Given a worker
    start_worker("w1", capacity=2)
    identity, ready = broker.register()

    # When a quick job and a two-second job are assigned
    quick = broker.assign(identity, ready.s, "t1", "echo", 1)
    kinds = []
    while len(kinds) < 2:
        message = broker.recv()[1]
        if not isinstance(message, Heartbeat):
            kinds.append(type(message))
    sent_at = time.monotonic()
    slow = broker.assign(identity, ready.s, "t2", "sleep", 2.0)
    ack = broker.expect(Ack, timeout_s=1.5)
    acked_in = time.monotonic() - sent_at

    # Then the quick job's ACK came right before its RESULT, and the slow
    # job's ACK came on its own timer, long before its result
    assert kinds == [Ack, Result]
    assert ack.n == [slow] and slow == quick + 1
    assert acked_in < 1.5
    assert not [m for _, m in broker.seen if isinstance(m, Result) and m.task == "t2"]
    assert broker.expect(Result, timeout_s=5.0, where=lambda m: m.task == "t2").ok


def test_duplicate_assign_is_acked_but_not_run_again(broker, start_worker, tmp_path):
    # Given a worker running a task that writes one ledger line per execution
    ledger = tmp_path / "ledger"
    start_worker()
    identity, ready = broker.register()
    payload = {"path": str(ledger), "s": 0.3}
    first = broker.assign(identity, ready.s, "t1", "probe_ledger", payload)
    assert broker.expect(Ack).n == [first]

    # When the same attempt is assigned again while running, after it
    # finished, and after STORED
    again = broker.assign(identity, ready.s, "t1", "probe_ledger", payload)
    assert broker.expect(Ack).n == [again]
    result = broker.expect(Result)
    assert result.ok
    after = broker.assign(identity, ready.s, "t1", "probe_ledger", payload)
    assert broker.expect(Ack).n == [after]
    broker.send(identity, Stored(s=ready.s, task="t1", attempt=1))
    late = broker.assign(identity, ready.s, "t1", "probe_ledger", payload)
    assert broker.expect(Ack).n == [late]

    # Then it ran once; a new attempt of the same task does run
    broker.assign(identity, ready.s, "t1", "probe_ledger", payload, attempt=2)
    retry = broker.expect(Result, where=lambda m: m.attempt == 2)
    assert retry.ok
    lines = ledger_lines(ledger)
    assert [line.split()[:2] for line in lines] == [["t1", "1"], ["t1", "2"]]


def test_result_is_resent_until_stored(broker, start_worker):
    # Given a finished task whose result the broker does not confirm
    start_worker(ack_timeout_s=0.2)
    identity, ready = broker.register()
    broker.assign(identity, ready.s, "t1", "echo", 1)
    broker.expect(Result)

    # Then the result comes again after the ack timeout
    broker.expect(Result, timeout_s=2.0)

    # And after STORED it stops
    broker.send(identity, Stored(s=ready.s, task="t1", attempt=1))
    seen = collect_for(broker, 0.3)
    seen = collect_for(broker, 0.8)
    assert not [m for m in seen if isinstance(m, Result)]


def test_welcome_resends_the_whole_outbox(broker, start_worker):
    # Given two unconfirmed results (long ack timeout, so no timer resend)
    start_worker(ack_timeout_s=30.0, capacity=2)
    identity, ready = broker.register()
    broker.assign(identity, ready.s, "t1", "echo", 1)
    broker.assign(identity, ready.s, "t2", "echo", 2)
    broker.expect(Result)
    broker.expect(Result)

    # When the broker asks for READY again and then welcomes the worker
    broker.send(identity, Reconnect(s=ready.s, reason="unknown session"))
    again = broker.expect(Ready)
    assert again.s == ready.s
    assert again.held == [["t1", 1], ["t2", 1]]
    broker.send(identity, Welcome(s=ready.s))

    # Then both results arrive again
    first = broker.expect(Result)
    second = broker.expect(Result)
    assert {first.task, second.task} == {"t1", "t2"}


def test_one_ready_answers_a_burst_of_reconnects(broker, start_worker):
    # Given a registered worker (heartbeats every second)
    start_worker(heartbeat_interval_s=1.0)
    identity, ready = broker.register()

    # When a restarted broker answers three messages with RECONNECT at once
    for _ in range(3):
        broker.send(identity, Reconnect(s=ready.s, reason="unknown session"))
    seen = collect_for(broker, 0.5)

    # Then the worker sent one READY, and sends another once welcomed and asked
    readies = [m for m in seen if isinstance(m, Ready)]
    assert len(readies) == 1 and readies[0].s == ready.s
    broker.send(identity, Welcome(s=ready.s))
    broker.send(identity, Reconnect(s=ready.s, reason="unknown session"))
    assert broker.expect(Ready, timeout_s=2.0).s == ready.s


def test_silent_broker_means_reconnect_with_held_attempts(broker, start_worker):
    # Given a worker running a long task and a broker that never heartbeats
    start_worker(liveness=3, heartbeat_interval_s=0.1)
    identity, ready = broker.register()
    broker.assign(identity, ready.s, "t1", "sleep", 3)
    broker.expect(Ack)

    # Then within liveness * interval plus backoff it announces itself again,
    # same session, still holding the running attempt
    again = broker.expect(Ready, timeout_s=3.0)
    assert again.s == ready.s and again.held == [["t1", 1]]
    assert broker.seen[-1][0] == b"w1"


def test_broker_restart_then_results_delivered_after_welcome(broker, start_worker):
    # Given a task that finishes while the broker is gone
    start_worker(liveness=3, heartbeat_interval_s=0.1)
    identity, ready = broker.register()
    broker.assign(identity, ready.s, "t1", "sleep", 0.3)
    broker.expect(Ack)
    broker.restart()

    # When the worker notices and registers again
    again = broker.expect(Ready, timeout_s=5.0, where=lambda m: m.held)
    assert again.held == [["t1", 1]]
    broker.send(identity, Welcome(s=again.s))

    # Then the result it kept is delivered
    result = broker.expect(Result)
    assert (result.task, result.ok) == ("t1", True)


def test_stop_exits_3_and_foreign_session_is_ignored(broker, start_worker):
    running = start_worker()
    identity, ready = broker.register()

    # A STOP meant for another session is ignored
    broker.send(identity, Stop(s="someone-else", reason="not you"))
    broker.assign(identity, ready.s, "t1", "echo", 1)
    assert broker.expect(Result).ok

    # The real one ends the worker with code 3
    broker.send(identity, Stop(s=ready.s, reason="w1 was taken over"))
    assert running.join(5.0) == 3


def test_request_stop_drains_then_bye(broker, start_worker):
    # Given a worker running a short task
    running = start_worker(grace_s=5.0)
    identity, ready = broker.register()
    broker.assign(identity, ready.s, "t1", "sleep", 0.5)
    broker.expect(Ack)

    # When asked to stop
    running.worker.request_stop()

    # Then it says DRAIN, hands back new work, finishes, and says BYE last
    broker.expect(Drain)
    n = broker.assign(identity, ready.s, "t2", "echo", 2)
    assert broker.expect(Ack).n == [n]
    assert broker.expect(Release).task == "t2"
    result = broker.expect(Result)
    assert (result.task, result.ok) == ("t1", True)
    broker.send(identity, Stored(s=ready.s, task="t1", attempt=1))
    broker.expect(Bye)
    assert running.join(3.0) == 0


def test_grace_end_releases_what_still_runs(broker, start_worker):
    # Given a worker with a short grace and a long task
    running = start_worker(grace_s=0.5)
    identity, ready = broker.register()
    broker.assign(identity, ready.s, "t1", "probe_ignore_cancel", 30)
    broker.expect(Ack)

    # When it is told to stop
    started = time.monotonic()
    running.worker.request_stop()

    # Then the task is handed back at the end of the grace and it exits in time
    release = broker.expect(Release)
    assert (release.task, release.attempt) == ("t1", 1)
    broker.expect(Bye)
    assert running.join(3.0) == 0
    assert time.monotonic() - started < 0.5 + 2.0


def test_exit_is_bounded_without_a_broker(broker, start_worker):
    # Given a worker whose broker is gone and an unconfirmed result
    running = start_worker(grace_s=1.0)
    identity, ready = broker.register()
    broker.assign(identity, ready.s, "t1", "echo", 1)
    broker.expect(Result)
    broker.close()

    # When told to stop, it exits 0 within grace + 2 s
    started = time.monotonic()
    running.worker.request_stop()
    assert running.join(4.0) == 0
    assert time.monotonic() - started < 1.0 + 2.0


@pytest.mark.parametrize(
    ("name", "payload", "expected"),
    [
        ("probe_segv", None, "died with signal SIGSEGV (-11)"),
        ("probe_exit", 137, "exited with code 137"),
    ],
)
def test_crashing_handler_is_reported_and_worker_serves_on(
    broker, start_worker, name, payload, expected
):
    start_worker()
    identity, ready = broker.register()

    broker.assign(identity, ready.s, "t1", name, payload)
    crash = broker.expect(Result)
    assert (crash.ok, crash.error_type) == (False, "HandlerCrashed")
    assert expected in crash.error

    broker.assign(identity, ready.s, "t2", "echo", "still here")
    result = broker.expect(Result, where=lambda m: m.task == "t2")
    assert unpack_value(result.value) == "still here"


def test_assign_beyond_capacity_is_released(broker, start_worker):
    start_worker(capacity=1)
    identity, ready = broker.register()
    broker.assign(identity, ready.s, "t1", "sleep", 30)
    broker.assign(identity, ready.s, "t2", "echo", 2)

    release = broker.expect(Release)
    assert (release.task, release.attempt) == ("t2", 1)
    assert "busy" in release.reason


def test_abort_cancels_a_running_attempt(broker, start_worker):
    start_worker()
    identity, ready = broker.register()
    broker.assign(identity, ready.s, "t1", "sleep", 30)
    broker.expect(Ack)

    broker.send(identity, Abort(s=ready.s, n=99, task="t1", attempt=1, reason="user"))
    assert broker.expect(Ack).n == [99]
    result = broker.expect(Result, timeout_s=3.0)
    assert (result.ok, result.cancelled, result.error_type) == (
        False,
        True,
        "Cancelled",
    )


def test_abort_of_unknown_attempt_blocks_a_late_assign(broker, start_worker, tmp_path):
    ledger = tmp_path / "ledger"
    start_worker()
    identity, ready = broker.register()

    broker.send(identity, Abort(s=ready.s, n=7, task="t9", attempt=1))
    assert broker.expect(Ack).n == [7]
    assert broker.expect(Result).cancelled

    broker.assign(identity, ready.s, "t9", "probe_ledger", {"path": str(ledger)})
    broker.expect(Ack)
    broker.assign(identity, ready.s, "t10", "echo", 1)
    broker.expect(Result, where=lambda m: m.task == "t10")
    assert ledger_lines(ledger) == []


def test_task_timeout_kills_the_handler(broker, start_worker):
    start_worker()
    identity, ready = broker.register()
    broker.assign(identity, ready.s, "t1", "probe_spin", 30, timeout=0.3)
    result = broker.expect(Result, timeout_s=5.0)
    assert (result.ok, result.error_type) == (False, "TaskTimeout")


def test_gil_bound_handler_does_not_starve_heartbeats(broker, start_worker):
    # Given a handler that holds the GIL of its process for 1.5 s
    start_worker(heartbeat_interval_s=0.1)
    identity, ready = broker.register()
    broker.assign(identity, ready.s, "t1", "probe_spin", 1.5)
    broker.expect(Ack)

    # Then heartbeats keep their pace while it runs
    beats = []
    while True:
        _, message = broker.recv(5.0)
        if isinstance(message, Heartbeat):
            beats.append(time.monotonic())
        if isinstance(message, Result):
            break
    gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
    assert len(beats) >= 10
    assert max(gaps) < 0.35


def test_bad_frames_are_dropped(broker, start_worker):
    start_worker()
    identity, ready = broker.register()
    broker.socket.send_multipart([identity, b"garbage"])
    broker.socket.send_multipart([identity, b"HKB1", b"ASSIGN", b"\xc1"])
    broker.socket.send_multipart([identity, b"HKB9", b"HEARTBEAT", b"\x80"])
    broker.socket.send_multipart(
        [
            identity,
            *protocol.Stored(s=ready.s, task="x", attempt=1).encode()[:2],
            b"\x80",
        ]
    )

    broker.assign(identity, ready.s, "t1", "echo", "ok")
    assert broker.expect(Result).ok


def test_unicode_worker_id_is_its_routing_id(broker, start_worker):
    start_worker("wörker-ü")
    identity, ready = broker.register()
    assert identity == "wörker-ü".encode()
    assert ready.worker_id == "wörker-ü"


@pytest.mark.parametrize(
    "bad_id",
    [b"\x00" + bytes(range(1, 16)), "x" * 256, b"\xff\xfe", "", " w1"],
)
def test_bad_worker_ids_are_refused(bad_id):
    with pytest.raises(ConfigError, match="invalid worker id"):
        Worker(bad_id)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="capacity"):
        Worker("w1", capacity=0)
    with pytest.raises(ConfigError, match="endpoint"):
        Worker("w1", broker="localhost")
    with pytest.raises(ConfigError, match="no_such_module_here"):
        Worker("w1", tasks=["no_such_module_here"])


def test_worker_runs_once(broker, start_worker):
    running = start_worker()
    broker.register()
    running.worker.request_stop()
    assert running.join(5.0) == 0
    with pytest.raises(RuntimeError, match="runs once"):
        running.worker.run()
