"""`hakobu up`: a broker and N local workers as child processes, stopped together.

The children are `python -m broker.cli broker|worker ...` in their own
sessions, with output in one log file each, so Ctrl-C reaches only this
process, which then stops the workers (letting them drain) before the broker.
On Linux each child also gets SIGTERM when this process dies, even by SIGKILL
(PR_SET_PDEATHSIG), so no broker or worker outlives `up`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import typer

from config.settings import BrokerSettings
from sdk.client import Client
from sdk.errors import BrokerUnavailable

#: Seconds the broker and workers get to come up and register.
START_TIMEOUT_S = 30.0
#: Seconds a worker gets to drain and exit after SIGTERM before SIGKILL.
WORKER_STOP_S = 15.0
#: Seconds the broker gets to exit after SIGTERM before SIGKILL.
BROKER_STOP_S = 10.0
CLI = [sys.executable, "-m", "broker.cli"]
#: prctl option: the signal a process gets when the thread that forked it dies.
PR_SET_PDEATHSIG = 1


class Children:
    """The processes `up` started, by name, with their log files."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start `hakobu ARGS` in its own session, output to LOG_DIR/NAME.log."""
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [*CLI, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self.procs[name] = proc
        return proc

    def exited(self) -> dict[str, int]:
        """Return the children that have exited, with their exit codes."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def stop(self, names: list[str], wait_s: float) -> None:
        """SIGTERM the named children, wait up to `wait_s`, then SIGKILL by pid."""
        live = [self.procs[n] for n in names if n in self.procs]
        for proc in live:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)

    def tail(self, name: str, lines: int = 5) -> str:
        """Return the last lines of a child's log."""
        path = self.log_dir / f"{name}.log"
        text = (
            path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        )
        return "\n".join(text.splitlines()[-lines:])


def die_with_parent() -> Callable[[], None] | None:
    """Return a preexec_fn giving the child SIGTERM when this process dies.

    Linux only (prctl PR_SET_PDEATHSIG); None where prctl is missing. The
    signal fires when the thread that started the child ends, so children
    are started from the main thread, which lives as long as `up`.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sig = ctypes.c_ulong(int(signal.SIGTERM))
    zero = ctypes.c_ulong(0)

    def preexec() -> None:
        prctl(ctypes.c_int(PR_SET_PDEATHSIG), sig, zero, zero, zero)
        if os.getppid() != parent:
            # `up` died between fork and prctl: nobody would stop this child.
            os._exit(1)

    return preexec


def run_up(
    settings: BrokerSettings,
    *,
    workers: int,
    capacity: int | None,
    worker_capacity: int,
    tasks: tuple[str, ...],
    demo: Path | None,
    log_dir: Path | None,
    config: Path | None,
) -> int:
    """Start everything, serve or run the demo, stop everything; return exit code.

    `capacity` is passed to the workers only when given, so the [worker]
    table and HAKOBU_CAPACITY apply otherwise; `worker_capacity` is what they
    will use, for the layout.
    """
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="hakobu-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    children = Children(log_dir)
    ids = [f"local_{n:03d}" for n in range(1, workers + 1)]
    stop = threading.Event()
    previous = _on_signals(stop)
    try:
        children.start("broker", _broker_args(settings, config))
        for worker_id in ids:
            children.start(
                worker_id, _worker_args(settings, worker_id, capacity, tasks, config)
            )
        endpoint = connectable(settings.clients_endpoint)
        with Client(endpoint, request_timeout=1.0) as client:
            problem = _wait_online(client, endpoint, ids, children, stop)
            if problem and stop.is_set() and demo is None:
                # Asked to stop while starting: a clean stop, not a failure.
                typer.echo("stopped before every worker was online", err=True)
                return 0
            if problem:
                typer.echo(f"error: {problem}", err=True)
                return 1
            _print_layout(
                settings, ids, worker_capacity, children, log_dir, demo is None
            )
            if demo is not None:
                from broker.cli_demo import run_demo

                return run_demo(client, demo, ids, settings.db, stop, log_dir)
            typer.echo("serving; press Ctrl-C to stop")
            return _serve(children, stop)
    finally:
        typer.echo("stopping workers and broker", err=True)
        children.stop(ids, WORKER_STOP_S)
        children.stop(["broker"], BROKER_STOP_S)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def connectable(endpoint: str) -> str:
    """Return an endpoint a local peer can connect to (wildcard host -> loopback)."""
    for wildcard in ("://*:", "://0.0.0.0:"):
        endpoint = endpoint.replace(wildcard, "://127.0.0.1:")
    return endpoint


def _broker_args(settings: BrokerSettings, config: Path | None) -> list[str]:
    args = [
        "broker",
        "--workers-endpoint",
        settings.workers_endpoint,
        "--clients-endpoint",
        settings.clients_endpoint,
        "--db",
        settings.db,
        "--retention",
        repr(settings.retention_s),
    ]
    return args + (["--config", str(config)] if config else [])


def _worker_args(
    settings: BrokerSettings,
    worker_id: str,
    capacity: int | None,
    tasks: tuple[str, ...],
    config: Path | None,
) -> list[str]:
    args = ["worker", "--id", worker_id]
    if capacity is not None:
        args += ["--capacity", str(capacity)]
    args += ["--broker", connectable(settings.workers_endpoint)]
    for module in tasks:
        args += ["--tasks", module]
    return args + (["--config", str(config)] if config else [])


def _wait_online(
    client: Client,
    endpoint: str,
    ids: list[str],
    children: Children,
    stop: threading.Event,
) -> str | None:
    """Wait until every worker is online; return what went wrong, if anything."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not stop.is_set():
        for name, code in children.exited().items():
            return f"{name} exited with code {code} at start:\n{children.tail(name)}"
        online: set[str] = set()
        # Ask only once the broker listens, so start-up logs no client retries.
        if _is_listening(endpoint):
            try:
                online = {w.id for w in client.workers() if w.state == "online"}
            except BrokerUnavailable:
                pass
        if online.issuperset(ids):
            return None
        if time.monotonic() > deadline:
            missing = ", ".join(sorted(set(ids) - online))
            return f"not online after {START_TIMEOUT_S:g} s: {missing}"
        stop.wait(0.1)
    return "interrupted while starting"


def _is_listening(endpoint: str) -> bool:
    """Whether a tcp:// endpoint accepts connections or an ipc:// one exists."""
    scheme, _, address = endpoint.partition("://")
    if scheme == "ipc":
        return os.path.exists(address)
    if scheme != "tcp":
        return True
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.2):
            return True
    except (OSError, ValueError):
        return False


