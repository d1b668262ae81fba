"""The `hakobu` commands that talk to a running broker: submit, status, result,
cancel, tasks, workers; and how every command reports errors."""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from broker import cli_render as render
from config.errors import ConfigError, HakobuError
from config.logging import setup_logging
from sdk.client import Client, check_submit_item
from sdk.errors import DecodeError, ProtocolError, TaskFailed, VersionMismatch

Endpoint = Annotated[
    str | None,
    typer.Option(
        "--endpoint",
        help="Broker clients endpoint (default: setting clients_endpoint, "
        "HAKOBU_CLIENTS_ENDPOINT, else tcp://127.0.0.1:5556).",
    ),
]
AsJson = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON document; bytes values appear as base64 text."
    ),
]
SubmitJson = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print JSON lines: one object per task, on its own line, in input "
        "order ({id, created}, or with --wait {id, state, result} or the error); "
        "bytes values appear as base64 text.",
    ),
]
TasksJson = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON document: a list of task records whose results are "
        "omitted (null); `status` or `result` shows one.",
    ),
]


def fail(message: str, code: int) -> NoReturn:
    """Print one error line on stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def reporting() -> Iterator[None]:
    """Turn hakobu errors into one line on stderr and the documented exit code."""
    try:
        yield
    except ConfigError as exc:
        fail(str(exc), 2)
    except (DecodeError, VersionMismatch) as exc:
        fail(f"{type(exc).__name__}: {exc}", 1)
    except ProtocolError as exc:
        # Refused arguments and payloads: InvalidRequest, PayloadTooLarge...
        fail(str(exc), 2)
    except HakobuError as exc:
        fail(str(exc), 1)


@contextmanager
def client_for(endpoint: str | None) -> Iterator[Client]:
    """Open a client on `endpoint` (or the configured one), reporting errors."""
    with reporting():
        setup_logging("ERROR")
        with Client(endpoint) as client:
            yield client


def submit(
    name: Annotated[
        str | None,
        typer.Argument(metavar="NAME", help="Task name: a handler the workers run."),
    ] = None,
    payload: Annotated[
        str | None, typer.Option(help="Payload as JSON text (default null).")
    ] = None,
    prefer: Annotated[
        str | None, typer.Option(help="Worker id to prefer for this task.")
    ] = None,
    require: Annotated[
        bool,
        typer.Option(
            "--require", help="Run only on the --prefer worker, however long."
        ),
    ] = False,
    fallback_after: Annotated[
        float | None,
        typer.Option(help="Seconds the preferred worker may be away before another."),
    ] = None,
    start_deadline: Annotated[
        float | None,
        typer.Option(help="Seconds the task may wait to start, else fail."),
    ] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    tag: Annotated[
        list[str] | None,
        typer.Option("--tag", help="Tag a worker must offer; repeatable."),
    ] = None,
    delay: Annotated[
        float | None, typer.Option(help="Seconds before the task may be assigned.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds the handler may run.")
    ] = None,
    retries: Annotated[int, typer.Option(help="Extra attempts after a failure.")] = 0,
    key: Annotated[
        str | None,
        typer.Option(help="Idempotency key: a repeat returns the same task."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the result and print it.")
    ] = False,
    wait_timeout: Annotated[
        float | None, typer.Option(help="Seconds --wait waits (default no limit).")
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            help="UTF-8 JSON lines, each an object with name, payload and submit "
            "keywords (preferred_worker, require_worker, priority, tags...), sent "
            "in as few requests as their size allows; '-' is stdin. The other "
            "task flags do not apply."
        ),
    ] = None,
    endpoint: Endpoint = None,
    as_json: SubmitJson = False,
) -> None:
    """Submit a task and print its id, or with --wait its result (as JSON)."""
    if (name is None) == (from_file is None):
        fail("give a task NAME or --from-file FILE, one of them", 2)
    for flag, seconds in (
        ("--fallback-after", fallback_after),
        ("--start-deadline", start_deadline),
        ("--delay", delay),
        ("--timeout", timeout),
        ("--wait-timeout", wait_timeout),
    ):
        _check_duration(flag, seconds)
    lines = _read_tasks(from_file) if from_file is not None else []
    value = _parse_json(payload, "--payload") if payload is not None else None
    with client_for(endpoint) as client:
        if name is None:
            limit = client.settings.max_payload_bytes
            items = _check_items(_source(from_file), lines, limit)
            handles = client.submit_many(items)
        else:
            handle = client.submit(
                name,
                value,
                preferred_worker=prefer,
                require_worker=require,
                fallback_after=fallback_after,
                start_deadline=start_deadline,
                priority=priority,
                tags=tag or (),
                delay=delay,
                timeout=timeout,
                retries=retries,
                key=key,
            )
            handles = [handle]
        if not wait:
            for handle in handles:
                _emit(as_json, {"id": handle.id, "created": handle.created}, handle.id)
            return
        failures = sum(
            not _print_result(client, h.id, wait_timeout, as_json) for h in handles
        )
    if failures:
        raise typer.Exit(1)


def status(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="Task id.")],
    endpoint: Endpoint = None,
    as_json: AsJson = False,
) -> None:
    """Show one task: state, worker, attempts, result or error."""
    with client_for(endpoint) as client:
        info = client.status(task_id)
    _emit(as_json, info, "\n".join(render.task_lines(info)))


def result(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="Task id.")],
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait (default no limit).")
    ] = None,
    endpoint: Endpoint = None,
    as_json: AsJson = False,
) -> None:
    """Wait for a task to end and print its result as JSON; exit 1 if it failed."""
    _check_duration("--timeout", timeout)
    with client_for(endpoint) as client:
        ok = _print_result(client, task_id, timeout, as_json)
    if not ok:
        raise typer.Exit(1)


def cancel(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="Task id.")],
    endpoint: Endpoint = None,
    as_json: AsJson = False,
) -> None:
    """Cancel a task that has not ended; print its state."""
    with client_for(endpoint) as client:
        info = client.cancel(task_id)
    _emit(as_json, info, f"{info.id} {info.state}")


def tasks(
    state: Annotated[
        str | None,
        typer.Option(
            help="Only this state: queued, assigned, running, succeeded, "
            "failed, cancelled."
        ),
    ] = None,
    worker: Annotated[
        str | None, typer.Option(help="Only tasks of this worker.")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=10_000, help="Most tasks to list (1 to 10,000).")
    ] = 100,
    endpoint: Endpoint = None,
    as_json: TasksJson = False,
) -> None:
    """List tasks, newest first (without results)."""
    with client_for(endpoint) as client:
        found = client.tasks(state=state, worker=worker, limit=limit)
    _emit(as_json, found, "\n".join(render.task_table(found)))


def workers(endpoint: Endpoint = None, as_json: AsJson = False) -> None:
    """List the workers the broker knows, with state and load."""
    with client_for(endpoint) as client:
        found = client.workers()
    _emit(as_json, found, "\n".join(render.worker_table(found)))


def register(app: typer.Typer) -> None:
    """Add the client commands to `app`."""
    for command in (submit, status, result, cancel, tasks, workers):
        app.command()(command)


# --- helpers ----------------------------------------------------------------------


def _emit(as_json: bool, value: Any, text: str) -> None:
    """Print `value` as JSON, or `text` for people."""
    typer.echo(render.dumps(value) if as_json else text)


def _print_result(
    client: Client, task_id: str, timeout: float | None, as_json: bool
) -> bool:
    """Wait for one task and print its result; print the error and return False."""
    try:
        value = client.result(task_id, timeout=timeout)
    except TaskFailed as exc:
        if as_json:
            typer.echo(render.dumps({"id": task_id, **_failure(exc)}))
        typer.echo(f"error: {exc}", err=True)
        return False
    except TimeoutError as exc:
        if as_json:
            typer.echo(render.dumps({"id": task_id, **_timed_out(exc)}))
        typer.echo(f"error: {exc}", err=True)
        return False
    _emit(
        as_json,
        {"id": task_id, "state": "succeeded", "result": value},
        render.dumps(value),
    )
    return True


def _failure(exc: TaskFailed) -> dict[str, Any]:
    return {
        "state": exc.state,
        "error_type": exc.error_type,
        "error": exc.message,
        "traceback": exc.traceback,
    }


def _timed_out(exc: TimeoutError) -> dict[str, Any]:
    """The JSON line of a task whose wait ran out: its state is not known."""
    return {
        "state": None,
        "error_type": type(exc).__name__,
        "error": str(exc),
        "traceback": None,
    }


def _check_duration(flag: str, seconds: float | None) -> None:
    """Exit 2 with one line when a seconds flag is negative or not finite."""
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        fail(f"{flag} must be a finite number of seconds, 0 or more, not {seconds}", 2)


def _parse_json(text: str, what: str) -> Any:
    """Return the value of JSON `text`, or exit 2 naming `what`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{what} is not valid JSON: {exc.msg} (column {exc.colno})", 2)
    except RecursionError:
        fail(f"{what} is not usable JSON: nested too deeply", 2)


