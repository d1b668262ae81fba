"""Fuzz both broker endpoints with random and mutated frames (hypothesis).

Valid messages built with `sdk.protocol` are mutated (bytes flipped, inserted,
cut; frames dropped or added; header, command, body or one field replaced),
or replaced by random frames, and sent from raw pyzmq sockets to one running
broker: over a REQ socket to the clients endpoint, over a DEALER to the
workers endpoint. Every REQ request must get a reply, an ERROR one whenever
the request does not decode; afterwards the broker is alive, serves a normal
echo within 2 s and its RSS grew by less than 50 MB.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import psutil
import pytest
import zmq
from helpers.cluster import Cluster
from helpers.raw import RawSockets
from helpers.waiting import wait_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sdk import protocol

#: Examples per endpoint.
EXAMPLES = 200
#: Broker RSS may grow by this much over the whole fuzz run.
RSS_BUDGET_BYTES = 50 * 1024 * 1024
#: Seconds a REQ request may wait for its reply.
REPLY_S = 3.0
#: Error types a broker may name in an ERROR reply (docs/protocol.md).
ERROR_TYPES = {
    "InvalidRequest",
    "PayloadTooLarge",
    "TaskNotFound",
    "DecodeError",
    "VersionMismatch",
    "StoreError",
}
#: The fuzzing DEALER's routing id, and the session its valid messages carry.
FUZZ_ID = "fuzz-dealer"
FUZZ_SESSION = "fuzz-session"
#: Names no real handler has, so fuzz tasks and fuzz workers never meet real ones.
FUZZ_TASK = "fuzz_task"
FUZZ_HANDLER = "fuzz_handler"

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)

ALL_COMMANDS = sorted(
    {
        *protocol.CLIENT_REQUESTS,
        *protocol.CLIENT_REPLIES,
        *protocol.WORKER_MESSAGES,
        *protocol.BROKER_MESSAGES,
    }
)


def client_bases() -> list[list[bytes]]:
    """Return one valid frame list per client request."""
    missing = uuid.uuid4().hex
    payload = protocol.pack_value({"fuzz": [1, 2.5, "x", b"y"]}, 1024)
    submit: dict[str, Any] = {
        "name": FUZZ_TASK,
        "payload": payload,
        "key": "fuzz-key",
        "priority": 3,
        "tags": ["fuzz"],
        "delay": 0.5,
        "timeout": 2.0,
        "retries": 1,
    }
    messages: list[protocol.Message] = [
        protocol.Submit(rid=11, **submit),
        protocol.Submit(
            rid=12,
            name=FUZZ_TASK,
            payload=payload,
            key="fuzz-key-2",
            preferred_worker="fuzz-nobody",
            require_worker=True,
            start_deadline=30.0,
            fallback_after=1.0,
        ),
        protocol.SubmitMany(rid=13, tasks=[submit, {**submit, "key": "fuzz-key-3"}]),
        protocol.Status(rid=14, id=missing),
        protocol.Wait(rid=15, id=missing, timeout=0.2),
        protocol.Cancel(rid=16, id=missing),
        protocol.ListWorkers(rid=17),
        protocol.ListTasks(rid=18, state="queued", worker=None, limit=5),
    ]
    return [m.encode() for m in messages]


def worker_bases() -> list[list[bytes]]:
    """Return one valid frame list per worker message, from the fuzz DEALER."""
    s = FUZZ_SESSION
    value = protocol.pack_value("done", 1024)
    missing = uuid.uuid4().hex
    messages: list[protocol.Message] = [
        protocol.Ready(
            s=s,
            worker_id=FUZZ_ID,
            capacity=1,
            tags=["fuzz"],
            handlers=[FUZZ_HANDLER],
            held=[[missing, 1]],
            pid=1,
            host="fuzz",
        ),
        protocol.Heartbeat(s=s),
        protocol.Ack(s=s, n=[1, 2, 3]),
        protocol.Result(s=s, task=missing, attempt=1, ok=True, value=value),
        protocol.Result(
            s=s, task=missing, attempt=2, ok=False, error_type="E", error="boom"
        ),
        protocol.Release(s=s, task=missing, attempt=1, reason="fuzz"),
        protocol.Drain(s=s),
        protocol.Bye(s=s),
    ]
    return [m.encode() for m in messages]


# --- strategies ---------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
    | st.binary(max_size=24)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
HEADERS = st.sampled_from(
    [b"", b"HKB", b"HKB2", b"HKB0", b"HKB1\x00", b"hkb1", b"\xff" * 9]
) | st.binary(max_size=12)
COMMANDS = st.sampled_from(ALL_COMMANDS) | st.binary(max_size=16)


def _mutate_body(draw: Callable[..., Any], body: bytes) -> bytes:
    """Replace, add or delete one field of a msgpack map body."""
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:  # an earlier mutation broke it: anything goes now
        return draw(st.binary(max_size=64))
    if not isinstance(fields, dict) or not fields:
        return msgpack.packb(draw(VALUES), use_bin_type=True)
    key = draw(st.sampled_from(sorted(map(str, fields))) | st.text(max_size=8))
    if draw(st.booleans()) and key in fields:
        del fields[key]
    else:
        fields[key] = draw(VALUES)
    return msgpack.packb(fields, use_bin_type=True)


@st.composite
def mutated(draw: Callable[..., Any], bases: list[list[bytes]]) -> list[bytes]:
    """Draw a valid message and apply up to three mutations to it."""
    frames = list(draw(st.sampled_from(bases)))
    for op in draw(st.lists(st.integers(0, 10), max_size=3)):
        index = draw(st.integers(0, len(frames) - 1))
        frame = frames[index]
        where = draw(st.integers(0, len(frame)))
        if op == 0 and frame:
            where = min(where, len(frame) - 1)
            byte = bytes([draw(st.integers(0, 255))])
            frames[index] = frame[:where] + byte + frame[where + 1 :]
        elif op == 1:
            frames[index] = frame[:where] + draw(st.binary(min_size=1, max_size=16))
            frames[index] += frame[where:]
        elif op == 2:
            frames[index] = frame[:where] + frame[where + draw(st.integers(1, 16)) :]
        elif op == 3:
            frames[index] = frame[:where]
        elif op == 4 and len(frames) > 1:
            del frames[index]
        elif op == 5:
            frames.insert(index, draw(st.binary(max_size=64)))
        elif op == 6:
            frames[0] = draw(HEADERS)
        elif op == 7 and len(frames) > 1:
            frames[1] = draw(COMMANDS)
        elif op == 8 and len(frames) > 2:
            frames[2] = msgpack.packb(draw(VALUES), use_bin_type=True)
        elif len(frames) > 2:
            frames[2] = _mutate_body(draw, frames[2])
    return frames


@st.composite
def reshaped(draw: Callable[..., Any], bases: list[list[bytes]]) -> list[bytes]:
    """Draw a valid message and change one to three fields of its body."""
    header, command, body = draw(st.sampled_from(bases))
    for _ in range(draw(st.integers(1, 3))):
        body = _mutate_body(draw, body)
    return [header, command, body]


def frames_strategy(bases: list[list[bytes]]) -> st.SearchStrategy[list[bytes]]:
    """Mutated valid messages, well-framed ones with odd fields, random frames."""
    raw = st.lists(st.binary(max_size=256), min_size=1, max_size=5)
    return st.one_of(mutated(bases), reshaped(bases), raw)


def local_decode(frames: list[bytes]) -> protocol.Message | None:
    """Decode a client request the way the broker does; None if it is malformed."""
    try:
        return protocol.decode(frames, protocol.CLIENT_REQUESTS)
    except protocol.ProtocolError:
        return None


def drain(sock: zmq.Socket[bytes]) -> int:
    """Read and drop whatever the broker sent the fuzz DEALER; return the count."""
    count = 0
    while sock.poll(0, zmq.POLLIN):
        sock.recv_multipart()
        count += 1
    return count


# --- the test -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_fuzzed_frames_leave_broker_serving(cluster: Cluster, raw: RawSockets) -> None:
    # Given a broker with one real worker, warmed up by one echo
    broker = cluster.start_broker()
    cluster.start_worker("w1", capacity=2)
    cluster.wait_workers("w1")
    client = cluster.client()
    assert client.submit("echo", "warm").result(timeout=10) == "warm"
    process = psutil.Process(broker.pid)
    rss_before = process.memory_info().rss
    replies: Counter[str] = Counter()

    # When fuzzed requests go to the clients endpoint over a REQ socket
    # (a fresh one after a lost reply, so one miss cannot wedge the rest)
    reqs = [raw.req(cluster.clients_endpoint)]

    @FUZZ_SETTINGS
    @given(frames=frames_strategy(client_bases()))
    @example(frames=[protocol.HEADER, b"SUBMIT", b"\xc6\xff\xff\xff\xff"])
    @example(frames=[protocol.HEADER, b"SUBMIT", b"\x91" * 100_000 + b"\xc0"])
    @example(frames=[protocol.HEADER, b"STATUS", b"\xdd\xff\xff\xff\xff"])
    @example(frames=[protocol.HEADER, b"WAIT", b"\x81\x90\x01"])
    @example(frames=[protocol.HEADER, b"SUBMIT", b"\x92\x01"])
    def fuzz_clients(frames: list[bytes]) -> None:
        req = reqs[-1]
        req.send_multipart(frames)
        if not req.poll(REPLY_S * 1000, zmq.POLLIN):
            raw.discard(req)
            reqs.append(raw.req(cluster.clients_endpoint))
            raise AssertionError(f"no reply within {REPLY_S} s to {frames!r:.300}")
        reply = protocol.decode(req.recv_multipart(), protocol.CLIENT_REPLIES)
        request = local_decode(frames)
        if request is None:
            # Then a request that does not decode gets an ERROR reply
            assert isinstance(reply, protocol.Error), f"{frames!r:.300} -> {reply}"
            assert reply.type in {"DecodeError", "VersionMismatch"}, reply
            replies["malformed"] += 1
        else:
            assert isinstance(reply, protocol.Ok | protocol.Error), reply
            assert reply.rid == request.rid, (request, reply)  # type: ignore[attr-defined]
            if isinstance(reply, protocol.Error):
                assert reply.type in ERROR_TYPES, reply
            replies[type(reply).__name__] += 1

    fuzz_clients()

    # And fuzzed messages go to the workers endpoint from a DEALER
    dealer = raw.dealer(cluster.workers_endpoint, FUZZ_ID.encode())
    sent = Counter[int]()

    @FUZZ_SETTINGS
    @given(frames=frames_strategy(worker_bases()))
    def fuzz_workers(frames: list[bytes]) -> None:
        dealer.send_multipart(frames)
        sent[len(frames)] += 1
        drain(dealer)

    fuzz_workers()
    dealer.send_multipart(protocol.Bye(s=FUZZ_SESSION).encode())
    raw.discard(dealer)

    # Then the broker is alive, logged no traceback, and the fuzz exercised
    # both reply kinds
    assert broker.is_alive(), cluster.tail()
    assert "Traceback" not in broker.log_text()
    assert replies["malformed"] >= 50, replies
    assert replies["Ok"] + replies["Error"] >= 20, replies
    assert sum(sent.values()) >= EXAMPLES
    # And only the real worker is left online, still the same process
    wait_until(
        lambda: [w.id for w in client.workers() if w.state == "online"] == ["w1"],
        10.0,
        0.1,
        what=lambda: cluster.describe_workers(client),
    )
    assert cluster.workers["w1"].is_alive()
    w1 = next(w for w in client.workers() if w.id == "w1")
    assert w1.last_seen_s is not None and w1.last_seen_s < 1.0, w1
    # And a normal echo is served within 2 s
    handle = client.submit("echo", {"after": "fuzz"})
    assert handle.result(timeout=2.0) == {"after": "fuzz"}
    assert client.status(handle.id).worker_id == "w1"
    # And the broker's memory grew by less than 50 MB
    grown = process.memory_info().rss - rss_before
    print(f"\nfuzz: replies {dict(replies)}, broker RSS grew {grown / 2**20:.1f} MiB")
    assert grown < RSS_BUDGET_BYTES
