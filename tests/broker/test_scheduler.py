"""The scheduler as a state machine: events in, exact effects out, no sockets."""

from __future__ import annotations

import pytest

from broker.scheduler import Scheduler
from config.settings import BrokerSettings
from sdk import protocol

pytestmark = pytest.mark.timeout(10)


class Harness:
    """Drives a Scheduler with a hand-set clock and records what it sends."""

    def __init__(self, **settings: object) -> None:
        defaults = {"heartbeat_interval_s": 1.0, "liveness": 3, "ack_timeout_s": 2.0}
        defaults.update(settings)
        settings = BrokerSettings(**defaults)  # type: ignore[arg-type]
        self.sched = Scheduler(settings, self._payload)
        self.now = 100.0
        self.wall = 1_000_000.0
        self.sends: list[tuple[str, protocol.Message]] = []
        self.ended: list[str] = []
        self.count = 0
        self.silent: set[str] = set()
        self.turn()

    def _payload(self, task_id: str) -> bytes:
        raise AssertionError("payloads stay in memory in these tests")

    def turn(self, advance: float = 0.0) -> None:
        """Finish the current turn (tick + assign) and start a new one.

        Every online worker not in `silent` is heard from at the turn's end.
        """
        self.sched.tick(may_expire=True)
        self.sched.assign()
        self.sends += self.sched.effects.sends
        self.ended += [t.id for t in self.sched.effects.ended]
        self.now += advance
        self.wall += advance
        self.sched.begin_turn(self.now, self.wall)
        for worker in self.sched.workers.values():
            if worker.state == "online" and worker.id not in self.silent:
                self.sched.heard(worker.id, self.now)

    def ready(self, wid: str, capacity: int = 1, held=(), tags=(), s: str = "") -> None:
        msg = protocol.Ready(
            s=s or f"s-{wid}",
            worker_id=wid,
            capacity=capacity,
            tags=list(tags),
            handlers=["echo", "sleep"],
            held=[list(p) for p in held],
        )
        self.sched.ready(msg, self.now)

    def submit(self, name: str = "echo", **kw: object) -> str:
        self.count += 1
        task_id = f"t{self.count:03d}"
        request = protocol.Submit(
            rid=1,
            name=name,
            payload=b"\xc0",
            key=task_id,
            **kw,  # type: ignore[arg-type]
        )
        self.sched.submit(request, task_id)
        return task_id

    def assigns(self, wid: str | None = None) -> list[protocol.Assign]:
        return [
            m
            for w, m in self.sends
            if isinstance(m, protocol.Assign) and (wid is None or w == wid)
        ]

    def ack_all(self, wid: str) -> None:
        worker = self.sched.workers[wid]
        ids = [a.n for a in self.assigns(wid)]
        self.sched.ack(worker, ids)

    def finish(self, wid: str, assign: protocol.Assign, ok: bool = True, **kw) -> None:
        worker = self.sched.workers[wid]
        result = protocol.Result(
            s=worker.session or "",
            task=assign.task,
            attempt=assign.attempt,
            ok=ok,
            **kw,
        )
        self.sched.result(worker, result)

    def task(self, task_id: str):
        return self.sched.tasks[task_id]


def test_capacity_is_never_exceeded_and_least_loaded_worker_goes_first():
    # Given two workers, capacity 2 and 1
    h = Harness()
    h.ready("w1", capacity=2)
    h.ready("w2", capacity=1)
    # When five tasks arrive
    ids = [h.submit() for _ in range(5)]
    h.turn()
    # Then only three are assigned: the first to the emptiest worker (w1)
    assert [a.task for a in h.assigns()] == ids[:3]
    assert len(h.assigns("w1")) == 2
    assert len(h.assigns("w2")) == 1
    assert h.assigns()[0].task == ids[0] and h.sends[2][0] == "w1"
    assert [h.task(i).state for i in ids] == ["assigned"] * 3 + ["queued"] * 2


def test_ack_marks_running_and_result_ends_the_task_once():
    h = Harness()
    h.ready("w1")
    task_id = h.submit()
    h.turn()
    (assign,) = h.assigns("w1")
    h.ack_all("w1")
    assert h.task(task_id).state == "running"
    h.finish("w1", assign, value=b"\x01")
    h.finish("w1", assign, value=b"\x02")  # duplicate RESULT
    h.turn()
    assert h.ended == [task_id]
    stored = [m for _, m in h.sends if isinstance(m, protocol.Stored)]
    assert len(stored) == 2  # both confirmed so the worker drops them
    assert h.sched.workers["w1"].held == set()


