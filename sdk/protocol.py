"""The wire protocol, defined once: frames, commands, message bodies, checks.

Every message is three frames: the header (protocol tag and version,
`b"HKB1"`), the command (`b"SUBMIT"`, `b"ASSIGN"`...) and a msgpack map, the
body. ROUTER sockets see one more frame in front (the peer's routing id) and,
for REQ clients, an empty delimiter after it; `split_*_envelope` strip them.

Task payloads and results travel as opaque `bytes` fields holding their own
msgpack encoding, made and read only by the client and the worker
(`pack_value` / `unpack_value`); the broker stores and forwards them untouched.
Every decode failure becomes `DecodeError` or `VersionMismatch`; nothing else
escapes `decode`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import msgpack  # type: ignore[import-untyped]
import zmq

from sdk.errors import DecodeError, PayloadTooLarge, ProtocolError, VersionMismatch

PROTOCOL_VERSION = 1
PROTOCOL_TAG = b"HKB"
HEADER = PROTOCOL_TAG + str(PROTOCOL_VERSION).encode()
#: Room for frames and fields around a payload, added to max_payload_bytes
#: to get the socket's ZMQ_MAXMSGSIZE.
ENVELOPE_SLACK_BYTES = 64 * 1024
#: Longest task name, in characters.
MAX_NAME_CHARS = 200
#: Most tags on a task or a worker.
MAX_TAGS = 64
#: Most tasks one TASKS request lists.
MAX_LIST_LIMIT = 10_000


class Message:
    """Base of every wire message; subclasses are frozen dataclasses."""

    __slots__ = ()
    COMMAND: ClassVar[bytes] = b""
    _CHECKS: ClassVar[tuple[Any, ...]] = ()
    _FIELDS: ClassVar[tuple[str, ...]] = ()

    def body(self) -> dict[str, Any]:
        """Return the body as a plain dict ready for msgpack."""
        return {name: getattr(self, name) for name in self._FIELDS}

    def encode(self) -> list[bytes]:
        """Return the three frames: header, command, packed body."""
        return [HEADER, self.COMMAND, msgpack.packb(self.body(), use_bin_type=True)]


# --- client -> broker (REQ) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submit(Message):
    COMMAND: ClassVar[bytes] = b"SUBMIT"
    rid: int
    name: str
    payload: bytes
    key: str
    preferred_worker: str | None = None
    require_worker: bool = False
    fallback_after: float | None = None
    start_deadline: float | None = None
    priority: int = 0
    tags: list[str] = field(default_factory=list)
    delay: float | None = None
    timeout: float | None = None
    retries: int = 0


@dataclass(frozen=True, slots=True)
class SubmitMany(Message):
    """Several submits in one request; each entry is a Submit body without rid."""

    COMMAND: ClassVar[bytes] = b"SUBMIT_MANY"
    rid: int
    tasks: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Run(Message):
    """Submit one task and wait for it, in one request: `task` is a SUBMIT body
    without rid; the reply is WAIT's, once the task ended or `timeout` passed."""

    COMMAND: ClassVar[bytes] = b"RUN"
    rid: int
    task: dict[str, Any]
    timeout: float


@dataclass(frozen=True, slots=True)
class Status(Message):
    COMMAND: ClassVar[bytes] = b"STATUS"
    rid: int
    id: str


@dataclass(frozen=True, slots=True)
class Wait(Message):
    """Park until the task ends or `timeout` seconds pass, then reply its info."""

    COMMAND: ClassVar[bytes] = b"WAIT"
    rid: int
    id: str
    timeout: float


@dataclass(frozen=True, slots=True)
class WaitMany(Message):
    """Park until every listed task ends or `timeout` seconds pass, then reply
    their infos in order (results past the reply's size budget are left out
    and marked `omitted`)."""

    COMMAND: ClassVar[bytes] = b"WAIT_MANY"
    rid: int
    ids: list[str]
    timeout: float


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    COMMAND: ClassVar[bytes] = b"CANCEL"
    rid: int
    id: str


@dataclass(frozen=True, slots=True)
class ListWorkers(Message):
    COMMAND: ClassVar[bytes] = b"WORKERS"
    rid: int