def _read_tasks(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSON-lines file of task objects as (line number, object).

    Lines end at a line feed (a carriage return before it is ignored); each
    must be UTF-8 text holding one JSON object, or be blank. Anything else
    exits 2 with one line naming the file and the line.
    """
    try:
        if str(path) == "-":
            data = typer.get_binary_stream("stdin").read()
        else:
            data = path.read_bytes()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", 2)
    items = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        where = f"{_source(path)} line {number}"
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]  # a byte order mark is no JSON
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            fail(
                f"{where} is not UTF-8 text: byte {raw[exc.start]:#04x} at "
                f"column {exc.start + 1} ({exc.reason})",
                2,
            )
        if not line.strip():
            continue
        item = _parse_json(line, where)
        if not isinstance(item, dict):
            fail(f"{where}: expected a JSON object", 2)
        items.append((number, item))
    return items


def _source(path: Path | None) -> str:
    """Name a --from-file source in messages: its path, or stdin for '-'."""
    return "stdin" if str(path) == "-" else str(path)


def _check_items(
    source: str, lines: list[tuple[int, dict[str, Any]]], max_payload_bytes: int
) -> list[dict[str, Any]]:
    """Check each task as submit_many will; exit 2 naming the first bad line."""
    for number, item in lines:
        try:
            check_submit_item(item, max_payload_bytes)
        except ProtocolError as exc:
            fail(f"{source} line {number}: {exc}", 2)
    return [item for _, item in lines]
