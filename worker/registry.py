"""The handler registry: task name -> handler, the `task` decorator, task modules.

The registry is module-level on purpose: `@task` runs at import time, in the
worker process (to announce handler names) and again in every handler child
process (to call them), so both sides see the same names for the same modules.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from config.errors import ConfigError
from sdk.protocol import MAX_NAME_CHARS

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Handler:
    """A registered handler and how to call it."""

    name: str
    fn: Callable[..., Any]
    #: True when the handler declares a second positional parameter (the context).
    wants_context: bool
    module: str

    def call(self, payload: Any, context: Any) -> Any:
        """Call the handler with the payload, and the context when it wants one."""
        if self.wants_context:
            return self.fn(payload, context)
        return self.fn(payload)


_HANDLERS: dict[str, Handler] = {}
#: Names a script's module has: run directly, or re-imported in a spawn child.
_MAIN_MODULES = frozenset({"__main__", "__mp_main__"})
#: What a task module that cannot be imported is told to check.
IMPORT_HINT = "is it on PYTHONPATH? run from its folder with PYTHONPATH=."


@overload
def task(fn: F, /) -> F: ...


@overload
def task(name: str | None = None, /) -> Callable[[F], F]: ...


@overload
def task(*, name: str | None = None) -> Callable[[F], F]: ...


def task(fn_or_name: Any = None, /, *, name: str | None = None) -> Any:
    """Register a handler: `@task`, `@task("name")` or `@task(name="name")`."""
    if callable(fn_or_name):
        return register(fn_or_name, name)
    if fn_or_name is not None and not isinstance(fn_or_name, str):
        raise TypeError(
            f"@task takes a function or a name, not {type(fn_or_name).__name__}"
        )
    if fn_or_name is not None and name is not None:
        raise TypeError("@task got a name twice; pass it positionally or as name=")
    chosen = fn_or_name if fn_or_name is not None else name

    def decorate(fn: F) -> F:
        return register(fn, chosen)

    return decorate


def register(fn: F, name: str | None = None) -> F:
    """Register `fn` under `name` (default: its function name) and return it."""
    if not callable(fn):
        raise TypeError(f"a handler must be callable, got {type(fn).__name__}")
    chosen = name if name is not None else getattr(fn, "__name__", "")
    check_name(chosen)
    module = getattr(fn, "__module__", None) or "?"
    handler = Handler(chosen, fn, _wants_context(fn, chosen), module)
    old = _HANDLERS.get(chosen)
    if old is not None and not _same_function(old, handler):
        raise ValueError(
            f"task name {chosen!r} is already taken by {old.module}."
            f"{_qualname(old.fn)}; pick another name"
        )
    # NOTE: the same function registered again (a module imported twice, e.g.
    # as __main__ and by name in a child process) simply replaces the entry.
    _HANDLERS[chosen] = handler
    return fn


def check_name(name: object) -> str:
    """Return `name` if it is a valid task name, else raise ValueError."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS:
        raise ValueError(
            f"invalid task name {name!r}: it must be text of 1-{MAX_NAME_CHARS} "
            "characters"
        )
    return name


def get(name: str) -> Handler | None:
    """Return the handler registered under `name`, or None."""
    return _HANDLERS.get(name)


def names() -> list[str]:
    """Return every registered handler name, sorted."""
    return sorted(_HANDLERS)


def modules() -> list[str]:
    """Return the modules that registered handlers, sorted, without __main__."""
    return sorted({h.module for h in _HANDLERS.values()} - {*_MAIN_MODULES, "?"})


def unregister(name: str) -> None:
    """Remove a handler if present (for tests and reloads)."""
    _HANDLERS.pop(name, None)


def import_task_modules(module_names: Iterable[str]) -> list[str]:
    """Import each module so its `@task` handlers register; return the names.

    Raises:
        ConfigError: a module cannot be imported; the message names it.
    """
    imported = []
    for module_name in module_names:
        if not isinstance(module_name, str) or not module_name.strip():
            raise ConfigError(f"invalid task module name {module_name!r}")
        name = module_name.strip()
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import-time failure is a setup error
            # One line: a SyntaxError or a custom message may span several.
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise ConfigError(
                f"cannot import task module {name!r}: {reason} ({IMPORT_HINT})"
            ) from exc
        imported.append(name)
    return imported


def _wants_context(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False  # builtins without a signature: treat as fn(payload)
    positional = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    has_varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    required = [p for p in positional if p.default is p.empty]
    required_kw = [
        p for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    ]
    if (not positional and not has_varargs) or len(required) > 2 or required_kw:
        raise TypeError(
            f"handler {name!r} must accept (payload) or (payload, ctx); "
            f"its signature is {inspect.signature(fn)}"
        )
    return len(positional) >= 2 or has_varargs


def _same_function(old: Handler, new: Handler) -> bool:
    if _qualname(old.fn) != _qualname(new.fn):
        return False
    return old.module == new.module or bool({old.module, new.module} & _MAIN_MODULES)


def _qualname(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", repr(fn))
