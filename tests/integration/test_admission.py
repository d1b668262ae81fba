"""Who the broker lets in: one broker per store, workers whose payload limit
fits the broker's, worker ids that are valid routing ids."""

from __future__ import annotations

import os

import pytest
from helpers.cluster import CLI, Cluster
from helpers.raw import RawSockets
from helpers.waiting import free_port

from sdk import TaskFailed, protocol


@pytest.mark.timeout(60)
def test_a_second_broker_on_the_same_store_is_refused(cluster: Cluster) -> None:
    # Given a broker serving a store
    cluster.start_broker()
    client = cluster.client()
    assert client.workers() == []

    # When another broker is started on the same store, on other endpoints
    args = [
        *CLI,
        "broker",
        "--workers-endpoint",
        f"tcp://127.0.0.1:{free_port()}",
        "--clients-endpoint",
        f"tcp://127.0.0.1:{free_port()}",
        "--db",
        str(cluster.db_path),
    ]
    second = cluster.spawn("second", args, cluster.base_env(), "second.log")

    # Then it exits with the store error, naming the owner, and the first serves on
    assert second.popen.wait(timeout=20) == 4
    text = second.log_path.read_text()
    assert "is in use by another broker (pid" in text
    assert client.submit("echo", "still here").id


@pytest.mark.timeout(60)
def test_worker_with_a_smaller_payload_limit_is_refused_at_registration(
    cluster: Cluster,
) -> None:
    # Given a broker accepting 16 MiB payloads
    cluster.start_broker()

    # When a worker that accepts only 1 MiB registers
    worker = cluster.start_worker(
        "small", env={"HAKOBU_MAX_PAYLOAD_BYTES": str(1024 * 1024)}
    )

    # Then it is told to stop with the reason, rather than losing big tasks later
    assert worker.popen.wait(timeout=20) == 3
    assert "below the broker's 16777216" in worker.log_path.read_text()


@pytest.mark.timeout(60)
def test_result_over_the_broker_limit_fails_the_task_instead_of_hanging(
    cluster: Cluster, tmp_path: os.PathLike[str]
) -> None:
    # Given a broker limited to 1 MiB and a worker allowing 40 MiB
    limit = 1024 * 1024
    cluster.start_broker(env={"HAKOBU_MAX_PAYLOAD_BYTES": str(limit)})
    cluster.start_worker("big", env={"HAKOBU_MAX_PAYLOAD_BYTES": str(40 * limit)})
    cluster.wait_workers("big")
    client = cluster.client()

    # When a task returns 2 MiB (echo of a payload under the limit cannot; so
    # the probe builds the result on the worker)
    handle = client.submit("probe_big_result", 2 * limit)

    # Then the task fails promptly with PayloadTooLarge, and the worker serves on
    with pytest.raises(TaskFailed) as info:
        handle.result(timeout=20)
    assert info.value.error_type == "PayloadTooLarge"
    assert client.submit("echo", "after").result(timeout=10) == "after"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_id", [b"\x00bad", b"bad\x07", b"\xff\xfe"])
def test_ready_with_an_invalid_worker_id_is_stopped(
    cluster: Cluster, raw: RawSockets, worker_id: bytes
) -> None:
    # Given a broker
    cluster.start_broker()
    dealer = raw.dealer(cluster.workers_endpoint, identity=worker_id)

    # When a hand-made READY arrives under an invalid routing id
    text_id = worker_id.decode("utf-8", "replace")
    ready = protocol.Ready(s="s1", worker_id=text_id, capacity=1, handlers=["echo"])
    dealer.send_multipart(ready.encode())

    # Then it is dropped or told to stop, and never listed as a worker
    reply = raw.recv_or_none(dealer, 3.0)
    if reply is not None:
        message = protocol.decode(reply, protocol.BROKER_MESSAGES)
        assert isinstance(message, protocol.Stop)
    assert cluster.client().workers() == []
