"""The `hakobu` command line.

Commands:
    broker    serve: store tasks, assign them to workers, answer clients
    worker    run a worker with an id, capacity, tags and handler modules
    up        a broker plus N local workers in one go (optionally a demo)
    submit    submit a task (or a JSON-lines file of them), optionally wait
    status    show one task
    result    wait for a task and print its result
    cancel    cancel a task
    tasks     list tasks, newest first
    workers   list workers
    bench     the delivery-rate harness: throughput, latency, ceilings

Exit codes: 0 done, 1 failed (task failed, broker unreachable, timeout),
2 bad usage or settings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from broker.cli_bench import bench_command
from broker.cli_client import register, reporting
from config.logging import setup_logging
from config.settings import (
    WorkerSettings,
    load_broker_settings,
    load_worker_settings,
)

app = typer.Typer(
    help="hakobu: a push-based task broker on ZeroMQ.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML settings file (default: HAKOBU_CONFIG, "
        "else ./hakobu.toml when present).",
    ),
]
LogLevel = Annotated[
    str | None,
    typer.Option(
        "--log-level", help="TRACE, DEBUG, INFO, WARNING or ERROR (default INFO)."
    ),
]
LogJson = Annotated[
    bool, typer.Option("--log-json", help="Log JSON lines instead of text.")
]
Retention = Annotated[
    float | None,
    typer.Option(
        "--retention",
        help="Seconds a succeeded, failed or cancelled task stays in the store "
        "before it is pruned; 0 keeps every task (default 86400, one day).",
    ),
]


def main() -> None:
    """Run the `hakobu` command line."""
    app()


# --- processes ------------------------------------------------------------------


@app.command()
def broker(
    workers_endpoint: Annotated[
        str | None,
        typer.Option(
            help="Endpoint workers connect to (default tcp://127.0.0.1:5555)."
        ),
    ] = None,
    clients_endpoint: Annotated[
        str | None,
        typer.Option(
            help="Endpoint clients connect to (default tcp://127.0.0.1:5556)."
        ),
    ] = None,
    db: Annotated[
        str | None, typer.Option(help="SQLite store file (default hakobu.db).")
    ] = None,
    config: ConfigFile = None,
    durability: Annotated[
        str | None,
        typer.Option(
            help="SQLite synchronous: normal (WAL) or full (fsync each commit)."
        ),
    ] = None,
    heartbeat_interval: Annotated[
        float | None, typer.Option(help="Seconds between heartbeats (default 1).")
    ] = None,
    liveness: Annotated[
        int | None,
        typer.Option(
            help="Missed heartbeats after which a worker is lost (default 3)."
        ),
    ] = None,
    ack_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds before an unacknowledged ASSIGN is resent (default 2)."
        ),
    ] = None,
    fallback_after: Annotated[
        float | None,
        typer.Option(help="Seconds a preferred worker may be away (default 5)."),
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            help="Attempts before a task whose workers die fails (default 5)."
        ),
    ] = None,
    max_payload_bytes: Annotated[
        int | None,
        typer.Option(help="Largest payload or result, packed (default 16 MiB)."),
    ] = None,
    retention: Retention = None,
    log_level: LogLevel = None,
    log_json: LogJson = False,
) -> None:
    """Serve: store tasks, push them to workers, answer clients."""
    with reporting():
        settings = load_broker_settings(
            config,
            workers_endpoint=workers_endpoint,
            clients_endpoint=clients_endpoint,
            db=db,
            durability=durability,
            heartbeat_interval_s=heartbeat_interval,
            liveness=liveness,
            ack_timeout_s=ack_timeout,
            fallback_after_s=fallback_after,
            max_attempts=max_attempts,
            max_payload_bytes=max_payload_bytes,
            retention_s=retention,
            log_level=log_level,
            log_json=log_json or None,
        )
    setup_logging(settings.log_level, settings.log_json)
    from broker.server import serve

    raise typer.Exit(serve(settings))


@app.command()
def worker(
    worker_id: Annotated[
        str | None,
        typer.Option(
            "--id", help="Worker id, 1-255 UTF-8 bytes (or HAKOBU_WORKER_ID)."
        ),
    ] = None,
    broker_endpoint: Annotated[
        str | None,
        typer.Option(
            "--broker", help="Broker workers endpoint (default tcp://127.0.0.1:5555)."
        ),
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks",
            help="Module whose @task handlers to load; repeatable. The working "
            "folder comes first on sys.path for it, as with `python -m`.",
        ),
    ] = None,
    capacity: Annotated[
        int | None,
        typer.Option(
            help=f"Handlers that may run at once (default {WorkerSettings.capacity})."
        ),
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option("--tag", help="Tag this worker offers; repeatable."),
    ] = None,
    grace: Annotated[
        float | None,
        typer.Option(help="Seconds tasks get to finish after SIGTERM (default 10)."),
    ] = None,
    heartbeat_interval: Annotated[
        float | None, typer.Option(help="Seconds between heartbeats (default 1).")
    ] = None,
    liveness: Annotated[
        int | None,
        typer.Option(
            help="Silent heartbeat intervals before reconnecting (default 3)."
        ),
    ] = None,
    config: ConfigFile = None,
    log_level: LogLevel = None,
    log_json: LogJson = False,
) -> None:
    """Run a worker: connect to the broker and run the tasks it pushes."""
    with reporting():
        settings = load_worker_settings(
            config,
            worker_id=worker_id,
            broker_endpoint=broker_endpoint,
            tasks=tuple(tasks) if tasks else None,
            capacity=capacity,
            tags=tuple(tag) if tag else None,
            grace_s=grace,
            heartbeat_interval_s=heartbeat_interval,
            liveness=liveness,
            log_level=log_level,
            log_json=log_json or None,
        )
    setup_logging(settings.log_level, settings.log_json)
    from worker import Worker

    if settings.tasks:
        working_folder_on_path()
    with reporting():
        # A task module that cannot be imported is one line and exit 2.
        runner = Worker(settings=settings)
    raise typer.Exit(runner.run())


def working_folder_on_path() -> None:
    """Put the working folder first on sys.path, as `python -m` does.

    Handler child processes are spawned, and spawn hands them this sys.path,
    so they import the same task modules. Like `python -m`, this is skipped
    under PYTHONSAFEPATH / -P.
    """
    if sys.flags.safe_path:
        return
    here = os.getcwd()
    if not any(os.path.abspath(entry) == here for entry in sys.path):
        sys.path.insert(0, here)


@app.command()
def up(
    workers: Annotated[int, typer.Option(min=1, help="Local workers to start.")] = 2,
    db: Annotated[
        str | None, typer.Option(help="SQLite store file (default hakobu.db).")
    ] = None,
    workers_endpoint: Annotated[
        str | None,
        typer.Option(help="Workers endpoint (default tcp://127.0.0.1:5555)."),
    ] = None,
    clients_endpoint: Annotated[
        str | None,
        typer.Option(help="Clients endpoint (default tcp://127.0.0.1:5556)."),
    ] = None,
    capacity: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Capacity of each worker (default: setting capacity, from the "
            f"TOML worker table or HAKOBU_CAPACITY, else {WorkerSettings.capacity}).",
        ),
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option("--tasks", help="Handler module for the workers; repeatable."),
    ] = None,
    demo: Annotated[
        Path | None,
        typer.Option(
            help="Checksum every file under DIR through the cluster, report, stop.",
            file_okay=False,
            exists=True,
        ),
    ] = None,
    log_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the processes' logs (default: a new temporary folder)."
        ),
    ] = None,
    retention: Retention = None,
    config: ConfigFile = None,
) -> None:
    """Start a broker and N local workers (local_001, ...) until Ctrl-C."""
    from broker.cli_up import run_up

    with reporting():
        settings = load_broker_settings(
            config,
            db=db,
            workers_endpoint=workers_endpoint,
            clients_endpoint=clients_endpoint,
            retention_s=retention,
        )
        # The workers read these settings themselves; loading them here only
        # refuses bad ones early and tells the layout their capacity.
        worker_settings = load_worker_settings(
            config,
            worker_id="local_001",
            capacity=capacity,
            tasks=tuple(tasks) if tasks else None,
        )
    setup_logging("WARNING")
    code = run_up(
        settings,
        workers=workers,
        capacity=capacity,
        worker_capacity=worker_settings.capacity,
        tasks=tuple(tasks or ()),
        demo=demo,
        log_dir=log_dir,
        config=config,
    )
    raise typer.Exit(code)


register(app)


app.command(name="bench")(bench_command)


if __name__ == "__main__":
    main()