@dataclass(frozen=True, slots=True)
class ListTasks(Message):
    COMMAND: ClassVar[bytes] = b"TASKS"
    rid: int
    state: str | None = None
    worker: str | None = None
    limit: int = 100


# --- broker -> client --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ok(Message):
    """A successful reply; `data` depends on the request (see the broker)."""

    COMMAND: ClassVar[bytes] = b"OK"
    rid: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A refused request; `type` names a class in `sdk.errors`."""

    COMMAND: ClassVar[bytes] = b"ERROR"
    rid: int
    type: str
    message: str
    size: int = 0
    limit: int = 0


# --- worker -> broker (DEALER); `s` is the worker process's session ----------


@dataclass(frozen=True, slots=True)
class Ready(Message):
    """Register (again): who I am, what I run, which attempts I still hold."""

    COMMAND: ClassVar[bytes] = b"READY"
    s: str
    worker_id: str
    capacity: int
    tags: list[str] = field(default_factory=list)
    handlers: list[str] = field(default_factory=list)
    #: [task id, attempt] pairs running or finished-but-unconfirmed here.
    held: list[list[Any]] = field(default_factory=list)
    draining: bool = False
    pid: int = 0
    host: str = ""
    #: The largest payload this worker accepts (0: not said).
    max_payload_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Liveness, both ways; `s` names the worker session it concerns."""

    COMMAND: ClassVar[bytes] = b"HEARTBEAT"
    s: str


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """The worker received these notifications (ASSIGN or ABORT ids)."""

    COMMAND: ClassVar[bytes] = b"ACK"
    s: str
    n: list[int]


@dataclass(frozen=True, slots=True)
class Result(Message):
    """One attempt's outcome. `value` is packed msgpack when ok."""

    COMMAND: ClassVar[bytes] = b"RESULT"
    s: str
    task: str
    attempt: int
    ok: bool
    value: bytes = b""
    error_type: str = ""
    error: str = ""
    traceback: str = ""
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class Drain(Message):
    """Stop assigning to me; I am finishing what I hold."""

    COMMAND: ClassVar[bytes] = b"DRAIN"
    s: str


@dataclass(frozen=True, slots=True)
class Release(Message):
    """I hand this attempt back unfinished; run it elsewhere."""

    COMMAND: ClassVar[bytes] = b"RELEASE"
    s: str
    task: str
    attempt: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Bye(Message):
    COMMAND: ClassVar[bytes] = b"BYE"
    s: str