def test_preferred_task_waits_for_a_busy_connected_worker():
    h = Harness(fallback_after_s=1.0)
    h.ready("w1")
    h.ready("w2")
    blocker = h.submit(preferred_worker="w1", require_worker=True)
    h.turn()
    waiting = h.submit(preferred_worker="w1")
    h.turn(advance=30.0)
    h.turn()
    assert h.task(blocker).worker_id == "w1"
    assert h.task(waiting).state == "queued"
    assert "free slot on preferred worker w1" in h.sched.why_waiting(h.task(waiting))


def test_preferred_task_falls_back_after_its_worker_is_gone_long_enough():
    h = Harness()
    h.ready("w2")
    task_id = h.submit(preferred_worker="ghost", fallback_after=1.0)
    h.turn(advance=0.5)
    h.turn()
    assert h.task(task_id).state == "queued"
    h.turn(advance=0.6)
    h.turn()
    assert h.task(task_id).worker_id == "w2"
    assert "preferred worker ghost unavailable" in h.task(task_id).reason


def test_required_task_never_falls_back_and_fails_at_its_start_deadline():
    h = Harness()
    h.ready("w2")
    task_id = h.submit(
        preferred_worker="ghost", require_worker=True, start_deadline=2.0
    )
    h.turn(advance=1.9)
    h.turn()
    assert h.task(task_id).state == "queued"
    h.turn(advance=0.2)
    h.turn()
    assert h.ended == [task_id]
    assert h.assigns() == []
    error = h.sched.tasks[task_id].error
    assert error.endswith(
        "waiting for required worker ghost, which has never connected"
    )


def test_priority_with_ageing_orders_the_queue():
    h = Harness(priority_aging_s=10.0)
    low = h.submit(priority=0)
    h.turn(advance=1.0)
    high = h.submit(priority=1)
    h.turn(advance=20.0)
    late_high = h.submit(priority=1)
    h.ready("w1", capacity=3)
    h.turn()
    # high (newer, +1) beats low (1 s older); low has aged past late_high (21 s)
    assert [a.task for a in h.assigns()] == [high, low, late_high]


def test_tags_route_only_to_workers_that_have_them():
    h = Harness()
    h.ready("plain", capacity=4)
    h.ready("gpu", capacity=1, tags=["gpu"])
    ids = [h.submit(tags=["gpu"]) for _ in range(3)]
    h.turn()
    assert [a.task for a in h.assigns("gpu")] == ids[:1]
    assert h.assigns("plain") == []
    assert "all 1 eligible workers are busy" == h.sched.why_waiting(h.task(ids[1]))


def test_delayed_task_is_not_assigned_before_its_time():
    h = Harness()
    h.ready("w1")
    task_id = h.submit(delay=5.0)
    h.turn(advance=4.9)
    h.turn()
    assert h.assigns() == []
    h.turn(advance=0.2)
    h.turn()
    assert [a.task for a in h.assigns()] == [task_id]


def test_silent_worker_is_lost_and_its_task_requeued_with_the_attempt_counted():
    h = Harness()
    h.ready("w1")
    task_id = h.submit()
    h.turn()
    h.ack_all("w1")
    h.silent.add("w1")
    h.turn(advance=3.5)  # liveness 3 x 1 s
    h.turn()
    task = h.task(task_id)
    assert h.sched.workers["w1"].state == "lost"
    assert (task.state, task.attempts, task.losses) == ("queued", 1, 1)
    assert task.error == "worker w1 was lost: no heartbeat for 3.5s"
    # When another worker arrives, the task goes there as attempt 2
    h.ready("w2")
    h.turn()
    assert [(a.task, a.attempt) for a in h.assigns("w2")] == [(task_id, 2)]


def test_unacknowledged_assign_is_resent_with_backoff_then_given_up():
    h = Harness(max_sends=3)
    h.ready("w1")
    task_id = h.submit()
    h.turn()
    for _ in range(40):
        h.turn(advance=0.5)
    sends = [a for a in h.assigns("w1") if a.task == task_id]
    assert len(sends) == 3  # first send + 2 re-sends, then given up
    task = h.task(task_id)
    assert task.error_type == "WorkerUnreachable"
    assert any(isinstance(m, protocol.Reconnect) for _, m in h.sends)


