"""Frozen settings for the broker, the worker and the client, and their loaders.

Precedence, lowest first: the defaults below, a TOML file (`--config`, or
`HAKOBU_CONFIG`, or `hakobu.toml` in the working folder when present), the
`HAKOBU_<FIELD>` environment variables, then command-line flags. A TOML file
may hold top-level keys shared by all roles and `[broker]`, `[worker]`,
`[client]` tables that win over them. Durations are float seconds (`_s`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from config.errors import ConfigError

#: Largest task payload or result accepted, in bytes (packed msgpack).
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
#: Longest worker id, in UTF-8 bytes; ZeroMQ refuses longer routing ids.
MAX_WORKER_ID_BYTES = 255
#: The TOML tables, one per role.
ROLES = ("broker", "worker", "client")
#: Name of the TOML file looked for in the working folder.
DEFAULT_CONFIG_FILE = "hakobu.toml"
ENV_PREFIX = "HAKOBU_"


@dataclass(frozen=True)
class BrokerSettings:
    """How the broker listens, stores and decides."""

    workers_endpoint: str = "tcp://127.0.0.1:5555"
    clients_endpoint: str = "tcp://127.0.0.1:5556"
    #: SQLite file of the store.
    db: str = "hakobu.db"
    #: SQLite `synchronous`: normal (WAL, no fsync per commit) or full.
    durability: str = "normal"
    #: Seconds between heartbeats sent to each worker.
    heartbeat_interval_s: float = 1.0
    #: Heartbeat intervals of silence after which a worker is declared lost.
    liveness: int = 3
    #: Seconds an ASSIGN may stay unacknowledged before it is sent again.
    ack_timeout_s: float = 2.0
    #: Sends of one notification before its worker counts as unreachable.
    max_sends: int = 5
    #: Default seconds a preferred worker may be away before another takes its task.
    fallback_after_s: float = 5.0
    #: Attempts after which a task whose workers keep getting lost ends failed.
    max_attempts: int = 5
    #: First retry delay after a failed attempt; doubles per attempt, up to 60 s.
    retry_backoff_s: float = 1.0
    #: Seconds of waiting that outweigh one priority level (starvation bound).
    priority_aging_s: float = 10.0
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    #: Seconds the loop keeps polling (yielding the CPU between polls) after
    #: traffic before it sleeps; 0 sleeps at once. Saves the wake-up latency of
    #: an idle CPU at the cost of CPU time while traffic is sparse.
    spin_s: float = 0.002
    #: Most inbound messages handled per loop turn, i.e. per commit.
    batch_max: int = 2000
    #: Seconds a succeeded, failed or cancelled task stays in the store after it
    #: ended (its row, result and notifications); 0 keeps every task for ever.
    retention_s: float = 86400.0
    #: Most task rows one prune pass deletes (one transaction of its own).
    prune_batch: int = 1000
    log_level: str = "INFO"
    log_json: bool = False
    #: Test-only fault hook: seconds added before every commit.
    fault_commit_delay_s: float = 0.0
    #: Test-only fault hook: seconds the replies to the first
    #: `fault_delayed_submits` SUBMIT requests are held back.
    fault_reply_delay_s: float = 0.0
    fault_delayed_submits: int = 1


@dataclass(frozen=True)
class WorkerSettings:
    """Who a worker is, where its broker is and how it runs handlers."""

    worker_id: str = ""
    broker_endpoint: str = "tcp://127.0.0.1:5555"
    #: Handlers that may run at once (one child process each).
    capacity: int = 1
    tags: tuple[str, ...] = ()
    #: Modules imported at start whose `@task` handlers join the built-ins.
    tasks: tuple[str, ...] = ()
    heartbeat_interval_s: float = 1.0
    #: Heartbeat intervals without broker traffic before reconnecting.
    liveness: int = 3
    #: Seconds between re-sends of a RESULT the broker has not confirmed.
    ack_timeout_s: float = 2.0
    #: Seconds running handlers get to finish after SIGTERM/SIGINT.
    grace_s: float = 10.0
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 5.0
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    log_level: str = "INFO"
    log_json: bool = False


@dataclass(frozen=True)
class ClientSettings:
    """Where the client sends requests and how long it waits for replies."""

    clients_endpoint: str = "tcp://127.0.0.1:5556"
    #: Seconds to wait for one reply before the request is retried.
    request_timeout_s: float = 5.0
    #: Retries of a request, each on a fresh socket, before giving up.
    request_retries: int = 2
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES


# Lower bounds for numeric fields; anything below is a ConfigError.
_MINIMUM: dict[str, float] = {
    "heartbeat_interval_s": 0.01,
    "liveness": 1,
    "ack_timeout_s": 0.01,
    "max_sends": 1,
    "fallback_after_s": 0.0,
    "max_attempts": 1,
    "retry_backoff_s": 0.0,
    "priority_aging_s": 0.001,
    "max_payload_bytes": 1024,
    "batch_max": 1,
    "retention_s": 0.0,
    "spin_s": 0.0,
    "prune_batch": 1,
    "capacity": 1,
    "grace_s": 0.0,
    "reconnect_min_s": 0.001,
    "reconnect_max_s": 0.001,
    "request_timeout_s": 0.01,
    "request_retries": 0,
    "fault_commit_delay_s": 0.0,
    "fault_reply_delay_s": 0.0,
    "fault_delayed_submits": 0,
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "durability": ("normal", "full"),
    "log_level": ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR"),
}

S = TypeVar("S", BrokerSettings, WorkerSettings, ClientSettings)


def load_broker_settings(
    config: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **flags: Any,
) -> BrokerSettings:
    """Build broker settings from every source; flags that are None are unset."""
    return _load(BrokerSettings, "broker", config, env, flags)


def load_worker_settings(
    config: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **flags: Any,
) -> WorkerSettings:
    """Build worker settings from every source and check the worker id."""
    settings = _load(WorkerSettings, "worker", config, env, flags)
    validate_worker_id(settings.worker_id)
    return settings


def load_client_settings(
    config: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **flags: Any,
) -> ClientSettings:
    """Build client settings from every source."""
    return _load(ClientSettings, "client", config, env, flags)


def validate_worker_id(worker_id: str | bytes) -> str:
    """Return the worker id as text, or raise ConfigError saying what is wrong.

    A worker id is its ZeroMQ routing id, so it must be 1-255 UTF-8 bytes with
    no control characters (which also rules out the reserved leading zero byte)
    and no surrounding whitespace.
    """
    if isinstance(worker_id, bytes):
        try:
            worker_id = worker_id.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"invalid worker id {worker_id!r}: it must be UTF-8 text"
            ) from exc
    if not isinstance(worker_id, str):
        raise ConfigError(
            f"invalid worker id {worker_id!r}: it must be text, not "
            f"{type(worker_id).__name__}"
        )
    if not worker_id:
        raise ConfigError(
            "invalid worker id: it is empty; pass --id or HAKOBU_WORKER_ID"
        )
    size = len(worker_id.encode("utf-8", "surrogatepass"))
    if size > MAX_WORKER_ID_BYTES:
        raise ConfigError(
            f"invalid worker id: {size} bytes long, at most "
            f"{MAX_WORKER_ID_BYTES} UTF-8 bytes are allowed"
        )
    if not all(ch.isprintable() for ch in worker_id):
        raise ConfigError(
            f"invalid worker id {worker_id!r}: control characters are not allowed"
        )
    if worker_id != worker_id.strip():
        raise ConfigError(f"invalid worker id {worker_id!r}: surrounding whitespace")
    return worker_id


def _load(
    cls: type[S],
    role: str,
    config: str | Path | None,
    env: Mapping[str, str] | None,
    flags: Mapping[str, Any],
) -> S:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}

    for key, value, source in _file_values(role, config, env):
        values[key] = _convert(cls, key, value, source)
    for f in dataclasses.fields(cls):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = _convert(cls, f.name, raw, ENV_PREFIX + f.name.upper())
    for key, value in flags.items():
        if value is None:
            continue
        if key not in _field_names(cls):
            raise ConfigError(f"unknown {role} setting {key!r}")
        # Flags are named for people (--retention, --id), not for settings.
        values[key] = _convert(cls, key, value, "the command line")

    return cls(**values)


def _file_values(
    role: str, config: str | Path | None, env: Mapping[str, str]
) -> list[tuple[str, Any, str]]:
    path = config or env.get(ENV_PREFIX + "CONFIG")
    if path is None:
        if not Path(DEFAULT_CONFIG_FILE).is_file():
            return []
        path = DEFAULT_CONFIG_FILE
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc

    cls = {"broker": BrokerSettings, "worker": WorkerSettings}.get(role, ClientSettings)
    known = _field_names(cls)
    shared = {k: v for k, v in data.items() if not isinstance(v, dict)}
    anyone = set().union(
        *(_field_names(c) for c in (BrokerSettings, WorkerSettings, ClientSettings))
    )
    for key in shared:
        if key not in anyone:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
    for key, value in data.items():
        if isinstance(value, dict) and key not in ROLES:
            raise ConfigError(
                f"config file {path}: unknown table [{key}]; the tables are "
                + ", ".join(f"[{r}]" for r in ROLES)
            )
    found = [(k, v, f"{path}") for k, v in shared.items() if k in known]
    table = data.get(role, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [{role}] must be a table")
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"config file {path}: unknown {role} setting {key!r}")
        found.append((key, value, f"{path} [{role}]"))
    return found


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _convert(cls: type, key: str, value: Any, source: str) -> Any:
    default = next(f for f in dataclasses.fields(cls) if f.name == key).default
    try:
        result = _coerce(default, value)
    except (TypeError, ValueError) as exc:
        kind = type(default).__name__ if not isinstance(default, tuple) else "list"
        raise ConfigError(
            f"invalid setting {key}={value!r} from {source}: expected {kind}"
        ) from exc
    if key == "log_level":
        result = result.upper()
    _check_range(key, result, source)
    return result


def _coerce(default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if isinstance(default, int):
        if isinstance(value, bool) or isinstance(value, float):
            raise TypeError(value)
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise TypeError(value)
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(value)
        return number
    if isinstance(default, tuple):
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise TypeError(value)
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _check_range(key: str, value: Any, source: str) -> None:
    low = _MINIMUM.get(key)
    if low is not None and value < low:
        raise ConfigError(f"invalid setting {key}={value!r} from {source}: below {low}")
    choices = _CHOICES.get(key)
    if choices is not None:
        if value not in choices:
            raise ConfigError(
                f"invalid setting {key}={value!r} from {source}: "
                f"choose one of {', '.join(choices)}"
            )


def replace(settings: S, **changes: Any) -> S:
    """Return a copy of settings with checked changes applied."""
    for key, value in changes.items():
        _check_range(key, value, "code")
    return dataclasses.replace(settings, **changes)


__all__ = [
    "BrokerSettings",
    "ClientSettings",
    "WorkerSettings",
    "load_broker_settings",
    "load_client_settings",
    "load_worker_settings",
    "replace",
    "validate_worker_id",
]