# --- broker -> worker ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """READY accepted; the worker may now resend what it owes."""

    COMMAND: ClassVar[bytes] = b"WELCOME"
    s: str
    #: The largest result the broker accepts; the worker refuses larger ones.
    max_payload_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Assign(Message):
    """Run this attempt. `n` is the worker_notifications row id to ACK."""

    COMMAND: ClassVar[bytes] = b"ASSIGN"
    s: str
    n: int
    task: str
    attempt: int
    name: str
    payload: bytes
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Stop this attempt (cancelled or superseded); ACK `n`, report `cancelled`."""

    COMMAND: ClassVar[bytes] = b"ABORT"
    s: str
    n: int
    task: str
    attempt: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Stored(Message):
    """The result of this attempt is stored (or was not needed); drop it."""

    COMMAND: ClassVar[bytes] = b"STORED"
    s: str
    task: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Reconnect(Message):
    """I do not know your session; send READY again."""

    COMMAND: ClassVar[bytes] = b"RECONNECT"
    s: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Stop(Message):
    """Exit now: the id was taken over or refused. `reason` says why."""

    COMMAND: ClassVar[bytes] = b"STOP"
    s: str
    reason: str = ""


#: Any message a worker sends; each carries its session in `s`.
WorkerMessage = Ready | Heartbeat | Ack | Result | Drain | Release | Bye

CLIENT_REQUESTS: dict[bytes, type[Message]] = {
    m.COMMAND: m
    for m in (
        Submit,
        SubmitMany,
        Run,
        Status,
        Wait,
        WaitMany,
        Cancel,
        ListWorkers,
        ListTasks,
    )
}
CLIENT_REPLIES: dict[bytes, type[Message]] = {m.COMMAND: m for m in (Ok, Error)}
WORKER_MESSAGES: dict[bytes, type[Message]] = {
    m.COMMAND: m for m in (Ready, Heartbeat, Ack, Result, Drain, Release, Bye)
}
BROKER_MESSAGES: dict[bytes, type[Message]] = {
    m.COMMAND: m for m in (Welcome, Assign, Abort, Stored, Heartbeat, Reconnect, Stop)
}


def decode(frames: list[bytes], registry: dict[bytes, type[Message]]) -> Message:
    """Check header, command and body of a message and build it.

    Raises:
        VersionMismatch: the header carries our tag and another version.
        DecodeError: anything else malformed: frame count, header, unknown
            command, body not a msgpack map, a missing or ill-typed field.
    """
    size = sum(len(f) for f in frames)
    if len(frames) != 3:
        raise DecodeError(f"expected 3 frames, got {len(frames)}", size)
    header, command, raw = frames
    if header != HEADER:
        if header[:3] == PROTOCOL_TAG and len(header) <= 8:
            raise VersionMismatch(
                f"peer speaks protocol {header[3:]!r}, this side speaks "
                f"{PROTOCOL_VERSION}; upgrade the older side"
            )
        raise DecodeError("bad header frame, not a hakobu peer", size)
    cls = registry.get(bytes(command))
    if cls is None:
        raise DecodeError(f"unknown command {bytes(command[:32])!r}", size)
    try:
        body = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types; all mean bad bytes
        raise DecodeError(f"body is not msgpack: {type(exc).__name__}", size) from exc
    if not isinstance(body, dict):
        raise DecodeError(f"{cls.__name__} body must be a map", size)
    return build(cls, body, size)


def peek_rid(frames: list[bytes]) -> int:
    """Return the rid of a request that failed to decode, or 0 when it has none.

    So the error reply reaches the request that caused it, not a stray one.
    """
    if len(frames) != 3:
        return 0
    try:
        body = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
    except Exception:  # the body itself is what was wrong
        return 0
    rid = body.get("rid") if isinstance(body, dict) else None
    return rid if type(rid) is int else 0


def build(cls: type[Message], body: dict[str, Any], size: int = 0) -> Message:
    """Check body fields against `cls` and construct it; unknown keys are ignored."""
    values: dict[str, Any] = {}
    for name, accepted, nullable, items, required, exact in cls._CHECKS:
        if name not in body:
            if required:
                raise DecodeError(f"{cls.__name__} is missing field {name!r}", size)
            continue
        value = body[name]
        if value.__class__ in exact and items is None:
            pass  # the common case: exactly a type the field takes
        elif value is None and nullable:
            pass
        elif not _fits(value, accepted) or (
            items is not None and not all(_fits(v, items) for v in value)
        ):
            raise DecodeError(
                f"{cls.__name__}.{name} has the wrong type {type(value).__name__}",
                size,
            )
        values[name] = value
    return cls(**values)


def split_client_envelope(frames: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Split a ROUTER frame list from a REQ peer into (identity, message frames)."""
    if len(frames) < 2 or frames[1] != b"":
        raise DecodeError("missing REQ envelope delimiter", sum(map(len, frames)))
    return frames[0], frames[2:]


def client_envelope(identity: bytes, message: Message) -> list[bytes]:
    """Return the frames that route `message` to a REQ peer through a ROUTER."""
    return [identity, b"", *message.encode()]


def worker_envelope(identity: bytes, message: Message) -> list[bytes]:
    """Return the frames that route `message` to a DEALER worker through a ROUTER."""
    return [identity, *message.encode()]