def _print_layout(
    settings: BrokerSettings,
    ids: list[str],
    capacity: int,
    children: Children,
    log_dir: Path,
    stays_up: bool,
) -> None:
    pids = ", ".join(f"{w} (pid {children.procs[w].pid})" for w in ids)
    lines = [
        f"broker    pid {children.procs['broker'].pid}",
        f"clients   {settings.clients_endpoint}",
        f"workers   {settings.workers_endpoint}",
        f"store     {Path(settings.db).resolve()}",
        f"online    {pids}, capacity {capacity} each",
        f"logs      {log_dir}",
    ]
    if stays_up:  # a demo run stops when it is done: nothing to try then
        lines.append(
            f"try       hakobu submit echo --payload '\"hi\"' --wait "
            f"--endpoint {connectable(settings.clients_endpoint)}"
        )
    typer.echo("\n".join(lines))


def _serve(children: Children, stop: threading.Event) -> int:
    """Wait for Ctrl-C or SIGTERM; report children that exit on their own."""
    reported: set[str] = set()
    while not stop.wait(0.5):
        for name, code in children.exited().items():
            if name in reported:
                continue
            reported.add(name)
            typer.echo(
                f"warning: {name} exited with code {code}; see its log", err=True
            )
            if name == "broker":
                return 1
    return 0


def _on_signals(stop: threading.Event) -> dict[int, Any]:
    """Make SIGINT and SIGTERM set `stop`; return the handlers they replace."""

    def record(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, record)
    return previous
