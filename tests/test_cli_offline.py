"""The `hakobu` command line without a broker: help, settings errors, bad input,
an unreachable broker, and how values print as JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.waiting import free_port

from broker.cli import working_folder_on_path
from broker.cli_render import dumps, jsonable, table
from broker.cli_up import _worker_args, die_with_parent
from config.settings import BrokerSettings

PROJECT_DIR = Path(__file__).resolve().parents[1]


def hakobu(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 20,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m broker.cli ARGS` with a clean HAKOBU_* environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HAKOBU_")}
    clean["PYTHONPATH"] = str(PROJECT_DIR)
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        input=stdin if stdin is not None else b"",
        timeout=timeout_s,
    )
    return subprocess.CompletedProcess(
        done.args,
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


def help_text(*command: str, cwd: Path) -> str:
    """Return a command's --help with the box drawing and wrapping undone."""
    done = hakobu(*command, "--help", cwd=cwd, env={"COLUMNS": "120"})
    assert done.returncode == 0, done.stderr
    return " ".join(re.sub("[│╭╮╰╯─]", " ", done.stdout).split())


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
        # `up` reads the worker settings too: HAKOBU_CAPACITY is not hidden.
        (["up"], {"HAKOBU_CAPACITY": "0"}, "HAKOBU_CAPACITY"),
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
@pytest.mark.parametrize(
    "content, needle",
    [
        # Not UTF-8 on line 2 (Latin-1 text).
        (b'{"name": "echo"}\n{"name": "echo", "payload": "caf\xe9"}\n', "line 2"),
        # CRLF lines and a blank line: a bad keyword value on line 3.
        (b'{"name": "echo"}\r\n\r\n{"name": "echo", "priority": "hi"}\r\n', "line 3"),
        # An unknown keyword on line 2.
        (b'{"name": "echo"}\n{"name": "echo", "colour": "red"}\n', "line 2"),
        # A lone surrogate in a payload on line 1, after a byte order mark.
        (b'\xef\xbb\xbf{"name": "echo", "payload": "\\ud83d"}\n', "line 1"),
        # JSON nested too deeply for the parser.
        (b"[" * 100_000 + b"\n", "line 1"),
    ],
)
def test_from_file_bad_content_names_file_and_line(
    tmp_path: Path, content: bytes, needle: str
) -> None:
    (tmp_path / "tasks.jsonl").write_bytes(content)
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens: exit 2 first

    from_file = hakobu(
        "submit", "--from-file", "tasks.jsonl", "--endpoint", endpoint, cwd=tmp_path
    )
    from_stdin = hakobu(
        "submit",
        "--from-file",
        "-",
        "--endpoint",
        endpoint,
        cwd=tmp_path,
        stdin=content,
    )

    assert from_file.returncode == 2
    line = one_error_line(from_file)
    assert "tasks.jsonl" in line and needle in line
    assert from_stdin.returncode == 2
    assert f"stdin {needle}" in one_error_line(from_stdin)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args, needle",
    [
        (["result", "some-id", "--timeout", "-1"], "--timeout must be"),
        (["result", "some-id", "--timeout", "nan"], "--timeout must be"),
        (["submit", "echo", "--delay", "-0.5"], "--delay must be"),
        (["submit", "echo", "--fallback-after", "-3"], "--fallback-after must be"),
        (["submit", "echo", "--start-deadline", "-inf"], "--start-deadline must"),
        (["submit", "echo", "--wait", "--wait-timeout", "-1"], "--wait-timeout"),
        (["submit", "echo", "--timeout", "-1"], "--timeout must be"),
        (["submit", "echo", "--timeout", "4e8"], "10 years"),
        (["submit", "echo", "--priority", "1000001"], "-1000000 to 1000000"),
    ],
)
def test_negative_or_out_of_range_durations_exit_2_before_any_request(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there

    done = hakobu(*args, "--endpoint", endpoint, cwd=tmp_path)

    assert done.returncode == 2
    assert needle in one_error_line(done)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "module, source, reason",
    [
        ("no_such_pkg.tasks", None, "ModuleNotFoundError: No module named"),
        (
            "broken_tasks",
            'raise RuntimeError("two\\nlines")\n',
            "RuntimeError: two lines",
        ),
        ("typo_tasks", "def f(:\n", "SyntaxError"),
    ],
)
def test_worker_with_unimportable_task_module_prints_one_line_and_exits_2(
    tmp_path: Path, module: str, source: str | None, reason: str
) -> None:
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)

    done = hakobu("worker", "--id", "w1", "--tasks", module, cwd=tmp_path)

    assert done.returncode == 2
    line = one_error_line(done)
    assert line.startswith(f"error: cannot import task module {module!r}: {reason}")
    assert line.endswith("(is it on PYTHONPATH? run from its folder with PYTHONPATH=.)")
    assert "Traceback" not in done.stderr + done.stdout


def test_worker_puts_the_working_folder_first_on_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["/somewhere/else"])

    working_folder_on_path()
    working_folder_on_path()

    assert sys.path == [os.getcwd(), "/somewhere/else"]


def test_up_passes_capacity_to_workers_only_when_given() -> None:
    settings = BrokerSettings(workers_endpoint="tcp://*:7001")

    unset = _worker_args(settings, "local_001", None, ("m",), None)
    given = _worker_args(settings, "local_001", 3, (), Path("h.toml"))

    assert "--capacity" not in unset
    assert unset == [
        "worker", "--id", "local_001", "--broker", "tcp://127.0.0.1:7001",
        "--tasks", "m",
    ]  # fmt: skip
    assert given[given.index("--capacity") + 1] == "3"
    assert given[-2:] == ["--config", "h.toml"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_up_children_get_a_parent_death_signal(tmp_path: Path) -> None:
    # PR_GET_PDEATHSIG is 2; the child prints what prctl reports for itself.
    probe = (
        "import ctypes, signal\n"
        "out = ctypes.c_int(0)\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(out), 0, 0, 0)\n"
        "print(signal.Signals(out.value).name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        preexec_fn=die_with_parent(),
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert done.stdout.strip() == "SIGTERM", done.stderr


@pytest.mark.timeout(60)
def test_help_texts_say_what_the_commands_do(tmp_path: Path) -> None:
    bench = help_text("bench", cwd=tmp_path)
    submit = help_text("submit", cwd=tmp_path)
    tasks = help_text("tasks", cwd=tmp_path)
    up = help_text("up", cwd=tmp_path)

    assert 'pip install -e ".[plot]"' in bench
    assert "stdout holds only that object; progress and notes go to stderr" in bench
    assert "JSON lines: one object per task, on its own line" in submit
    assert "results are omitted (null)" in tasks
    assert "HAKOBU_CAPACITY, else 1" in up


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
