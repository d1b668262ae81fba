"""The outbox, the memory of finished attempts and the drain deadlines."""

from __future__ import annotations

from sdk.protocol import Result
from worker.drain import CLOSE_RESERVE_S, FLUSH_S, Drain
from worker.outbox import Outbox, RecentAttempts


def result(task, attempt=1):
    return Result(s="s", task=task, attempt=attempt, ok=True)


def test_outbox_resends_only_what_is_due_until_confirmed():
    outbox = Outbox()
    outbox.add(result("a"), now=0.0)
    outbox.add(result("b"), now=1.0)
    assert outbox.next_due_at(2.0) == 2.0
    assert [r.task for r in outbox.due(2.0, 2.0)] == ["a"]
    assert outbox.due(2.5, 2.0) == []
    assert outbox.confirm(("a", 1)) and not outbox.confirm(("a", 1))
    assert outbox.keys() == [("b", 1)] and ("b", 1) in outbox
    assert [r.task for r in outbox.everything(3.0)] == ["b"]
    assert outbox.next_due_at(2.0) == 5.0


def test_recent_attempts_forget_the_oldest():
    recent = RecentAttempts(limit=3)
    for n in range(5):
        recent.add(("t", n))
    assert len(recent) == 3
    assert ("t", 1) not in recent and ("t", 4) in recent


def test_drain_deadlines_fit_grace_plus_flush():
    drain = Drain(now=10.0, grace_s=5.0)
    assert drain.next_at(is_running=True) == 15.0
    assert not drain.is_grace_over(14.9) and drain.is_grace_over(15.0)
    # handlers done at 16: the flush is cut so that closing fits the deadline
    assert drain.start_flush(16.0) == 15.0 + FLUSH_S - CLOSE_RESERVE_S
    assert drain.start_flush(16.5) == 15.0 + FLUSH_S - CLOSE_RESERVE_S
    assert drain.linger_ms(16.2) == 500
    assert drain.linger_ms(17.0) == 0


def test_drain_force_ends_the_grace():
    drain = Drain(now=0.0, grace_s=30.0)
    drain.force(1.0)
    assert drain.is_grace_over(1.0)
    assert drain.start_flush(1.0) == 1.0 + FLUSH_S
