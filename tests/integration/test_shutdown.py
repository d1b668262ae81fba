"""Processes exit promptly with messages still queued for absent peers (C08)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from helpers.cluster import FAST_WORKER, Cluster
from helpers.raw import RawSockets
from helpers.waiting import wait_until

from sdk import protocol

#: The worker grace period G of these cases, in seconds.
GRACE_S = 2.0
#: The grace period of workers started with the cluster's defaults.
WORKER_GRACE_S = float(FAST_WORKER["HAKOBU_GRACE_S"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("task_seconds", [0.5, 30.0], ids=["result_queued", "running"])
def test_worker_without_broker_exits_within_grace(
    cluster: Cluster, task_seconds: float
) -> None:
    # Given a worker running a task for a broker that then dies
    broker = cluster.start_broker()
    worker = cluster.start_worker("w1", capacity=1, env={"HAKOBU_GRACE_S": "2"})
    cluster.wait_workers("w1")
    handle = cluster.client().submit("probe_sleep", task_seconds)
    wait_until(lambda: cluster.ledger.starts(handle.id), 10, what="task start")
    cluster.kill(broker)
    if task_seconds < 1:
        # its RESULT is now queued for nobody, and so are its heartbeats
        wait_until(lambda: cluster.ledger.ends(handle.id), 10, what="task end")

    # When the worker is asked to stop
    stopped_at = time.monotonic()
    cluster.send_signal(worker, signal.SIGTERM)

    # Then it exits within G + 2 s, by itself rather than by the signal
    code = worker.wait(GRACE_S + 2)
    assert time.monotonic() - stopped_at <= GRACE_S + 2
    assert code >= 0, f"worker died of signal {-code}"


CLIENT_SCRIPT = """
import sys, time
from sdk import BrokerUnavailable, Client
client = Client(sys.argv[1], request_timeout=1.0, retries=0)
if sys.argv[2] == "with":
    client = client.__enter__()
print("submit", time.monotonic(), flush=True)
try:
    client.submit("echo", "nobody hears this")
except BrokerUnavailable as exc:
    print("raised", time.monotonic(), isinstance(exc, TimeoutError), flush=True)
if sys.argv[2] == "with":
    client.__exit__(None, None, None)
"""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("close", ["with", "without"])
def test_client_without_broker_raises_and_exits(cluster: Cluster, close: str) -> None:
    # Given no broker at the clients endpoint
    endpoint = cluster.clients_endpoint

    # When a client (request timeout 1 s) submits, then leaves, closing or not
    proc = cluster.start_script(f"client-{close}", CLIENT_SCRIPT, endpoint, close)
    code = proc.wait(15)
    exited_at = time.monotonic()

    # Then it raised BrokerUnavailable after about 1 s and exited within 3 s
    lines = dict(
        line.split(" ", 1)
        for line in proc.log_text().splitlines()
        if line.startswith(("submit ", "raised "))
    )
    assert code == 0, proc.log_text()
    assert "raised" in lines, proc.log_text()
    submit_at = float(lines["submit"])
    raised_at, is_timeout = lines["raised"].split()
    assert is_timeout == "True"
    assert 0.9 <= float(raised_at) - submit_at <= 2.0
    assert exited_at - submit_at <= 3.0


@pytest.mark.timeout(60)
def test_broker_sigterm_with_unacknowledged_assigns(
    cluster: Cluster, raw: RawSockets
) -> None:
    # Given a broker, two real workers and 20 fake workers that never ACK
    # (nor heartbeat: a long liveness keeps them registered on a slow machine)
    broker = cluster.start_broker(env={"HAKOBU_LIVENESS": "1000"})
    cluster.start_worker("w1", capacity=2)
    cluster.start_worker("w2", capacity=2)
    fakes = []
    for i in range(20):
        fake = raw.dealer(cluster.workers_endpoint, identity=f"fake-{i}".encode())
        ready = protocol.Ready(
            s=f"fake-session-{i}",
            worker_id=f"fake-{i}",
            capacity=50,
            handlers=["echo", "sleep"],
            pid=os.getpid(),
            host="test",
        )
        fake.send_multipart(ready.encode())
        fakes.append(fake)
    cluster.wait_workers("w1", "w2", *(f"fake-{i}" for i in range(20)))
    client = cluster.client()

    # When 300 tasks are assigned, most to workers that never acknowledge
    for i in range(300):
        client.submit("echo", i)
    wait_until(
        lambda: (
            cluster.query(
                "select count(*) from worker_notifications where processed = 0"
            )[0][0]
            >= 100
        ),
        10,
        what="ASSIGNs waiting for an ACK",
    )

    # Then SIGTERM ends the broker promptly and cleanly
    stopped_at = time.monotonic()
    code = cluster.kill(broker, signal.SIGTERM, timeout_s=GRACE_S + 2)
    assert code == 0, broker.log_text()[-2000:]
    assert time.monotonic() - stopped_at <= GRACE_S + 2
    # And the real workers, left without a broker, still stop within G + 2 s
    for worker in cluster.workers.values():
        cluster.send_signal(worker, signal.SIGTERM)
    for worker in cluster.workers.values():
        assert worker.wait(WORKER_GRACE_S + 2) >= 0
