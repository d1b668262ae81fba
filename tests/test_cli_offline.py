"""The `hakobu` command line without a broker: help, settings errors, bad input,
an unreachable broker, and how values print as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.waiting import free_port

from broker.cli_render import dumps, jsonable, table

PROJECT_DIR = Path(__file__).resolve().parents[1]


def hakobu(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 20
) -> subprocess.CompletedProcess[str]:
    """Run `python -m broker.cli ARGS` with a clean HAKOBU_* environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HAKOBU_")}
    clean["PYTHONPATH"] = str(PROJECT_DIR)
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """Return stderr, checking it is exactly one `error: ...` line."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "command, flag",
    [
        ([], "submit"),
        (["broker"], "--clients-endpoint"),
        (["worker"], "--capacity"),
        (["up"], "--demo"),
        (["submit"], "--from-file"),
        (["status"], "--endpoint"),
        (["result"], "--timeout"),
        (["cancel"], "--json"),
        (["tasks"], "--state"),
        (["workers"], "--json"),
        (["bench"], "--help"),
    ],
)
def test_every_command_has_help(tmp_path: Path, command: list[str], flag: str) -> None:
    done = hakobu(*command, "--help", cwd=tmp_path, env={"COLUMNS": "200"})

    assert done.returncode == 0, done.stderr
    assert flag in done.stdout


@pytest.mark.timeout(30)
def test_help_works_without_broker_server_or_worker(tmp_path: Path) -> None:
    # Given the broker loop and the worker package cannot be imported
    code = (
        "import sys\n"
        "sys.modules['broker.server'] = None\n"
        "sys.modules['worker'] = None\n"
        "sys.argv = ['hakobu', '--help']\n"
        "from broker.cli import main\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR), "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert done.returncode == 0, done.stderr
    assert "worker" in done.stdout and "broker" in done.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["broker", "--durability", "sometimes"], {}, "durability"),
        (["broker", "--config", "missing.toml"], {}, "missing.toml"),
        (["broker"], {"HAKOBU_LIVENESS": "0"}, "HAKOBU_LIVENESS"),
        (["worker"], {}, "worker id"),
        (["worker", "--id", " w1"], {}, "whitespace"),
        (["worker", "--id", "w1", "--capacity", "0"], {}, "capacity"),
        (["up", "--config", "missing.toml"], {}, "missing.toml"),
        (["workers"], {"HAKOBU_REQUEST_TIMEOUT_S": "soon"}, "request_timeout_s"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], needle: str
) -> None:
    done = hakobu(*args, cwd=tmp_path, env=env)

    assert done.returncode == 2
    assert needle in one_error_line(done)


@pytest.mark.timeout(60)
def test_bad_toml_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "hakobu.toml").write_text("[broker\nliveness = 3\n")

    done = hakobu("broker", cwd=tmp_path)

    assert done.returncode == 2
    assert "TOML" in one_error_line(done)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args, needle",
    [
        (["submit", "echo", "--payload", "{bad"], "--payload is not valid JSON"),
        (["submit", "echo", "--payload", '"\\ud83d"'], "surrogate"),
        (["submit", "echo", "--require"], "preferred_worker"),
        (["submit", "echo", "--retries", "-1"], "retries"),
        (["submit"], "NAME or --from-file"),
    ],
)
def test_bad_submit_input_exits_2_before_any_request(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    # No broker listens there; a request would time out, not exit 2 at once.
    endpoint = f"tcp://127.0.0.1:{free_port()}"

    done = hakobu(*args, "--endpoint", endpoint, cwd=tmp_path)

    assert done.returncode == 2
    assert needle in one_error_line(done)


@pytest.mark.timeout(60)
def test_bad_line_in_from_file_is_named(tmp_path: Path) -> None:
    lines = ['{"name": "echo", "payload": 1}', "", "[1, 2]"]
    (tmp_path / "tasks.jsonl").write_text("\n".join(lines) + "\n")

    done = hakobu("submit", "--from-file", "tasks.jsonl", cwd=tmp_path)

    assert done.returncode == 2
    assert "line 3" in one_error_line(done)


@pytest.mark.timeout(60)
def test_unreachable_broker_exits_1_naming_endpoint_and_setting(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    env = {"HAKOBU_REQUEST_TIMEOUT_S": "0.2", "HAKOBU_REQUEST_RETRIES": "1"}

    done = hakobu("workers", "--endpoint", endpoint, cwd=tmp_path, env=env)

    assert done.returncode == 1
    line = one_error_line(done)
    assert endpoint in line and "clients_endpoint" in line


@pytest.mark.timeout(60)
def test_bench_refuses_an_unknown_mode_before_starting_anything(
    tmp_path: Path,
) -> None:
    done = hakobu("bench", "--mode", "bogus", cwd=tmp_path)

    assert done.returncode == 2
    assert "choose burst or serial" in done.stderr


def test_json_output_shows_bytes_as_base64_and_keeps_shapes() -> None:
    value = {"data": b"\x00\xff", b"k": (1, 2), 7: "x", "s": "héllo 😂"}

    shown = json.loads(dumps(value))

    assert shown == {"data": "AP8=", "aw==": [1, 2], "7": "x", "s": "héllo 😂"}
    assert jsonable([b"", None, 1.5]) == ["", None, 1.5]


def test_table_aligns_columns() -> None:
    lines = table(("ID", "STATE"), [("a-long-id", "queued"), ("b", "running")])

    assert lines == ["ID         STATE", "a-long-id  queued", "b          running"]
