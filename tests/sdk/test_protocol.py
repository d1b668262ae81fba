"""The wire protocol: every message round-trips, hostile frames only ever give
DecodeError or VersionMismatch (C30), payload values keep their shape (C28)."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdk import protocol as p
from sdk.errors import DecodeError, PayloadTooLarge, ProtocolError, VersionMismatch

LIMIT = 16 * 1024 * 1024

SAMPLES: list[p.Message] = [
    p.Submit(rid=1, name="echo", payload=p.pack_value("x", LIMIT), key="k-1"),
    p.Submit(
        rid=2**40,
        name="probe_sleep",
        payload=b"\x93\x01\x02\x03",
        key="",
        preferred_worker="w1",
        require_worker=True,
        fallback_after=1.5,
        start_deadline=2,
        priority=-3,
        tags=["gpu", "wörker-ü"],
        delay=0.25,
        timeout=30.0,
        retries=4,
    ),
    p.SubmitMany(rid=3, tasks=[{"name": "echo", "payload": b"\xc0", "key": "a"}]),
    p.Run(rid=3, task={"name": "echo", "payload": b"\xc0", "key": "a"}, timeout=5.0),
    p.Status(rid=4, id="t-1"),
    p.Wait(rid=5, id="t-1", timeout=2.5),
    p.WaitMany(rid=5, ids=["t-1", "t-2"], timeout=2.5),
    p.Cancel(rid=6, id="t-1"),
    p.ListWorkers(rid=7),
    p.ListTasks(rid=8, state="queued", worker="w1", limit=5),
    p.ListTasks(rid=9),
    p.Ok(rid=10, data={"id": "t-1", "created": True, "nested": {"a": [1, b"b"]}}),
    p.Error(rid=11, type="PayloadTooLarge", message="too big", size=20, limit=10),
    p.Ready(
        s="sess",
        worker_id="wörker-ü",
        capacity=4,
        tags=["a"],
        handlers=["echo", "sleep"],
        held=[["t-1", 2]],
        draining=True,
        pid=1234,
        host="localhost",
    ),
    p.Ready(s="sess", worker_id="w1", capacity=1),
    p.Heartbeat(s="sess"),
    p.Ack(s="sess", n=[1, 2, 3]),
    p.Result(s="sess", task="t-1", attempt=1, ok=True, value=b"\xa1x"),
    p.Result(
        s="sess",
        task="t-1",
        attempt=2,
        ok=False,
        error_type="ValueError",
        error="boom",
        traceback="Traceback...",
        cancelled=True,
    ),
    p.Drain(s="sess"),
    p.Release(s="sess", task="t-1", attempt=1, reason="draining"),
    p.Bye(s="sess"),
    p.Welcome(s="sess"),
    p.Assign(
        s="sess", n=9, task="t-1", attempt=1, name="echo", payload=b"\xc0", timeout=1.0
    ),
    p.Assign(s="sess", n=10, task="t-2", attempt=3, name="echo", payload=b""),
    p.Abort(s="sess", n=11, task="t-1", attempt=1, reason="cancelled"),
    p.Stored(s="sess", task="t-1", attempt=1),
    p.Reconnect(s="sess", reason="unknown session"),
    p.Stop(s="sess", reason="replaced"),
]

REGISTRIES = {
    "client_requests": p.CLIENT_REQUESTS,
    "client_replies": p.CLIENT_REPLIES,
    "worker_messages": p.WORKER_MESSAGES,
    "broker_messages": p.BROKER_MESSAGES,
}
ALL_REGISTRY = {
    **p.CLIENT_REQUESTS,
    **p.CLIENT_REPLIES,
    **p.WORKER_MESSAGES,
    **p.BROKER_MESSAGES,
}
#: C30 (a)-(e), (h): bodies that must never decode into a message.
HOSTILE_BODIES = {
    "a_bin32_claims_4GiB": b"\xc6\xff\xff\xff\xff",
    "b_deep_nesting": b"\x91" * 100_000 + b"\xc0",
    "c_array32_claims_4G_items": b"\xdd\xff\xff\xff\xff",
    "d_truncated_array": b"\x92\x01",
    "h_list_as_map_key": b"\x81\x90\x01",
    "empty": b"",
    "nil": b"\xc0",
    "reserved_byte": b"\xc1",
    "map32_claims_4G_pairs": b"\xdf\xff\xff\xff\xff",
    "str32_claims_4GiB": b"\xdb\xff\xff\xff\xff",
    "ext_timestamp": msgpack.packb(msgpack.Timestamp(1, 0)),
    "trailing_bytes": msgpack.packb({"rid": 1}) + b"\x00",
    "int_map_key": b"\x81\x01\x01",
}


def registry_of(message: p.Message) -> dict[bytes, type[p.Message]]:
    for registry in REGISTRIES.values():
        if registry.get(message.COMMAND) is type(message):
            return registry
    raise AssertionError(f"{type(message).__name__} is in no registry")


def decode_or_protocol_error(frames: list[bytes], registry: Any) -> p.Message | None:
    """Decode; a DecodeError or VersionMismatch gives None, anything else fails."""
    try:
        message = p.decode(frames, registry)
    except (DecodeError, VersionMismatch):
        return None
    assert isinstance(message, p.Message)
    return message


# --- round trips ----------------------------------------------------------------


def test_every_message_class_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(ALL_REGISTRY.values())


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_message_round_trips(message: p.Message) -> None:
    frames = message.encode()

    decoded = p.decode(frames, registry_of(message))

    assert frames[:2] == [p.HEADER, message.COMMAND]
    assert decoded == message
    assert type(decoded) is type(message)


def test_heartbeat_decodes_on_both_sides() -> None:
    frames = p.Heartbeat(s="x").encode()

    assert p.decode(frames, p.WORKER_MESSAGES) == p.Heartbeat(s="x")
    assert p.decode(frames, p.BROKER_MESSAGES) == p.Heartbeat(s="x")


def test_defaults_fill_optional_fields() -> None:
    body = msgpack.packb({"rid": 1, "name": "echo", "payload": b"", "key": ""})

    message = p.decode([p.HEADER, b"SUBMIT", body], p.CLIENT_REQUESTS)

    assert message == p.Submit(rid=1, name="echo", payload=b"", key="")


def test_unknown_body_keys_are_ignored() -> None:
    body = msgpack.packb({"s": "x", "future_field": [1, 2]})

    assert p.decode([p.HEADER, b"HEARTBEAT", body], p.WORKER_MESSAGES) == (
        p.Heartbeat(s="x")
    )


def test_envelopes() -> None:
    message = p.Status(rid=1, id="t")

    routed = p.client_envelope(b"peer", message)
    identity, frames = p.split_client_envelope(routed)

    assert routed[:2] == [b"peer", b""]
    assert identity == b"peer"
    assert p.decode(frames, p.CLIENT_REQUESTS) == message
    assert p.worker_envelope(b"w1", message) == [b"w1", *message.encode()]


@pytest.mark.parametrize(
    "frames", [[], [b"peer"], [b"peer", b"x", b"HKB1"]], ids=["none", "one", "nodelim"]
)
def test_split_client_envelope_refuses_missing_delimiter(frames: list[bytes]) -> None:
    with pytest.raises(DecodeError):
        p.split_client_envelope(frames)


def test_maxmsgsize_adds_the_envelope_slack() -> None:
    assert p.maxmsgsize(1024) == 1024 + p.ENVELOPE_SLACK_BYTES


# --- hostile and corrupt frames (C30) --------------------------------------------


@pytest.mark.parametrize("registry_name", ["client_requests", "worker_messages"])
@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_hostile_body_is_a_decode_error(name: str, registry_name: str) -> None:
    registry = REGISTRIES[registry_name]
    command = next(iter(registry))

    with pytest.raises(DecodeError) as info:
        p.decode([p.HEADER, command, HOSTILE_BODIES[name]], registry)

    assert info.value.size == len(p.HEADER) + len(command) + len(HOSTILE_BODIES[name])


@pytest.mark.parametrize(
    "body",
    [
        [1, "echo", b"", "k"],
        "a string",
        42,
        {"name": "echo", "payload": b"", "key": "k"},
        {"rid": "1", "name": "echo", "payload": b"", "key": "k"},
        {"rid": True, "name": "echo", "payload": b"", "key": "k"},
        {"rid": 1, "name": b"echo", "payload": b"", "key": "k"},
        {"rid": 1, "name": "echo", "payload": "not bytes", "key": "k"},
        {"rid": 1, "name": "echo", "payload": b"", "key": "k", "tags": "gpu"},
        {"rid": 1, "name": "echo", "payload": b"", "key": "k", "tags": [1]},
        {"rid": 1, "name": "echo", "payload": b"", "key": "k", "priority": 1.5},
        {"rid": 1, "name": "echo", "payload": b"", "key": "k", "delay": "soon"},
        {"rid": 1, "name": "echo", "payload": b"", "key": None},
    ],
    ids=lambda body: repr(body)[:40],
)
def test_wrong_shape_submit_is_a_decode_error(body: Any) -> None:
    frames = [p.HEADER, b"SUBMIT", msgpack.packb(body, use_bin_type=True)]

    with pytest.raises(DecodeError):
        p.decode(frames, p.CLIENT_REQUESTS)


@pytest.mark.parametrize(
    "body",
    [
        {"s": "x", "worker_id": "w1"},
        {"s": 1, "worker_id": "w1", "capacity": 1},
        {"s": "x", "worker_id": "w1", "capacity": "1"},
        {"s": "x", "worker_id": "w1", "capacity": 1, "held": "t-1"},
        {"s": "x", "worker_id": "w1", "capacity": 1, "draining": 1},
    ],
    ids=lambda body: repr(body)[:40],
)
def test_wrong_shape_ready_is_a_decode_error(body: Any) -> None:
    frames = [p.HEADER, b"READY", msgpack.packb(body, use_bin_type=True)]

    with pytest.raises(DecodeError):
        p.decode(frames, p.WORKER_MESSAGES)


def test_megabyte_task_name_decodes_or_is_refused() -> None:
    # The wire may carry it; refusing it (MAX_NAME_CHARS) is the broker's job.
    body = {"rid": 1, "name": "n" * 1_000_000, "payload": b"", "key": "k"}
    frames = [p.HEADER, b"SUBMIT", msgpack.packb(body)]

    decode_or_protocol_error(frames, p.CLIENT_REQUESTS)


@pytest.mark.parametrize(
    "command", [b"NOPE", b"", b"ASSIGN", b"OK", b"submit", b"\x00" * 64]
)
def test_unknown_or_misdirected_command_is_a_decode_error(command: bytes) -> None:
    frames = [p.HEADER, command, msgpack.packb({"rid": 1})]

    with pytest.raises(DecodeError):
        p.decode(frames, p.CLIENT_REQUESTS)


@pytest.mark.parametrize("count", [0, 1, 2, 4, 5, 50])
def test_unexpected_frame_count_is_a_decode_error(count: int) -> None:
    frames = [p.HEADER, b"STATUS", msgpack.packb({"rid": 1, "id": "t"})] * 17

    with pytest.raises(DecodeError):
        p.decode(frames[:count], p.CLIENT_REQUESTS)


@pytest.mark.parametrize("header", [b"HKB2", b"HKB0", b"HKB10", b"HKB"])
def test_other_protocol_version_is_a_version_mismatch(header: bytes) -> None:
    frames = [header, b"STATUS", msgpack.packb({"rid": 1, "id": "t"})]

    with pytest.raises(VersionMismatch) as info:
        p.decode(frames, p.CLIENT_REQUESTS)

    assert isinstance(info.value, ProtocolError)


@pytest.mark.parametrize("header", [b"", b"HTTP", b"\x00\xff", b"GET / HTTP/1.1"])
def test_foreign_header_is_a_decode_error(header: bytes) -> None:
    frames = [header, b"STATUS", msgpack.packb({"rid": 1, "id": "t"})]

    with pytest.raises(DecodeError):
        p.decode(frames, p.CLIENT_REQUESTS)


frame = st.binary(max_size=96)
msgpack_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
msgpack_tree = st.recursive(
    msgpack_leaf,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.binary(max_size=4), inner, max_size=4
        )
    ),
    max_leaves=20,
)
QUICK = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@QUICK
@given(frames=st.lists(frame, max_size=5), which=st.sampled_from(sorted(REGISTRIES)))
def test_random_frames_never_raise_anything_else(
    frames: list[bytes], which: str
) -> None:
    decode_or_protocol_error(frames, REGISTRIES[which])


@QUICK
@given(
    command=st.sampled_from(sorted(ALL_REGISTRY)),
    body=st.binary(min_size=0, max_size=4096),
)
def test_random_body_never_raises_anything_else(command: bytes, body: bytes) -> None:
    decode_or_protocol_error([p.HEADER, command, body], ALL_REGISTRY)


@QUICK
@given(command=st.sampled_from(sorted(ALL_REGISTRY)), body=msgpack_tree)
def test_random_msgpack_body_never_raises_anything_else(
    command: bytes, body: Any
) -> None:
    frames = [p.HEADER, command, msgpack.packb(body, use_bin_type=True)]

    decode_or_protocol_error(frames, ALL_REGISTRY)


@QUICK
@given(
    message=st.sampled_from(SAMPLES),
    cuts=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8
    ),
    truncate=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_mutated_valid_frames_never_raise_anything_else(
    message: p.Message, cuts: list[tuple[int, int]], truncate: int | None
) -> None:
    header, command, body = message.encode()
    mutated = bytearray(body)
    for position, value in cuts:
        if mutated:
            mutated[position % len(mutated)] = value
    if truncate is not None and mutated:
        mutated = mutated[: truncate % len(mutated)]

    decode_or_protocol_error([header, command, bytes(mutated)], registry_of(message))


# --- payload values (C28) ---------------------------------------------------------


def roundtrip(value: Any) -> Any:
    return p.unpack_value(p.pack_value(value, LIMIT))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("héllo 😂", "héllo 😂"),
        (b"\x00\xff", b"\x00\xff"),
        ((1, 2), [1, 2]),
        ({7: "x"}, {7: "x"}),
        ({b"k": 1}, {b"k": 1}),
        ({"k": b"v", b"k": "v", 3: [b"", ""]}, {"k": b"v", b"k": "v", 3: [b"", ""]}),
        ({"t": ((1,), (b"a", "a"))}, {"t": [[1], [b"a", "a"]]}),
        (None, None),
        (2**64 - 1, 2**64 - 1),
        (-(2**63), -(2**63)),
        (0.1, 0.1),
        (True, True),
    ],
    ids=repr,
)
def test_values_keep_their_shape(value: Any, expected: Any) -> None:
    result = roundtrip(value)

    assert result == expected
    assert _shape(result) == _shape(expected)


def _shape(value: Any) -> Any:
    """Types all the way down, so str/bytes and int/bool/float mixups show."""
    if isinstance(value, dict):
        return {(type(k), k): _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value)


def test_three_megabyte_string_is_hash_identical() -> None:
    text = "漢字" * 500_000

    result = roundtrip(text)

    assert type(result) is str
    assert hashlib.sha256(result.encode()).digest() == (
        hashlib.sha256(text.encode()).digest()
    )


@pytest.mark.parametrize(
    "value", ["\ud83d", ["ok", {"k": "\udc00"}], {"\ud800": 1}], ids=repr
)
def test_lone_surrogate_is_refused_at_pack(value: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        p.pack_value(value, LIMIT)

    assert not isinstance(info.value, PayloadTooLarge)
    assert "surrogate" in str(info.value)


@pytest.mark.parametrize("value", [object(), {1, 2}, 2**64, -(2**63) - 1], ids=repr)
def test_unpackable_value_is_a_protocol_error(value: Any) -> None:
    with pytest.raises(ProtocolError):
        p.pack_value(value, LIMIT)


def test_size_limit_is_exact() -> None:
    blob = b"x" * 2000
    size = len(msgpack.packb(blob, use_bin_type=True))

    assert p.pack_value(blob, limit=size) == msgpack.packb(blob, use_bin_type=True)
    with pytest.raises(PayloadTooLarge) as info:
        p.pack_value(blob, limit=size - 1, what="result")

    assert (info.value.size, info.value.limit) == (size, size - 1)
    assert "result" in str(info.value)
    assert "max_payload_bytes" in str(info.value)


@pytest.mark.parametrize("data", list(HOSTILE_BODIES.values())[:5], ids=repr)
def test_unpack_value_of_garbage_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        p.unpack_value(data)


@QUICK
@given(value=msgpack_tree)
def test_any_msgpack_value_round_trips_exactly(value: Any) -> None:
    result = roundtrip(value)

    assert result == value
    assert _shape(result) == _shape(value)


@QUICK
@given(data=st.binary(max_size=512))
def test_unpack_value_of_random_bytes_never_raises_anything_else(data: bytes) -> None:
    try:
        p.unpack_value(data)
    except DecodeError:
        pass


def test_a_tuple_map_key_is_refused_when_packing_not_after_sending() -> None:
    with pytest.raises(ProtocolError, match="map key that would not come back"):
        p.pack_value({(1, 2): 3}, 1024)
