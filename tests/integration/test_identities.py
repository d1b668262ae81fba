"""Worker ids that break routing (C04): refused at start with a clear message,
Unicode kept exactly, and two live workers with one id resolved."""

from __future__ import annotations

import random

import pytest
from helpers.cluster import Cluster, Proc
from helpers.waiting import assert_stays, wait_until

UNICODE_ID = "wörker-ü"
#: Bad ids that fit in argv: (b) too long, (c) not UTF-8 (raw bytes ff fe,
#: passed through os.fsencode), (d) empty. (a) needs a NUL byte: see the API test.
BAD_CLI_IDS = {
    "b_256_chars": "x" * 256,
    "c_not_utf8": b"\xff\xfe".decode("utf-8", "surrogateescape"),
    "d_empty": "",
}


def assert_refused(proc: Proc) -> None:
    """The process exits non-zero soon, saying what is wrong with the id."""
    code = proc.wait(20)
    text = proc.log_text()
    assert code != 0, text[-2000:]
    assert "worker id" in text.lower(), text[-2000:]
    assert "Traceback (most recent call last)" not in text, text[-2000:]


@pytest.mark.timeout(60)
def test_bad_ids_are_refused_at_start(cluster: Cluster) -> None:
    # Given a broker
    cluster.start_broker()
    client = cluster.client()

    # When workers start with ids ZeroMQ cannot route as text
    procs = {
        label: cluster.start_worker(worker_id, log_name=f"worker-{label}.log")
        for label, worker_id in BAD_CLI_IDS.items()
    }

    # Then each exits non-zero with a clear message and never registers
    for proc in procs.values():
        assert_refused(proc)
    assert client.workers() == []


API_SCRIPT = """
import sys
from config import ConfigError
from worker import Worker
for raw in sys.argv[2:]:
    try:
        Worker(bytes.fromhex(raw), broker=sys.argv[1], capacity=1).run()
    except ConfigError as exc:
        print("refused", raw, str(exc).replace(chr(10), " "), flush=True)
    else:
        print("accepted", raw, flush=True)
"""


@pytest.mark.timeout(60)
def test_bad_byte_ids_are_refused_by_the_worker_api(cluster: Cluster) -> None:
    # Given a broker, and ids only the Worker API can pass: (a) 16 random
    # bytes starting with 0x00, (c) bytes that are not UTF-8
    cluster.start_broker()
    rng = random.Random(4)
    ids = [b"\x00" + rng.randbytes(15) for _ in range(3)] + [b"\xff\xfe"]

    # When a Worker is made with each
    proc = cluster.start_script(
        "worker-api", API_SCRIPT, cluster.workers_endpoint, *(i.hex() for i in ids)
    )

    # Then each is refused, the same way every time, with a clear message
    assert proc.wait(20) == 0, proc.log_text()
    lines = [
        line.split(" ", 2)
        for line in proc.log_text().splitlines()
        if line.startswith(("refused ", "accepted "))
    ]
    outcomes = {raw: (verdict, why) for verdict, raw, why in lines}
    assert {raw: verdict for raw, (verdict, _) in outcomes.items()} == {
        i.hex(): "refused" for i in ids
    }
    assert all("worker id" in why for _, why in outcomes.values())
    assert "UTF-8" in outcomes[b"\xff\xfe".hex()][1]
    assert cluster.client().workers() == []


@pytest.mark.timeout(60)
def test_unicode_id_is_kept_exactly(cluster: Cluster) -> None:
    # Given a broker and a worker whose id is not ASCII
    cluster.start_broker()
    proc = cluster.start_worker(UNICODE_ID, capacity=1)
    cluster.wait_workers(UNICODE_ID)
    client = cluster.client()

    # When a task pinned to it runs
    handle = client.submit(
        "probe_sleep", 0.1, preferred_worker=UNICODE_ID, require_worker=True
    )
    assert handle.result(timeout=15) == 0.1

    # Then workers(), status(), the store and the handler all show the id exactly
    (info,) = client.workers()
    assert info.id == UNICODE_ID
    assert info.pid == proc.pid
    status = client.status(handle.id)
    assert (status.worker_id, status.preferred_worker) == (UNICODE_ID, UNICODE_ID)
    assert cluster.query("select id from workers") == [(UNICODE_ID,)]
    assert cluster.query("select worker_id from tasks where id = ?", (handle.id,)) == [
        (UNICODE_ID,)
    ]
    assert {row["worker_id"] for row in cluster.notifications(handle.id)} == {
        UNICODE_ID
    }
    assert [line["worker_id"] for line in cluster.ledger.starts(handle.id)] == [
        UNICODE_ID
    ]
    assert UNICODE_ID in client.tasks(worker=UNICODE_ID)[0].worker_id


@pytest.mark.timeout(60)
def test_two_live_workers_with_one_id(cluster: Cluster) -> None:
    # Given a broker and a registered w1
    cluster.start_broker()
    first = cluster.start_worker("w1", capacity=2, log_name="worker-w1-first.log")
    cluster.wait_workers("w1")
    client = cluster.client()

    # When a second process starts as w1 while the first is heartbeating
    second = cluster.start_worker("w1", capacity=2, log_name="worker-w1-second.log")

    # Then exactly one of them leaves, non-zero, and the other stays on as w1
    loser = wait_until(
        lambda: [p for p in (first, second) if not p.is_alive()],
        15,
        what="one of the two w1 processes to exit",
    )
    assert len(loser) == 1, "both w1 processes exited"
    (winner,) = [p for p in (first, second) if p.is_alive()]
    assert loser[0].returncode not in (0, None), loser[0].log_text()[-2000:]
    wait_until(
        lambda: (
            [(w.id, w.pid, w.state) for w in client.workers()]
            == [("w1", winner.pid, "online")]
        ),
        10,
        what=lambda: cluster.describe_workers(client),
    )
    assert_stays(winner.is_alive, 2.0, what="the remaining w1")

    # And the broker keeps serving w1 with no task lost or run twice
    handles = [client.submit("probe_sleep", 0.1) for _ in range(10)]
    assert [h.result(timeout=20) for h in handles] == [0.1] * 10
    assert {client.status(h.id).worker_id for h in handles} == {"w1"}
    runs = cluster.ledger.executions()
    assert {h.id: runs[h.id] for h in handles} == {h.id: 1 for h in handles}
    assert first.is_alive() != second.is_alive()
