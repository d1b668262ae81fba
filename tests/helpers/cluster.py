"""Run a real broker and real workers as processes, and stop them by pid.

Each process is started from the CLI (`python -m broker.cli ...`) in its own
session, with output to a log file under the test's folder, fast test timing
in its environment and the probe handlers on its PYTHONPATH. Teardown sends
SIGTERM, then SIGKILL, to every process started here and to what is left of
their sessions, always by pid and with bounded waits.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from helpers.ledger import LEDGER_ENV, Ledger
from helpers.waiting import free_port, wait_until

TESTS_DIR = Path(__file__).resolve().parent.parent
PROJECT_DIR = TESTS_DIR.parent
TASKS_DIR = TESTS_DIR / "tasks"
#: How every hakobu process is started; argv follows.
CLI = [sys.executable, "-m", "broker.cli"]
#: Timing of CASES.md: H = 0.5 s, L = 3 (lost after ~1.5 s), R = 2 s.
FAST_TIMING = {
    "HAKOBU_HEARTBEAT_INTERVAL_S": "0.5",
    "HAKOBU_LIVENESS": "3",
    "HAKOBU_ACK_TIMEOUT_S": "2",
}
#: Worker-only settings that keep reconnects and shutdown quick in tests.
FAST_WORKER = {
    "HAKOBU_RECONNECT_MIN_S": "0.05",
    "HAKOBU_RECONNECT_MAX_S": "0.5",
    "HAKOBU_GRACE_S": "3",
}
#: Seconds teardown waits after SIGTERM before SIGKILL.
STOP_GRACE_S = 5.0
#: Longest ipc:// path ZeroMQ accepts is about 107 bytes.
MAX_IPC_PATH = 90


@dataclass
class Proc:
    """One process the cluster started."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        """Whether the process has not exited yet."""
        return self.popen.poll() is None

    def wait(self, timeout_s: float) -> int:
        """Wait for exit and return the exit code; AssertionError on timeout."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running after {timeout_s} s"
            ) from None

    def log_text(self) -> str:
        """Return everything the process wrote so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


class Cluster:
    """Processes of one test: a broker, workers and scripts, plus clients."""

    def __init__(self, workdir: Path, ledger: Ledger) -> None:
        self.dir = workdir
        self.ledger = ledger
        self.db_path = workdir / "store.db"
        self.workers_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.clients_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.broker: Proc | None = None
        self.workers: dict[str, Proc] = {}
        self.procs: list[Proc] = []
        self._clients: list[Any] = []
        self._tempdirs: list[Path] = []

    # --- endpoints and environment ------------------------------------------

    def use_ipc(self) -> None:
        """Switch both endpoints to ipc:// sockets; call before starting anything."""
        base = self.dir
        if len(str(base)) > MAX_IPC_PATH - 16:
            base = Path(tempfile.mkdtemp(prefix="hkb-"))
            self._tempdirs.append(base)
        self.workers_endpoint = f"ipc://{base}/workers.sock"
        self.clients_endpoint = f"ipc://{base}/clients.sock"

    def base_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Return this process's environment, HAKOBU_* cleared, fast timing set."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAKOBU_")}
        paths = [str(TASKS_DIR), str(PROJECT_DIR)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(FAST_TIMING)
        env[LEDGER_ENV] = str(self.ledger.path)
        env.update(extra or {})
        return env

    # --- starting processes -------------------------------------------------

    def spawn(
        self, name: str, args: list[str], env: dict[str, str], log_name: str
    ) -> Proc:
        """Start `args` in a new session, appending output to `log_name`."""
        log_path = self.dir / log_name
        with open(log_path, "ab") as out:
            header = f"=== start {name}: {' '.join(args)}\n"
            out.write(header.encode("utf-8", "backslashreplace"))
            out.flush()
            popen = subprocess.Popen(
                args,
                cwd=self.dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, args, env, log_path, popen)
        self.procs.append(proc)
        return proc

    def start_broker(self, *flags: str, env: dict[str, str] | None = None) -> Proc:
        """Start `hakobu broker` on this cluster's endpoints and store."""
        args = [
            *CLI,
            "broker",
            "--workers-endpoint",
            self.workers_endpoint,
            "--clients-endpoint",
            self.clients_endpoint,
            "--db",
            str(self.db_path),
            *flags,
        ]
        self.broker = self.spawn("broker", args, self.base_env(env), "broker.log")
        return self.broker

    def start_worker(
        self,
        worker_id: str,
        capacity: int = 2,
        tags: tuple[str, ...] | list[str] = (),
        *flags: str,
        env: dict[str, str] | None = None,
        log_name: str | None = None,
    ) -> Proc:
        """Start `hakobu worker --id worker_id` with the probe handlers loaded."""
        args = [
            *CLI,
            "worker",
            "--id",
            worker_id,
            "--broker",
            self.workers_endpoint,
            "--capacity",
            str(capacity),
            "--tasks",
            "probe_tasks",
        ]
        for tag in tags:
            args += ["--tag", tag]
        args += list(flags)
        worker_env = self.base_env({**FAST_WORKER, **(env or {})})
        log_name = log_name or f"worker-{_safe(worker_id)}.log"
        proc = self.spawn(worker_id, args, worker_env, log_name)
        self.workers[worker_id] = proc
        return proc

    def start_script(
        self, name: str, code: str, *argv: str, env: dict[str, str] | None = None
    ) -> Proc:
        """Run `python -c code argv...` with the cluster's environment."""
        args = [sys.executable, "-c", code, *argv]
        return self.spawn(name, args, self.base_env(env), f"{_safe(name)}.log")

    def restart(self, proc: Proc) -> Proc:
        """SIGKILL `proc` if it still runs and start it again with the same args."""
        if proc.is_alive():
            self.kill(proc)
        log_name = proc.log_path.name
        new = self.spawn(proc.name, proc.args, proc.env, log_name)
        if proc is self.broker:
            self.broker = new
        elif self.workers.get(proc.name) is proc:
            self.workers[proc.name] = new
        return new

    # --- signals --------------------------------------------------------------

    def send_signal(self, proc: Proc, sig: int) -> None:
        """Send `sig` to `proc` by pid if it has not exited."""
        if proc.is_alive():
            os.kill(proc.pid, sig)

    def kill(
        self, proc: Proc, sig: int = signal.SIGKILL, timeout_s: float = 10.0
    ) -> int:
        """Send `sig` and wait for exit; return the exit code."""
        self.send_signal(proc, sig)
        return proc.wait(timeout_s)

    # --- clients and state ---------------------------------------------------

    def cli(self, *args: str, timeout_s: float = 30.0) -> Any:
        """Run `hakobu ARGS --endpoint <clients endpoint>`; return what it did."""
        return subprocess.run(
            [*CLI, *args, "--endpoint", self.clients_endpoint],
            cwd=self.dir,
            env=self.base_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def client(self, request_timeout: float = 5.0, **kwargs: Any) -> Any:
        """Return an `sdk.Client` on the clients endpoint, closed at teardown."""
        from sdk import Client

        client = Client(
            self.clients_endpoint, request_timeout=request_timeout, **kwargs
        )
        self._clients.append(client)
        return client

    def wait_workers(
        self, *worker_ids: str, timeout_s: float = 15.0, state: str = "online"
    ) -> None:
        """Wait until `workers()` lists every id in `state`."""
        client = self.client()

        def ready() -> bool:
            seen = {w.id: w.state for w in client.workers()}
            return all(seen.get(w) == state for w in worker_ids)

        wait_until(ready, timeout_s, 0.05, what=lambda: self.describe_workers(client))

    def describe_workers(self, client: Any) -> str:
        """Return the worker list as the broker reports it, for failure messages."""
        try:
            return repr([(w.id, w.state, w.in_flight) for w in client.workers()])
        except Exception as exc:  # the broker may be the thing that is broken
            return f"workers() failed: {exc!r}"

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one read-only statement on the broker's store file."""
        db = sqlite3.connect(self.db_path, timeout=5.0)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def notifications(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """Return `worker_notifications` rows as dicts, of one task if given."""
        db = sqlite3.connect(self.db_path, timeout=5.0)
        db.row_factory = sqlite3.Row
        try:
            sql = "select * from worker_notifications"
            if task_id is None:
                rows = db.execute(sql + " order by id").fetchall()
            else:
                rows = db.execute(sql + " where task_id = ? order by id", (task_id,))
                rows = rows.fetchall()
            return [dict(row) for row in rows]
        finally:
            db.close()

    def logs(self) -> str:
        """Return the text of every log file, for searching all output at once."""
        return "\n".join(
            p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(self.dir.glob("*.log"))
        )

    def tail(self, lines: int = 40) -> str:
        """Return the last lines of every log file, headed by its name."""
        parts = []
        for path in sorted(self.dir.glob("*.log")):
            text = path.read_text(encoding="utf-8", errors="replace").splitlines()
            parts.append(f"--- {path.name} (last {lines} lines)")
            parts.extend(text[-lines:])
        return "\n".join(parts)

    # --- teardown ---------------------------------------------------------------

    def close_clients(self) -> None:
        """Close every client made by `client()`."""
        for client in self._clients:
            try:
                client.close()
            except Exception:  # teardown goes on whatever one client does
                pass
        self._clients.clear()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process started here and its session."""
        self.close_clients()
        for proc in self.procs:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                _send(proc.pid, sig, proc)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _send(proc.pid, signal.SIGKILL, proc)
                proc.popen.wait(timeout=5.0)
        # Handler processes may outlive a killed worker; they stay in its session.
        for pid in _session_members({proc.pid for proc in self.procs}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for tempdir in self._tempdirs:
            for path in tempdir.glob("*"):
                path.unlink(missing_ok=True)
            tempdir.rmdir()


def _send(pid: int, sig: int, proc: Proc) -> None:
    if proc.popen.poll() is None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _session_members(session_ids: set[int]) -> list[int]:
    """Return pids whose session is one of `session_ids` (sessions we started)."""
    members = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in session_ids:
                members.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]
