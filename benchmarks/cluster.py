"""The broker and worker processes the benchmarks run against: started from the
CLI on free loopback ports in their own sessions, waited for, stopped by pid.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from sdk import Client

#: How every hakobu process is started; argv follows.
CLI = [sys.executable, "-m", "broker.cli"]
#: Seconds `stop` waits after SIGTERM before SIGKILL, unless told otherwise.
STOP_GRACE_S = 5.0
#: Seconds to wait for a SIGKILLed process to be reaped.
REAP_TIMEOUT_S = 5.0
#: Lowest port `free_port` hands out.
PORT_FLOOR = 20_000
#: Set in every child's environment (and so its handlers'): which cluster it is in.
TOKEN_ENV = "HAKOBU_BENCH_CLUSTER_TOKEN"


@dataclass
class Proc:
    """One process a cluster started, with what it takes to start it again."""

    name: str
    role: str
    args: list[str]
    env: dict[str, str]
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid


class LocalCluster:
    """A broker and workers on two free 127.0.0.1 ports, with a store in `folder`.

    `env` is the base environment of every child (None: this process's own);
    the extra variables given to `start_broker`/`start_worker` go on top. Output
    of each process is appended to `<name>.log` in `folder`.
    """

    def __init__(
        self,
        folder: Path,
        *,
        db_name: str = "store.db",
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.folder = folder
        self.db = folder / db_name
        self.base_env = dict(env) if env is not None else None
        self.cwd = cwd
        self.workers_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.clients_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.broker: Proc | None = None
        self.workers: dict[str, Proc] = {}
        self.started: list[Proc] = []
        self.lock = threading.Lock()
        self.token = uuid.uuid4().hex

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return a child's environment: the base one, `extra`, this cluster's token."""
        base = os.environ if self.base_env is None else self.base_env
        return {**base, **(extra or {}), TOKEN_ENV: self.token}

    def spawn(self, name: str, role: str, args: list[str], env: dict[str, str]) -> Proc:
        """Start `args` in a new session, appending its output to `<name>.log`."""
        with self.lock, open(self.folder / f"{name}.log", "ab") as out:
            popen = subprocess.Popen(
                args,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            proc = Proc(name, role, args, env, popen)
            self.started.append(proc)
        return proc

    def start_broker(
        self, *extra_args: str, env: Mapping[str, str] | None = None
    ) -> Proc:
        """Start `hakobu broker` on this cluster's endpoints and store."""
        args = [
            *CLI,
            "broker",
            "--workers-endpoint",
            self.workers_endpoint,
            "--clients-endpoint",
            self.clients_endpoint,
            "--db",
            str(self.db),
            *extra_args,
        ]
        self.broker = self.spawn("broker", "broker", args, self.env(env))
        return self.broker

    def start_worker(
        self, worker_id: str, *extra_args: str, env: Mapping[str, str] | None = None
    ) -> Proc:
        """Start `hakobu worker --id worker_id` against this cluster's broker."""
        args = [
            *CLI,
            "worker",
            "--id",
            worker_id,
            "--broker",
            self.workers_endpoint,
            *extra_args,
        ]
        proc = self.spawn(worker_id, "worker", args, self.env(env))
        self.workers[worker_id] = proc
        return proc

    def wait_online(
        self,
        workers: Iterable[str] | int,
        timeout_s: float,
        *,
        client: Client | None = None,
        poll_s: float = 0.05,
    ) -> None:
        """Wait until the broker lists these worker ids (or this many) online.

        Asks through `client`, or a client of its own; RuntimeError on timeout.
        """
        from sdk import Client

        if client is None:
            with Client(self.clients_endpoint, request_timeout=2.0) as own:
                self.wait_online(workers, timeout_s, client=own, poll_s=poll_s)
            return
        if isinstance(workers, int):
            ids: list[str] | None = None
            count = workers
        else:
            ids = list(workers)
            count = len(ids)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            online = {w.id for w in client.workers() if w.state == "online"}
            if len(online) >= count if ids is None else online >= set(ids):
                return
            time.sleep(poll_s)
        if ids is None:
            raise RuntimeError(f"workers did not register within {timeout_s} s")
        raise RuntimeError(f"workers {ids} not all online after {timeout_s} s")

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one process by pid and reap it (bounded wait)."""
        if proc.popen.poll() is None:
            os.kill(proc.pid, sig)
        proc.popen.wait(timeout=10)

    def restart(self, proc: Proc) -> Proc:
        """Start `proc` again with the same arguments (it must have exited)."""
        new = self.spawn(proc.name, proc.role, proc.args, proc.env)
        if proc.role == "broker":
            self.broker = new
        else:
            self.workers[proc.name] = new
        return new

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM the workers, then the broker; SIGKILL what is left after grace_s.

        Also SIGKILLs what remains of their sessions (handlers of SIGKILLed
        workers): processes in one of those sessions that carry this cluster's
        token, so that a reused pid never points at someone else's process.
        """
        with self.lock:
            procs = list(self.started)
        order = [p for p in reversed(procs) if p.role != "broker"]
        order += [p for p in reversed(procs) if p.role == "broker"]
        for proc in order:
            if proc.popen.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in order:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=REAP_TIMEOUT_S)
        self._sweep({proc.pid for proc in procs})

    def _sweep(self, sessions: set[int]) -> None:
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) not in sessions:
                    continue
                if process.environ().get(TOKEN_ENV) == self.token:
                    process.kill()
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is drawn below the kernel's ephemeral range, so the outgoing
    connections of other processes cannot take it between now and the bind.
    """
    low, _ = _ephemeral_range()
    for _ in range(100):
        port = _ports.randrange(PORT_FLOOR, max(low, PORT_FLOOR + 1000))
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        # Nothing holds the port until its user binds it: never hand it out again.
        _handed_out.add(port)
        return port
    raise RuntimeError("no free TCP port below the ephemeral range")


#: Ports `free_port` returned in this process, and its own generator (tests
#: may seed the `random` module).
_handed_out: set[int] = set()
_ports = random.Random()


def _ephemeral_range() -> tuple[int, int]:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(part) for part in text.split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def clean_env(
    paths: Iterable[str | Path], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return this process's environment without HAKOBU_* settings, `paths` put
    before PYTHONPATH and `extra` set on top.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKOBU_")}
    joined = [str(p) for p in paths] + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in joined if p)
    env.update(extra or {})
    return env