def pack_value(value: Any, limit: int, what: str = "payload") -> bytes:
    """Pack a payload or result as msgpack, or refuse it with a clear error.

    Tuples are sent as lists and come back as lists. Map keys may be str, int,
    bytes, float or bool. Lone surrogates and other unpackable values raise.
    """
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True, strict_types=False)
    except UnicodeEncodeError as exc:
        raise ProtocolError(
            f"{what} holds a string that is not valid Unicode "
            f"(lone surrogate at {exc.start}); encode it as bytes instead"
        ) from exc
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"{what} cannot be sent as msgpack: {exc}") from exc
    if len(packed) > limit:
        raise PayloadTooLarge(len(packed), limit, what)
    try:
        # A tuple used as a map key packs fine but cannot be unpacked.
        msgpack.unpackb(packed, raw=False, use_list=True, strict_map_key=False)
    except TypeError as exc:
        raise ProtocolError(
            f"{what} has a map key that would not come back (a list or tuple); "
            "use str, int, bytes, float or bool keys"
        ) from exc
    return packed


def unpack_value(packed: bytes) -> Any:
    """Unpack a payload or result made by `pack_value`."""
    try:
        return msgpack.unpackb(packed, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # msgpack raises many types; all mean bad bytes
        raise DecodeError(
            f"value is not msgpack: {type(exc).__name__}", len(packed)
        ) from exc


def maxmsgsize(max_payload_bytes: int) -> int:
    """Return the ZMQ_MAXMSGSIZE that admits a payload of max_payload_bytes."""
    return max_payload_bytes + ENVELOPE_SLACK_BYTES


# --- frame I/O without per-call flag arithmetic or exceptions ---------------

_SEND_MORE = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def send_frames(sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
    """Send a multipart message without blocking (raises zmq.Again when full)."""
    for frame in frames[:-1]:
        sock.send(frame, _SEND_MORE)
    sock.send(frames[-1], _NOBLOCK)


def recv_frames(sock: zmq.Socket[bytes]) -> list[bytes] | None:
    """Return the next whole message, or None when nothing is waiting.

    Frames are taken uncopied and asked for `more` (libzmq's flag on the
    message), then copied to bytes: a getsockopt(RCVMORE) per frame costs
    more, as pyzmq looks every option up in its enum first.
    """
    try:
        frame = sock.recv(_NOBLOCK, copy=False)
    except zmq.Again:
        return None
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame.bytes)
    return frames


def has_input(sock: zmq.Socket[bytes]) -> bool:
    """Whether a message is waiting: cheaper than a recv that raises zmq.Again."""
    return bool(cast(int, sock.getsockopt(_EVENTS)) & _POLLIN)


# --- field checks, derived once from each class's annotations -----------------

#: (field, accepted types, is_nullable, item types of a list or None, required,
#: the exact classes that pass without further checks)
Check = tuple[
    str, tuple[type, ...], bool, tuple[type, ...] | None, bool, frozenset[type]
]


def _types(hint: Any) -> tuple[tuple[type, ...], bool, tuple[type, ...] | None]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        (inner,) = args
        accepted, _, items = _types(inner)
        return accepted, True, items
    if hint is Any:
        return (object,), True, None
    if hint is float:
        return (int, float), False, None
    if hint in (bool, int, str, bytes):
        return (hint,), False, None
    if origin is list:
        (inner,) = typing.get_args(hint)
        items = (object,) if inner is Any else _types(inner)[0]
        return (list,), False, items
    if origin is dict:
        return (dict,), False, None
    raise TypeError(f"no wire check for {hint!r}")


def _fits(value: Any, accepted: tuple[type, ...]) -> bool:
    # bool is an int in Python; on the wire it is only a bool.
    if value.__class__ is bool:
        return bool in accepted or object in accepted
    return isinstance(value, accepted)


def _install_checks(cls: type[Message]) -> None:
    hints = typing.get_type_hints(cls)
    checks: list[Check] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        required = (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        accepted, nullable, items = _types(hints[f.name])
        exact = frozenset(t for t in accepted if t is not object and t is not bool)
        if bool in accepted:
            exact |= {bool}
        checks.append((f.name, accepted, nullable, items, required, exact))
    cls._CHECKS = tuple(checks)
    cls._FIELDS = tuple(c[0] for c in checks)


for _cls in {
    **CLIENT_REQUESTS,
    **CLIENT_REPLIES,
    **WORKER_MESSAGES,
    **BROKER_MESSAGES,
}.values():
    _install_checks(_cls)
