"""hakobu's client SDK: submit tasks, wait for results, look at workers.

    from sdk import Client

    with Client("tcp://127.0.0.1:5556") as client:
        handle = client.submit("echo", {"hello": "world"})
        print(handle.result(timeout=30))

The `sdk` logger is disabled here so host programs opt in to its lines with
`loguru.logger.enable("sdk")`; the `hakobu` command line enables it.
"""

from __future__ import annotations

from loguru import logger

from config.errors import ConfigError, HakobuError
from sdk.client import Client
from sdk.errors import (
    BrokerUnavailable,
    DecodeError,
    InvalidRequest,
    PayloadTooLarge,
    ProtocolError,
    ResultTimeout,
    StoreError,
    TaskFailed,
    TaskNotFound,
    TransportError,
    VersionMismatch,
)
from sdk.protocol import PROTOCOL_VERSION
from sdk.records import TaskHandle, TaskInfo, WorkerInfo

logger.disable("sdk")

__all__ = [
    "BrokerUnavailable",
    "Client",
    "ConfigError",
    "DecodeError",
    "HakobuError",
    "InvalidRequest",
    "PROTOCOL_VERSION",
    "PayloadTooLarge",
    "ProtocolError",
    "ResultTimeout",
    "StoreError",
    "TaskFailed",
    "TaskHandle",
    "TaskInfo",
    "TaskNotFound",
    "TransportError",
    "VersionMismatch",
    "WorkerInfo",
]