def test_returning_worker_re_adopts_a_requeued_attempt_it_still_runs():
    h = Harness()
    h.ready("w1")
    task_id = h.submit()
    h.turn()
    h.ack_all("w1")
    h.silent.add("w1")
    h.turn(advance=3.5)
    h.turn()
    h.silent.clear()
    assert h.task(task_id).state == "queued"
    # The same process comes back (e.g. after SIGSTOP/SIGCONT) holding attempt 1
    h.ready("w1", held=[(task_id, 1)])
    h.turn()
    task = h.task(task_id)
    assert (task.state, task.worker_id, task.attempts) == ("running", "w1", 1)
    assert h.assigns("w1")[-1].attempt == 1  # no second attempt was sent


def test_late_success_from_a_superseded_attempt_wins_and_aborts_the_other():
    h = Harness()
    h.ready("w1")
    task_id = h.submit()
    h.turn()
    (first,) = h.assigns("w1")
    h.ack_all("w1")
    h.silent.add("w1")
    h.turn(advance=3.5)
    h.turn()
    h.ready("w2")
    h.turn()
    # The same w1 process comes back still holding attempt 1, then finishes it
    h.silent.clear()
    h.ready("w1", held=[(task_id, 1)])
    h.turn()
    h.finish("w1", first, value=b"\x05")
    h.turn()
    assert h.ended == [task_id]
    aborts = [(w, m.attempt) for w, m in h.sends if isinstance(m, protocol.Abort)]
    assert aborts == [("w1", 1), ("w2", 2)]
    assert h.sched.tasks[task_id].result == b"\x05"


def test_failed_attempts_retry_then_fail_with_every_error_kept():
    h = Harness(retry_backoff_s=0.0)
    h.ready("w1")
    task_id = h.submit(name="echo", retries=2)
    for attempt in range(1, 4):
        h.turn()
        assign = h.assigns("w1")[-1]
        assert (assign.task, assign.attempt) == (task_id, attempt)
        h.finish(
            "w1", assign, ok=False, error_type="RuntimeError", error=f"boom{attempt}"
        )
    h.turn()
    assert h.ended == [task_id]
    ended = h.sched.tasks[task_id]
    assert ended.state == "failed"
    assert [e["error"] for e in ended.attempt_errors] == ["boom1", "boom2", "boom3"]


def test_new_session_with_the_same_id_requeues_the_old_process_work():
    h = Harness()
    h.ready("w1", s="old")
    task_id = h.submit()
    h.turn()
    h.ack_all("w1")
    h.ready("w1", s="new")
    h.turn()
    assert h.sched.session_status("w1", "old") == "replaced"
    assert h.sched.session_status("w1", "new") == "ok"
    assert [(a.task, a.attempt) for a in h.assigns("w1")][-1] == (task_id, 2)


def test_cancel_of_a_running_task_aborts_it_and_keeps_the_slot_until_it_reports():
    h = Harness()
    h.ready("w1")
    task_id = h.submit()
    h.submit()
    h.turn()
    h.ack_all("w1")
    assert h.sched.cancel(task_id).state == "cancelled"
    h.turn()
    aborts = [m for w, m in h.sends if isinstance(m, protocol.Abort)]
    assert [(m.task, m.attempt) for m in aborts] == [(task_id, 1)]
    assert len(h.assigns("w1")) == 1  # the slot is still taken
    h.finish("w1", h.assigns("w1")[0], ok=False, cancelled=True, error_type="Cancelled")
    h.turn()
    assert len(h.assigns("w1")) == 2


def test_a_worker_that_vanishes_before_acknowledging_still_uses_up_attempts():
    # Given a task that a worker keeps receiving and never acknowledges
    h = Harness(max_attempts=3)
    task_id = h.submit()
    for round_ in range(1, 4):
        h.silent.discard("w1")
        h.ready("w1", s=f"session-{round_}")
        h.turn()
        h.silent.add("w1")
        h.turn(advance=3.5)  # lost: liveness 3 x 1 s
        h.turn()
    # Then the third loss ends it failed instead of cycling for ever
    assert h.ended == [task_id]
    assert h.sched.tasks[task_id].state == "failed"
    assert sorted({a.attempt for a in h.assigns("w1")}) == [1, 2, 3]
