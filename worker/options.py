"""Turn the `Worker` constructor's arguments into checked WorkerSettings."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from config.errors import ConfigError
from config.settings import WorkerSettings, replace, validate_worker_id
from sdk.protocol import MAX_TAGS


def worker_settings(
    worker_id: str | bytes | None,
    broker: str | None,
    capacity: int | None,
    tags: Iterable[str] | str,
    tasks: Iterable[str] | str,
    settings: WorkerSettings | None,
) -> WorkerSettings:
    """Return `settings` (or the defaults) with the explicit arguments applied.

    Raises:
        ConfigError: the worker id, endpoint, capacity or a tag is invalid.
    """
    base = settings if settings is not None else WorkerSettings()
    chosen_id = worker_id if worker_id is not None else base.worker_id
    changes: dict[str, Any] = {"worker_id": validate_worker_id(chosen_id)}
    if broker is not None:
        changes["broker_endpoint"] = _check_endpoint(broker)
    if capacity is not None:
        changes["capacity"] = _check_capacity(capacity)
    if _as_tuple(tags):
        changes["tags"] = _check_tags(_as_tuple(tags))
    if _as_tuple(tasks):
        changes["tasks"] = tuple(dict.fromkeys((*base.tasks, *_as_tuple(tasks))))
    merged = replace(base, **changes)
    _check_endpoint(merged.broker_endpoint)
    _check_tags(merged.tags)
    return merged


def _as_tuple(values: Iterable[str] | str) -> tuple[Any, ...]:
    return (values,) if isinstance(values, str) else tuple(values)


def _check_endpoint(endpoint: object) -> str:
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise ConfigError(
            f"invalid broker endpoint {endpoint!r}: expected e.g. tcp://127.0.0.1:5555"
        )
    return endpoint


def _check_capacity(capacity: object) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ConfigError(f"invalid capacity {capacity!r}: expected an integer >= 1")
    return capacity


def _check_tags(tags: tuple[Any, ...]) -> tuple[str, ...]:
    if len(tags) > MAX_TAGS:
        raise ConfigError(f"too many tags ({len(tags)}), at most {MAX_TAGS}")
    for tag in tags:
        if not isinstance(tag, str) or not tag.strip():
            raise ConfigError(f"invalid tag {tag!r}: expected non-empty text")
    return tags
