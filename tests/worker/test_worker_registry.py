"""The handler registry and the `task` decorator."""

from __future__ import annotations

import pytest

import worker
from config.errors import ConfigError
from worker import registry, task


@pytest.fixture
def names():
    """Remove the handlers a test registers."""
    added: list[str] = []
    yield added
    for name in added:
        registry.unregister(name)


def test_public_names():
    assert worker.__all__ == sorted(worker.__all__)
    assert {"Worker", "task"} <= set(worker.__all__)
    for name in worker.__all__:
        assert getattr(worker, name) is not None


def test_bare_decorator_uses_the_function_name(names):
    @task
    def reg_plain(payload):
        return payload

    names.append("reg_plain")
    handler = registry.get("reg_plain")
    assert handler is not None and handler.fn is reg_plain
    assert not handler.wants_context
    assert handler.call(3, object()) == 3


def test_named_forms(names):
    @task("reg.positional")
    def first(payload):
        return 1

    @task(name="reg.keyword")
    def second(payload, ctx):
        return ctx

    names += ["reg.positional", "reg.keyword"]
    assert registry.get("reg.positional").fn is first
    handler = registry.get("reg.keyword")
    assert handler.wants_context and handler.call(None, "the-ctx") == "the-ctx"
    assert "reg.positional" in registry.names()


def test_context_is_decided_by_positional_parameters(names):
    @task("reg.varargs")
    def varargs(*args):
        return len(args)

    @task("reg.optional")
    def optional(payload, ctx=None):
        return ctx

    names += ["reg.varargs", "reg.optional"]
    assert registry.get("reg.varargs").call(1, 2) == 2
    assert registry.get("reg.optional").wants_context


@pytest.mark.parametrize("bad", ["", "x" * 201, 5])
def test_bad_names_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):

        @task(bad)
        def handler(payload):
            return payload


def test_longest_name_is_accepted(names):
    name = "n" * 200
    task(name)(lambda payload: payload)
    names.append(name)
    assert registry.get(name) is not None


def test_bad_signatures_are_refused():
    with pytest.raises(TypeError, match="payload"):

        @task("reg.none")
        def none():
            return 1

    with pytest.raises(TypeError, match="payload"):

        @task("reg.three")
        def three(a, b, c):
            return 1


def test_a_taken_name_is_refused(names):
    @task("reg.taken")
    def one(payload):
        return 1

    names.append("reg.taken")
    with pytest.raises(ValueError, match="already taken"):

        @task("reg.taken")
        def two(payload):
            return 2

    task("reg.taken")(one)  # the same function again is fine


def test_builtins_are_registered():
    registry.import_task_modules(["worker.builtins"])
    assert {"echo", "sleep", "fail", "checksum"} <= set(registry.names())


def test_import_errors_name_the_module():
    with pytest.raises(ConfigError, match="no_such_tasks_module"):
        registry.import_task_modules(["no_such_tasks_module"])
