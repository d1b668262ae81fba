"""Checks on client requests beyond their wire types; each returns an error text."""

from __future__ import annotations

from config import ConfigError, validate_worker_id
from sdk import protocol

#: Largest absolute priority accepted.
MAX_PRIORITY = 1_000_000
#: Most retries a task may ask for.
MAX_RETRIES = 1000
#: Longest idempotency key, in characters.
MAX_KEY_CHARS = 200
#: Longest tag, in characters.
MAX_TAG_CHARS = 100
#: Longest duration a task may name (delay, deadlines, timeout): ten years.
MAX_DURATION_S = 10 * 365 * 86_400.0


def check_submit(request: protocol.Submit) -> str | None:
    """Return why a SUBMIT is refused, or None when it is acceptable."""
    if not request.name or len(request.name) > protocol.MAX_NAME_CHARS:
        return f"task name must be 1-{protocol.MAX_NAME_CHARS} characters"
    if not request.name.isprintable():
        return "task name must be printable text"
    if not request.key or len(request.key) > MAX_KEY_CHARS:
        return f"key must be 1-{MAX_KEY_CHARS} characters"
    if len(request.tags) > protocol.MAX_TAGS:
        return f"at most {protocol.MAX_TAGS} tags"
    for tag in request.tags:
        if not tag or len(tag) > MAX_TAG_CHARS or not tag.isprintable():
            return f"tag {tag[:40]!r} must be 1-{MAX_TAG_CHARS} printable characters"
    if abs(request.priority) > MAX_PRIORITY:
        return f"priority must be within +-{MAX_PRIORITY}"
    if not 0 <= request.retries <= MAX_RETRIES:
        return f"retries must be 0-{MAX_RETRIES}"
    for field in ("fallback_after", "start_deadline", "delay", "timeout"):
        value = getattr(request, field)
        if value is not None and not 0 <= value <= MAX_DURATION_S:
            return f"{field} must be 0-{MAX_DURATION_S:.0f} seconds"
    if request.timeout is not None and request.timeout == 0:
        return "timeout must be above 0 seconds"
    if request.preferred_worker == "":
        return "preferred_worker is empty; name a worker id or leave it out"
    if request.preferred_worker is not None:
        try:
            validate_worker_id(request.preferred_worker)
        except ConfigError as exc:
            return f"preferred_worker: {exc}"
    elif request.require_worker:
        return "require_worker needs preferred_worker"
    return None
