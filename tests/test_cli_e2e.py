"""The `hakobu` client commands against a real broker and worker, and `hakobu up`
with and without its demo, as real processes on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from helpers.cluster import FAST_WORKER, Cluster
from helpers.waiting import free_port, wait_until

from sdk import Client

PROJECT_DIR = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """Return this environment without HAKOBU_*, with the project importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKOBU_")}
    env["PYTHONPATH"] = str(PROJECT_DIR)
    return env


def hakobu(
    *args: str, cwd: Path, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m broker.cli ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.mark.timeout(90)
def test_client_commands_against_a_real_broker(cluster: Cluster, tmp_path: Path):
    # Given a broker and one worker
    cluster.start_broker()
    cluster.start_worker("w1", capacity=2)
    cluster.wait_workers("w1")
    at = ("--endpoint", cluster.clients_endpoint)

    # When tasks are submitted, waited for, listed and looked at
    echo = hakobu(
        "submit", "echo", "--payload", '{"a": [1, 2]}', "--wait", *at, cwd=tmp_path
    )
    failed = hakobu(
        "submit", "fail", "--payload", '"boom"', "--wait", "--json", *at, cwd=tmp_path
    )
    queued = hakobu(
        "submit",
        "sleep",
        "--payload",
        "30",
        "--prefer",
        "w1",
        "--require",
        "--json",
        *at,
        cwd=tmp_path,
    )
    task_id = json.loads(queued.stdout)["id"]
    status = hakobu("status", task_id, "--json", *at, cwd=tmp_path)
    cancel = hakobu("cancel", task_id, *at, cwd=tmp_path)
    result = hakobu("result", task_id, "--timeout", "10", *at, cwd=tmp_path)
    listed = hakobu("tasks", "--json", "--limit", "10", *at, cwd=tmp_path)
    workers = hakobu("workers", *at, cwd=tmp_path)
    missing = hakobu("status", "no-such-task", *at, cwd=tmp_path)

    # Then each prints what it says and exits with the documented code
    assert (echo.returncode, json.loads(echo.stdout)) == (0, {"a": [1, 2]})
    report = json.loads(failed.stdout)
    assert failed.returncode == 1 and report["state"] == "failed"
    assert (report["error_type"], report["error"]) == ("RuntimeError", "boom")
    assert json.loads(status.stdout)["preferred_worker"] == "w1"
    assert cancel.returncode == 0 and cancel.stdout.split() == [task_id, "cancelled"]
    assert result.returncode == 1 and "cancelled" in result.stderr
    assert task_id in {t["id"] for t in json.loads(listed.stdout)}
    assert workers.returncode == 0 and re.search(
        r"^w1\s+online\s+2", workers.stdout, re.M
    )
    assert missing.returncode == 1 and missing.stderr.startswith("error: ")


@pytest.mark.timeout(90)
def test_submit_from_file_uses_one_batch(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_broker()
    cluster.start_worker("w1", capacity=2)
    cluster.wait_workers("w1")
    lines = [
        json.dumps({"name": "echo", "payload": i, "key": f"f-{i}", "priority": i})
        for i in range(5)
    ]
    (tmp_path / "tasks.jsonl").write_text("\n".join(lines) + "\n")

    done = hakobu(
        "submit",
        "--from-file",
        "tasks.jsonl",
        "--wait",
        "--json",
        "--endpoint",
        cluster.clients_endpoint,
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["result"] for r in results] == list(range(5))


@pytest.mark.timeout(90)
def test_submit_from_file_json_prints_one_object_per_task_per_line(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Given a broker with no worker, and two tasks that can never start
    cluster.start_broker()
    lines = [
        json.dumps({"name": "echo", "key": f"j-{i}", "preferred_worker": "ghost"})
        + "\n"
        for i in range(2)
    ]
    (tmp_path / "tasks.jsonl").write_text("".join(lines))
    at = ("--endpoint", cluster.clients_endpoint)

    # When they are submitted with --json, then again with --wait that runs out
    submitted = hakobu(
        "submit", "--from-file", "tasks.jsonl", "--json", *at, cwd=tmp_path
    )
    waited = hakobu(
        "submit", "--from-file", "tasks.jsonl", "--json", "--wait",
        "--wait-timeout", "0.2", *at, cwd=tmp_path,
    )  # fmt: skip

    # Then stdout holds one JSON object per task, one per line, in file order
    assert submitted.returncode == 0, submitted.stderr
    first = [json.loads(line) for line in submitted.stdout.splitlines()]
    assert [sorted(r) for r in first] == [["created", "id"]] * 2
    assert [r["created"] for r in first] == [True, True]
    assert waited.returncode == 1
    second = [json.loads(line) for line in waited.stdout.splitlines()]
    assert [r["id"] for r in second] == [r["id"] for r in first]
    assert {r["error_type"] for r in second} == {"ResultTimeout"}


@pytest.mark.timeout(90)
def test_worker_imports_task_modules_from_its_working_folder(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Given a task package in the working folder, not on PYTHONPATH, and
    # `hakobu` started like the console script (its own folder on sys.path)
    package = cluster.dir / "myproject"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(
        "from worker import task\n\n\n"
        "@task\n"
        "def shout(payload):\n"
        "    return str(payload).upper()\n"
    )
    launcher = tmp_path / "bin" / "hakobu_script.py"
    launcher.parent.mkdir()
    launcher.write_text(
        "import sys\n\n"
        "from broker.cli import main\n\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main())\n"
    )
    cluster.start_broker()

    # When `hakobu worker --tasks myproject.tasks` runs from that folder
    args = [sys.executable, str(launcher), "worker", "--id", "w-cwd"]
    args += ["--broker", cluster.workers_endpoint, "--tasks", "myproject.tasks"]
    cluster.spawn("w-cwd", args, cluster.base_env(FAST_WORKER), "w-cwd.log")
    cluster.wait_workers("w-cwd")

    # Then its handler processes run the module's handler
    client = cluster.client()
    assert client.submit("shout", "hi").result(timeout=20) == "HI"


@pytest.mark.timeout(120)
def test_up_demo_checksums_files_and_honours_preferences(tmp_path: Path) -> None:
    # Given a folder with files, a .git folder and a __pycache__ folder
    tree = tmp_path / "tree"
    for rel in ("a.txt", "b/c.bin", "b/d.txt", "e.txt", "f.txt", "g.txt"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(os.urandom(1000) + rel.encode())
    for skipped in (".git/HEAD", "__pycache__/x.pyc"):
        (tree / skipped).parent.mkdir(exist_ok=True)
        (tree / skipped).write_text("skip me")

    # When `hakobu up --workers 2 --demo` runs over it
    done = hakobu(
        *_up_args(tmp_path, 2), "--demo", str(tree), cwd=tmp_path, timeout_s=100
    )

    # Then every file ran, pins and preferences held, nothing was lost
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted 6, succeeded 6, failed 0, lost 0" in done.stdout
    assert "preferences honoured 4/4" in done.stdout
    assert "checksums verified 6/6" in done.stdout
    assert "notifications processed 6/6" in done.stdout
    assert "HEAD" not in done.stdout and "x.pyc" not in done.stdout
    assert re.search(
        r"^b/c\.bin\s+local_002\s+\w{12}\s+requires local_002", done.stdout, re.M
    )


@pytest.mark.timeout(120)
def test_up_serves_until_sigterm_then_stops_its_children(tmp_path: Path) -> None:
    # Given `hakobu up --workers 2` serving
    args, clients = _up_args(tmp_path, 2), None
    clients = args[args.index("--clients-endpoint") + 1]
    up = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(line.startswith("serving") for line in lines), 30)
        with Client(clients, request_timeout=1.0, retries=0) as client:
            assert client.submit("echo", "hi").result(timeout=10) == "hi"
        children = [c.pid for c in psutil.Process(up.pid).children()]

        # When it gets SIGTERM
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=40)
        reader.join(10)
        output = "".join(lines)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        reader.join(10)
        up.stdout.close()

    # Then it stopped broker and workers and exited 0
    assert up.returncode == 0, output
    assert len(children) == 3
    assert not [
        pid
        for pid in children
        if psutil.pid_exists(pid)
        and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert "local_001" in output and "local_002" in output


class Up:
    """`hakobu up` serving in its own session, its output collected."""

    def __init__(self, tmp_path: Path, workers: int) -> None:
        self.args = _up_args(tmp_path, workers)
        self.clients = self.args[self.args.index("--clients-endpoint") + 1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", *self.args],
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.children: list[int] = []

    def _read(self) -> None:
        assert self.proc.stdout is not None
        self.lines.extend(self.proc.stdout)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_serving(self) -> list[int]:
        """Wait for "serving"; return the pids of the broker and the workers."""
        wait_until(
            lambda: any(line.startswith("serving") for line in self.lines),
            30,
            what=lambda: self.output,
        )
        self.children = [c.pid for c in psutil.Process(self.proc.pid).children()]
        return self.children

    def close(self) -> None:
        """Kill `up` and what is left of its children, by pid."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pid in self.children:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        self.reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def gone(pid: int) -> bool:
    """True when `pid` has exited (a zombie nobody reaped counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(90)
def test_up_takes_worker_capacity_from_the_settings_file(tmp_path: Path) -> None:
    # Given a hakobu.toml whose [worker] table sets capacity 5
    (tmp_path / "hakobu.toml").write_text("[worker]\ncapacity = 5\n")

    # When `hakobu up` starts without --capacity
    up = Up(tmp_path, 1)
    try:
        up.wait_serving()
        with Client(up.clients, request_timeout=2.0, retries=0) as client:
            workers = client.workers()
    finally:
        up.close()

    # Then the worker runs with capacity 5, and the layout says so
    assert [(w.id, w.capacity) for w in workers] == [("local_001", 5)]
    assert "capacity 5 each" in up.output


@pytest.mark.timeout(90)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_up_children_stop_when_up_is_killed(tmp_path: Path) -> None:
    # Given `hakobu up --workers 1` serving
    up = Up(tmp_path, 1)
    try:
        children = up.wait_serving()

        # When `up` is killed with SIGKILL, so it cannot stop anything itself
        os.kill(up.proc.pid, signal.SIGKILL)
        up.proc.wait(10)

        # Then the broker and the worker get SIGTERM from the kernel and exit
        wait_until(
            lambda: all(gone(pid) for pid in children),
            30,
            what=lambda: f"children {[p for p in children if not gone(p)]}",
        )
    finally:
        up.close()
    assert len(children) == 2


def _up_args(tmp_path: Path, workers: int) -> list[str]:
    return [
        "up",
        "--workers",
        str(workers),
        "--db",
        str(tmp_path / "up.db"),
        "--workers-endpoint",
        f"tcp://127.0.0.1:{free_port()}",
        "--clients-endpoint",
        f"tcp://127.0.0.1:{free_port()}",
        "--log-dir",
        str(tmp_path / "logs"),
    ]


@pytest.mark.timeout(120)
def test_bench_json_reports_every_figure(tmp_path: Path) -> None:
    # When a small benchmark runs with --json
    done = hakobu(
        "bench",
        "--tasks",
        "60",
        "--workers",
        "1",
        "--capacity",
        "2",
        "--no-ceilings",
        "--json",
        cwd=tmp_path,
        timeout_s=100,
    )

    # Then stdout holds one JSON object and nothing else, whose figures add up
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert (figures["accepted"], figures["terminal"]) == (60, 60)
    assert figures["delivery_rate"] == 1.0
    assert figures["tasks_per_s"] > 0
    for key in ("submit_to_assign_ms", "submit_to_result_ms"):
        assert set(figures[key]) >= {"p50", "p90", "p99"}
        assert figures[key]["p50"] <= figures[key]["p99"]
    assert figures["broker_rss_mb"] > 0
