"""Hostile and corrupt frames on both broker endpoints (C30): the broker answers
a malformed request with ERROR, drops the rest, and keeps serving."""

from __future__ import annotations

import random
import time
import uuid

import msgpack
import psutil
import pytest
from helpers.cluster import Cluster
from helpers.raw import RawSockets
from helpers.waiting import wait_until

from sdk import TaskNotFound, protocol

#: C30 (a)-(d), (h): bodies that are not a message.
HOSTILE_BODIES = {
    "a_bin32_claims_4GiB": b"\xc6\xff\xff\xff\xff",
    "b_deep_nesting": b"\x91" * 100_000 + b"\xc0",
    "c_array32_claims_4G_items": b"\xdd\xff\xff\xff\xff",
    "d_truncated": b"\x92\x01",
    "h_list_as_map_key": b"\x81\x90\x01",
}
#: Payload limit here: over a 1 MB task name, small enough for cheap oversize frames.
MAX_PAYLOAD = 2 * 1024 * 1024
#: Broker RSS may grow by this much over the whole attack (C30: < 50 MB).
RSS_BUDGET_BYTES = 50 * 1024 * 1024


def submit_frames(**fields: object) -> list[bytes]:
    body = {"rid": 7, "name": "echo", "payload": b"\xc0", "key": uuid.uuid4().hex}
    body.update(fields)
    return [protocol.HEADER, b"SUBMIT", msgpack.packb(body, use_bin_type=True)]


def malformed_requests() -> dict[str, list[bytes]]:
    """Requests a REQ client can send that the broker must answer with ERROR."""
    cases = {
        name: [protocol.HEADER, b"SUBMIT", body]
        for name, body in HOSTILE_BODIES.items()
    }
    cases.update(
        {
            "f_list_body": [protocol.HEADER, b"SUBMIT", msgpack.packb([1, "echo"])],
            "f_missing_fields": [protocol.HEADER, b"SUBMIT", msgpack.packb({"rid": 1})],
            "f_ill_typed": submit_frames(rid="seven"),
            "f_megabyte_name": submit_frames(name="n" * 1_000_000),
            "f_unknown_command": [protocol.HEADER, b"EXPLODE", msgpack.packb({})],
            "f_worker_command": [protocol.HEADER, b"READY", msgpack.packb({})],
            "g_one_frame": [b"garbage"],
            "g_five_frames": [protocol.HEADER, b"STATUS", b"\x80", b"", b"x"],
            "version_2": [b"HKB2", b"STATUS", msgpack.packb({"rid": 1, "id": "x"})],
            "foreign_header": [b"GET / HTTP/1.1", b"", b""],
            "payload_over_limit": submit_frames(payload=b"x" * (MAX_PAYLOAD + 1)),
            "empty_name": submit_frames(name=""),
            "negative_delay": submit_frames(delay=-1.0),
            "empty_preferred_worker": submit_frames(preferred_worker=""),
            "unknown_task_state": [
                protocol.HEADER,
                b"TASKS",
                msgpack.packb({"rid": 3, "state": "bogus", "limit": 5}),
            ],
        }
    )
    return cases


EXPECTED_ERROR_TYPES = {
    "version_2": {"VersionMismatch"},
    "payload_over_limit": {"PayloadTooLarge"},
    "f_megabyte_name": {"InvalidRequest", "DecodeError"},
    "empty_name": {"InvalidRequest"},
    "negative_delay": {"InvalidRequest"},
    "empty_preferred_worker": {"InvalidRequest"},
    "unknown_task_state": {"InvalidRequest"},
}


