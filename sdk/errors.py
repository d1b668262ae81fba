"""Every error hakobu raises on purpose, under one base.

HakobuError
├── ConfigError            a setting is missing, malformed or out of range
├── ProtocolError          a message broke the wire contract
│   ├── DecodeError        bytes that are not a well-formed message
│   ├── VersionMismatch    a peer speaks another protocol version
│   ├── PayloadTooLarge    a payload or result over max_payload_bytes
│   └── InvalidRequest     well-formed but refused (bad field, unknown worker...)
├── TransportError         the network did not carry a request
│   └── BrokerUnavailable  no reply within the request timeout (also TimeoutError)
├── StoreError             the database refused a read or write
├── TaskFailed             the task ended failed or cancelled; carries the remote error
├── TaskNotFound           no task has that id
└── ResultTimeout          the wait for a result ran out (also TimeoutError)
"""

from __future__ import annotations

from config.errors import ConfigError, HakobuError


class ProtocolError(HakobuError):
    """A message broke the wire contract."""


class DecodeError(ProtocolError):
    """Bytes that do not form a valid message; keeps their size and the cause."""

    def __init__(self, reason: str, size: int = 0) -> None:
        super().__init__(f"{reason} ({size} bytes)" if size else reason)
        self.reason = reason
        self.size = size


class VersionMismatch(ProtocolError):
    """The peer speaks a protocol version this side does not."""


class PayloadTooLarge(ProtocolError):
    """A payload or result is larger than the max_payload_bytes setting."""

    def __init__(self, size: int, limit: int, what: str = "payload") -> None:
        super().__init__(
            f"{what} is {size} bytes packed, over the limit of {limit} bytes "
            "(setting max_payload_bytes / HAKOBU_MAX_PAYLOAD_BYTES)"
        )
        self.size = size
        self.limit = limit


class InvalidRequest(ProtocolError):
    """A well-formed request the broker refused; the message says why."""


class TransportError(HakobuError):
    """The network did not carry a request or its reply."""


class BrokerUnavailable(TransportError, TimeoutError):
    """No reply from the broker within the request timeout, after every retry."""


class StoreError(HakobuError):
    """The database refused a read or write."""


class TaskFailed(HakobuError):
    """The task ended failed or cancelled; carries the remote error."""

    def __init__(
        self,
        task_id: str,
        error_type: str,
        message: str,
        traceback: str = "",
        state: str = "failed",
    ) -> None:
        super().__init__(f"task {task_id} {state}: {error_type}: {message}")
        self.task_id = task_id
        self.error_type = error_type
        self.message = message
        self.traceback = traceback
        self.state = state


class TaskNotFound(HakobuError):
    """No task has the given id."""


class ResultTimeout(HakobuError, TimeoutError):
    """The wait for a task's result ran out before the task ended."""


#: Error names the broker sends in ERROR replies, mapped to classes.
ERROR_TYPES: dict[str, type[HakobuError]] = {
    cls.__name__: cls
    for cls in (
        ConfigError,
        DecodeError,
        VersionMismatch,
        PayloadTooLarge,
        InvalidRequest,
        ProtocolError,
        StoreError,
        TaskNotFound,
    )
}


def error_from_reply(
    error_type: str, message: str, size: int = 0, limit: int = 0
) -> HakobuError:
    """Rebuild the error a broker ERROR reply names; unknown names become base."""
    cls = ERROR_TYPES.get(error_type)
    if cls is None:
        return HakobuError(f"{error_type}: {message}")
    if cls is PayloadTooLarge:
        return PayloadTooLarge(size, limit)
    return cls(message)
