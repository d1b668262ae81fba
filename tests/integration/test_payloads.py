"""Payload sizes (C06) over tcp and ipc, and payload shapes (C28), through echo."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import msgpack
import pytest
from helpers.cluster import Cluster

from sdk import PayloadTooLarge, ProtocolError

MIB = 1024 * 1024
#: The payload limit M of C06.
LIMIT = 16 * MIB
SIZES = {"1KiB": 1024, "1MiB": MIB, "10MiB": 10 * MIB}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored(cluster: Cluster, task_id: str) -> tuple[Any, Any]:
    """Return the task's stored payload and result, unpacked."""
    ((payload, result),) = cluster.query(
        "select payload, result from tasks where id = ?", (task_id,)
    )
    unpack = {"raw": False, "strict_map_key": False}
    return msgpack.unpackb(payload, **unpack), msgpack.unpackb(result, **unpack)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_large_payloads_come_back_identical(cluster: Cluster, transport: str) -> None:
    # Given a broker and worker with a 16 MiB payload limit, over tcp or ipc
    if transport == "ipc":
        cluster.use_ipc()
    env = {"HAKOBU_MAX_PAYLOAD_BYTES": str(LIMIT)}
    cluster.start_broker(env=env)
    cluster.start_worker("w1", capacity=2, env=env)
    cluster.wait_workers("w1")
    client = cluster.client(request_timeout=30)
    problems = []

    # When random bytes of each size go through echo (just under M over tcp)
    sizes = dict(SIZES)
    if transport == "tcp":
        sizes["M-1KiB"] = LIMIT - 1024
    for label, size in sizes.items():
        data = os.urandom(size)
        handle = client.submit("echo", data)
        result = handle.result(timeout=30)
        payload_copy, result_copy = stored(cluster, handle.id)

        # Then they come back, and are stored, byte-identical
        if not isinstance(result, bytes) or sha(result) != sha(data):
            problems.append((label, "result differs"))
        if sha(payload_copy) != sha(data) or sha(result_copy) != sha(data):
            problems.append((label, "stored copy differs"))
    assert problems == []

    # And a payload over the limit is refused before anything is sent
    tasks_before = cluster.query("select count(*) from tasks")
    with pytest.raises(PayloadTooLarge) as info:
        client.submit("echo", b"x" * LIMIT)
    assert info.value.limit == LIMIT
    assert info.value.size > LIMIT
    assert cluster.query("select count(*) from tasks") == tasks_before
    assert client.submit("echo", "after").result(timeout=10) == "after"


C28_ITEMS: list[tuple[str, Any, Any]] = [
    ("unicode", "héllo 😂", "héllo 😂"),
    ("bytes", b"\x00\xff", b"\x00\xff"),
    ("three_mb_string", "漢字" * 500_000, "漢字" * 500_000),
    ("tuple", (1, 2), [1, 2]),
    ("int_key", {7: "x"}, {7: "x"}),
    ("bytes_key", {b"k": 1}, {b"k": 1}),
    (
        "mixed",
        {"s": b"b", b"b": "s", 1: [(b"",), ""]},
        {"s": b"b", b"b": "s", 1: [[b""], ""]},
    ),
]


def shape(value: Any) -> Any:
    """Types all the way down, so str/bytes mixups show."""
    if isinstance(value, dict):
        return {(type(k), k): shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value)


@pytest.mark.timeout(60)
def test_payload_shapes_round_trip(cluster: Cluster) -> None:
    # Given a broker and a worker
    cluster.start_broker()
    cluster.start_worker("w1", capacity=2)
    cluster.wait_workers("w1")
    client = cluster.client(request_timeout=10)
    problems = []

    # When each C28 item goes through echo, followed by an ordinary echo
    for label, value, expected in C28_ITEMS:
        try:
            handle = client.submit("echo", value)
            result = handle.result(timeout=20)
            payload_copy, result_copy = stored(cluster, handle.id)
        except Exception as exc:  # collected so one item cannot hide another
            problems.append((label, repr(exc)[:200]))
            continue
        # Then str stays str, bytes stays bytes, in the result and the store
        for where, got in (("result", result), ("stored", payload_copy)):
            if got != expected or shape(got) != shape(expected):
                problems.append((label, where, repr(got)[:80]))
        if result_copy != expected:
            problems.append((label, "stored result", repr(result_copy)[:80]))
        if client.submit("echo", label).result(timeout=10) != label:
            problems.append((label, "ordinary echo after it failed"))
    assert problems == []

    # And a lone surrogate is refused at submit; the broker is unaffected
    with pytest.raises(ProtocolError) as info:
        client.submit("echo", "\ud83d")
    assert "surrogate" in str(info.value)
    assert client.submit("echo", "still fine").result(timeout=10) == "still fine"