def start(cluster: Cluster) -> psutil.Process:
    env = {"HAKOBU_MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD)}
    broker = cluster.start_broker(env=env)
    cluster.start_worker("w1", capacity=2, env=env)
    cluster.wait_workers("w1")
    return psutil.Process(broker.pid)


def assert_still_serving(cluster: Cluster, payload: str) -> None:
    """A normal echo completes in under 2 s and the real worker is on time."""
    client = cluster.client()
    started_at = time.monotonic()
    assert client.submit("echo", payload).result(timeout=10) == payload
    assert time.monotonic() - started_at < 2.0
    (w1,) = [w for w in client.workers() if w.id == "w1"]
    assert w1.state == "online"
    assert w1.last_seen_s is not None and w1.last_seen_s < 1.5
    assert cluster.broker is not None and cluster.broker.is_alive()


@pytest.mark.timeout(60)
def test_malformed_requests_get_error_replies(
    cluster: Cluster, raw: RawSockets
) -> None:
    # Given a broker and a worker
    start(cluster)
    client = cluster.client()
    problems = []

    # When a REQ client sends each malformed request on a fresh socket
    for case, frames in sorted(malformed_requests().items()):
        try:
            reply = raw.request(cluster.clients_endpoint, frames)
        except Exception as exc:  # collected so one case cannot hide another
            problems.append((case, repr(exc)[:200]))
            continue
        expected = EXPECTED_ERROR_TYPES.get(
            case, {"DecodeError", "InvalidRequest", "VersionMismatch"}
        )
        if not isinstance(reply, protocol.Error) or reply.type not in expected:
            problems.append((case, repr(reply)[:200]))
        elif not reply.message:
            problems.append((case, "ERROR without a message"))
        # And the broker still answers between cases
        client.workers()

    # Then each got an ERROR of the right type, and normal work goes on
    assert problems == []
    assert_still_serving(cluster, "after malformed requests")


@pytest.mark.timeout(60)
def test_req_socket_is_usable_after_an_error_reply(
    cluster: Cluster, raw: RawSockets
) -> None:
    start(cluster)
    sock = raw.req(cluster.clients_endpoint)

    sock.send_multipart([protocol.HEADER, b"SUBMIT", HOSTILE_BODIES["d_truncated"]])
    first = protocol.decode(raw.recv(sock, 5), protocol.CLIENT_REPLIES)
    sock.send_multipart(protocol.ListWorkers(rid=99).encode())
    second = protocol.decode(raw.recv(sock, 5), protocol.CLIENT_REPLIES)

    assert isinstance(first, protocol.Error) and first.type == "DecodeError"
    assert isinstance(second, protocol.Ok) and second.rid == 99
    assert [w["id"] for w in second.data["workers"]] == ["w1"]


@pytest.mark.timeout(90)
def test_garbage_on_both_endpoints_leaves_broker_serving(
    cluster: Cluster, raw: RawSockets
) -> None:
    # Given a broker, a worker and the broker's memory before the attack
    broker = start(cluster)
    rss_before = broker.memory_info().rss
    rng = random.Random(30)
    dealer_w = raw.dealer(cluster.workers_endpoint, identity=b"garbage-w")
    dealer_c = raw.dealer(cluster.clients_endpoint)

    # When both endpoints get every hostile frame, 1000 random ones, odd
    # frame counts, and frames over ZMQ_MAXMSGSIZE
    hostile = [[protocol.HEADER, b"READY", body] for body in HOSTILE_BODIES.values()]
    hostile += [[b"", *frames] for frames in malformed_requests().values()]
    hostile += [[rng.randbytes(rng.randint(1, 4096))] for _ in range(1000)]
    hostile += [[b"x"] * n for n in (0, 2, 4, 9, 64)]
    hostile += [[b""], [b"", b""], [b"", b"", b"", b""]]
    for frames in hostile:
        if frames:
            dealer_w.send_multipart(frames)
            dealer_c.send_multipart(frames)
    for endpoint in (cluster.workers_endpoint, cluster.clients_endpoint):
        oversize = raw.dealer(endpoint)
        oversize.send(b"\x00" * (protocol.maxmsgsize(MAX_PAYLOAD) + 1))

    # Then the broker keeps serving, is idle again, and did not balloon
    assert_still_serving(cluster, "after garbage")
    wait_until(
        lambda: broker.cpu_percent(interval=0.3) < 50,
        10,
        what="broker CPU back to idle",
    )
    assert broker.memory_info().rss - rss_before < RSS_BUDGET_BYTES
    assert cluster.broker is not None and cluster.broker.is_alive()


@pytest.mark.timeout(60)
def test_unknown_worker_on_workers_endpoint_is_told_to_reconnect(
    cluster: Cluster, raw: RawSockets
) -> None:
    # Given a broker that never heard of worker "ghost"
    start(cluster)
    ghost = raw.dealer(cluster.workers_endpoint, identity=b"ghost")
    client = cluster.client()
    known = client.submit("echo", "known")
    assert known.result(timeout=10) == "known"

    # When "ghost" heartbeats, acks and sends a result for a real task
    ghost.send_multipart(protocol.Heartbeat(s="ghost-session").encode())
    ghost.send_multipart(protocol.Ack(s="ghost-session", n=[1, 2, 3]).encode())
    ghost.send_multipart(
        protocol.Result(
            s="ghost-session",
            task=known.id,
            attempt=1,
            ok=True,
            value=protocol.pack_value("forged", MAX_PAYLOAD),
        ).encode()
    )

    # Then it is asked to register (RECONNECT), and nothing it said counts
    reply = protocol.decode(raw.recv(ghost, 5), protocol.BROKER_MESSAGES)
    assert isinstance(reply, protocol.Reconnect)
    assert reply.s == "ghost-session"
    assert client.status(known.id).result == "known"
    assert "ghost" not in {w.id for w in client.workers()}
    assert_still_serving(cluster, "after ghost")


@pytest.mark.timeout(60)
def test_unknown_ids_on_clients_endpoint(cluster: Cluster) -> None:
    start(cluster)
    client = cluster.client()

    with pytest.raises(TaskNotFound):
        client.status("no-such-task")
    with pytest.raises(TaskNotFound):
        client.cancel("no-such-task")
    soft = client.submit("echo", "soft", preferred_worker="w-never", fallback_after=0)

    assert soft.result(timeout=10) == "soft"
    assert client.status(soft.id).worker_id == "w1"
    assert_still_serving(cluster, "after unknown ids")


@pytest.mark.timeout(60)
def test_oversize_raw_frame_disconnects_only_its_sender(
    cluster: Cluster, raw: RawSockets
) -> None:
    start(cluster)
    sender = raw.req(cluster.clients_endpoint)

    sender.send(b"\x00" * (protocol.maxmsgsize(MAX_PAYLOAD) + 1))

    assert raw.recv_or_none(sender, 1.0) is None
    assert_still_serving(cluster, "after oversize")
