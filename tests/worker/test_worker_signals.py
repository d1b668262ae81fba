"""SIGTERM and SIGINT on a worker process running in its own main thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from sdk.protocol import Ack, Bye, Drain, Release, Result, Stored

SCRIPT = """
import sys
from config.settings import WorkerSettings
from worker import Worker
settings = WorkerSettings(
    worker_id="sig1", broker_endpoint=sys.argv[1], heartbeat_interval_s=0.1,
    liveness=30, grace_s=float(sys.argv[2]),
)
sys.exit(Worker(settings=settings).run())
"""


def start_process(endpoint, grace_s):
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, endpoint, str(grace_s)],
        cwd=os.getcwd(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_process(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def test_sigterm_drains_and_exits_zero(broker):
    # Given a worker process running a short task
    proc = start_process(broker.endpoint, 5.0)
    try:
        identity, ready = broker.register(timeout_s=20.0)
        broker.assign(identity, ready.s, "t1", "sleep", 0.5)
        broker.expect(Ack)

        # When it gets SIGTERM
        os.kill(proc.pid, signal.SIGTERM)

        # Then it drains: DRAIN, the result, BYE, exit code 0
        broker.expect(Drain, timeout_s=2.0)
        result = broker.expect(Result)
        assert (result.task, result.ok) == ("t1", True)
        broker.send(identity, Stored(s=ready.s, task="t1", attempt=1))
        broker.expect(Bye)
        assert proc.wait(5.0) == 0
    finally:
        stop_process(proc)


def test_second_sigint_ends_the_grace_at_once(broker):
    # Given a worker with a long grace running a task that ignores cancel
    proc = start_process(broker.endpoint, 30.0)
    try:
        identity, ready = broker.register(timeout_s=20.0)
        broker.assign(identity, ready.s, "t1", "sleep", 60)
        broker.expect(Ack)

        # When Ctrl-C comes twice
        os.kill(proc.pid, signal.SIGINT)
        broker.expect(Drain, timeout_s=2.0)
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)

        # Then the task is handed back and the worker exits well before the grace
        assert broker.expect(Release).task == "t1"
        broker.expect(Bye, timeout_s=5.0)
        assert proc.wait(5.0) == 0
        assert time.monotonic() - started < 5.0
    finally:
        stop_process(proc)
