"""The error tree: one base, timeouts that are TimeoutError, reply mapping."""

from __future__ import annotations

import inspect

import pytest

import config.errors
from sdk import errors
from sdk.errors import (
    BrokerUnavailable,
    ConfigError,
    DecodeError,
    HakobuError,
    InvalidRequest,
    PayloadTooLarge,
    ProtocolError,
    ResultTimeout,
    StoreError,
    TaskFailed,
    TaskNotFound,
    TransportError,
    VersionMismatch,
    error_from_reply,
)

#: The tree of STYLE.md and the sdk.errors docstring: class -> direct parent.
TREE = {
    ConfigError: HakobuError,
    ProtocolError: HakobuError,
    DecodeError: ProtocolError,
    VersionMismatch: ProtocolError,
    PayloadTooLarge: ProtocolError,
    InvalidRequest: ProtocolError,
    TransportError: HakobuError,
    BrokerUnavailable: TransportError,
    StoreError: HakobuError,
    TaskFailed: HakobuError,
    TaskNotFound: HakobuError,
    ResultTimeout: HakobuError,
}


def public_error_classes() -> list[type[BaseException]]:
    return [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, BaseException)
    ]


def test_every_error_class_is_under_the_one_base() -> None:
    classes = public_error_classes()

    assert set(TREE) | {HakobuError} <= set(classes)
    assert all(issubclass(cls, HakobuError) for cls in classes)
    assert HakobuError.__bases__ == (Exception,)


@pytest.mark.parametrize("cls", list(TREE), ids=lambda cls: cls.__name__)
def test_each_class_sits_under_its_parent(cls: type[HakobuError]) -> None:
    assert TREE[cls] in cls.__bases__


def test_root_and_config_error_are_shared_with_config() -> None:
    assert errors.HakobuError is config.errors.HakobuError
    assert errors.ConfigError is config.errors.ConfigError


@pytest.mark.parametrize("cls", [BrokerUnavailable, ResultTimeout])
def test_timeouts_are_builtin_timeout_errors(cls: type[HakobuError]) -> None:
    with pytest.raises(TimeoutError):
        raise cls("no reply within 1.0 s")
    with pytest.raises(HakobuError):
        raise cls("no reply within 1.0 s")


def test_task_failed_carries_the_remote_error() -> None:
    exc = TaskFailed("t-1", "ZeroDivisionError", "division by zero", "Traceback...")

    assert (exc.task_id, exc.error_type, exc.message) == (
        "t-1",
        "ZeroDivisionError",
        "division by zero",
    )
    assert exc.traceback == "Traceback..."
    assert exc.state == "failed"
    assert "ZeroDivisionError" in str(exc) and "t-1" in str(exc)


def test_decode_error_keeps_size_and_reason() -> None:
    exc = DecodeError("bad header", 17)

    assert (exc.reason, exc.size) == ("bad header", 17)
    assert "17 bytes" in str(exc)


@pytest.mark.parametrize(
    "cls",
    [
        ConfigError,
        DecodeError,
        VersionMismatch,
        InvalidRequest,
        ProtocolError,
        StoreError,
        TaskNotFound,
    ],
    ids=lambda cls: cls.__name__,
)
def test_error_from_reply_maps_names_to_classes(cls: type[HakobuError]) -> None:
    exc = error_from_reply(cls.__name__, "what went wrong")

    assert type(exc) is cls
    assert "what went wrong" in str(exc)


def test_error_from_reply_rebuilds_payload_too_large() -> None:
    exc = error_from_reply("PayloadTooLarge", "ignored", size=20, limit=10)

    assert type(exc) is PayloadTooLarge
    assert (exc.size, exc.limit) == (20, 10)


@pytest.mark.parametrize("name", ["NoSuchError", "", "SystemExit", "KeyboardInterrupt"])
def test_error_from_reply_unknown_name_becomes_the_base(name: str) -> None:
    exc = error_from_reply(name, "odd")

    assert type(exc) is HakobuError
    assert "odd" in str(exc)
