"""Settings: defaults < TOML file < HAKOBU_* env < flags; one-line errors that
name the setting and its source; worker ids that ZeroMQ can route (C04)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config import (
    BrokerSettings,
    ClientSettings,
    ConfigError,
    WorkerSettings,
    load_broker_settings,
    load_client_settings,
    load_worker_settings,
    validate_worker_id,
)
from config.settings import MAX_WORKER_ID_BYTES, replace


@pytest.fixture(autouse=True)
def _no_config_in_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run in an empty folder so no stray hakobu.toml is picked up."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


def write_toml(tmp_path: Path, text: str, name: str = "hakobu-test.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    """Return the message, checking it is a single line."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# --- precedence ------------------------------------------------------------------


def test_defaults_without_any_source() -> None:
    assert load_broker_settings(env={}) == BrokerSettings()
    assert load_client_settings(env={}) == ClientSettings()
    assert load_worker_settings(env={}, worker_id="w1") == WorkerSettings(
        worker_id="w1"
    )


def test_defaults_match_the_design() -> None:
    broker = BrokerSettings()

    assert broker.workers_endpoint == "tcp://127.0.0.1:5555"
    assert broker.clients_endpoint == "tcp://127.0.0.1:5556"
    assert ClientSettings().clients_endpoint == broker.clients_endpoint
    assert WorkerSettings().broker_endpoint == broker.workers_endpoint


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        "heartbeat_interval_s = 2.0\n"
        "liveness = 7\n"
        "ack_timeout_s = 3.0\n"
        "[broker]\n"
        "liveness = 8\n"
        "max_sends = 9\n",
    )
    env = {"HAKOBU_ACK_TIMEOUT_S": "4.5", "HAKOBU_MAX_SENDS": "11"}

    from_file = load_broker_settings(config=path, env={})
    from_env = load_broker_settings(config=path, env=env)
    from_flags = load_broker_settings(
        config=path, env=env, max_sends=12, ack_timeout_s=None
    )

    # Given only the file: top-level keys apply, the [broker] table wins.
    assert (from_file.heartbeat_interval_s, from_file.liveness) == (2.0, 8)
    assert (from_file.ack_timeout_s, from_file.max_sends) == (3.0, 9)
    # Then the environment wins over the file.
    assert (from_env.ack_timeout_s, from_env.max_sends) == (4.5, 11)
    assert from_env.liveness == 8
    # Then a flag wins over both; a flag of None is unset.
    assert (from_flags.ack_timeout_s, from_flags.max_sends) == (4.5, 12)
    assert from_flags.batch_max == BrokerSettings().batch_max


def test_role_tables_apply_to_their_role_only(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        "[broker]\nliveness = 5\n[worker]\nliveness = 6\ncapacity = 3\n"
        "[client]\nrequest_timeout_s = 0.5\n",
    )

    assert load_broker_settings(config=path, env={}).liveness == 5
    worker = load_worker_settings(config=path, env={}, worker_id="w1")
    assert (worker.liveness, worker.capacity) == (6, 3)
    assert load_client_settings(config=path, env={}).request_timeout_s == 0.5


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[client]\nrequest_retries = 0\n")

    loaded = load_client_settings(env={"HAKOBU_CONFIG": str(path)})

    assert loaded.request_retries == 0


def test_config_file_in_working_folder_is_used() -> None:
    Path("hakobu.toml").write_text("[broker]\nliveness = 4\n", encoding="utf-8")

    assert load_broker_settings(env={}).liveness == 4


def test_process_environment_is_read_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HAKOBU_LIVENESS", "6")
    monkeypatch.setenv("HAKOBU_LOG_JSON", "yes")

    loaded = load_broker_settings()

    assert (loaded.liveness, loaded.log_json) == (6, True)


def test_value_conversions() -> None:
    worker = load_worker_settings(
        env={
            "HAKOBU_WORKER_ID": "w1",
            "HAKOBU_TAGS": "gpu, big ,,",
            "HAKOBU_CAPACITY": " 4 ",
            "HAKOBU_LOG_LEVEL": "debug",
            "HAKOBU_GRACE_S": "0",
        }
    )

    assert worker.worker_id == "w1"
    assert worker.tags == ("gpu", "big")
    assert worker.capacity == 4
    assert worker.log_level == "DEBUG"
    assert worker.grace_s == 0.0
    assert load_worker_settings(env={}, worker_id="w", tags=["a", "b"]).tags == (
        "a",
        "b",
    )


def test_retention_from_every_source(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[broker]\nretention_s = 3600\nprune_batch = 50\n")
    env = {"HAKOBU_RETENTION_S": "60.5"}

    assert (BrokerSettings().retention_s, BrokerSettings().prune_batch) == (
        86400.0,
        1000,
    )
    from_file = load_broker_settings(config=path, env={})
    assert (from_file.retention_s, from_file.prune_batch) == (3600.0, 50)
    assert load_broker_settings(config=path, env=env).retention_s == 60.5
    assert load_broker_settings(config=path, env=env, retention_s=0).retention_s == 0


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        BrokerSettings().liveness = 9  # type: ignore[misc]


def test_replace_checks_ranges() -> None:
    assert replace(BrokerSettings(), liveness=4).liveness == 4
    with pytest.raises(ConfigError):
        replace(BrokerSettings(), liveness=0)


# --- bad values: one line, naming the setting and the source -----------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HAKOBU_LIVENESS", "three"),
        ("HAKOBU_LIVENESS", "3.5"),
        ("HAKOBU_LIVENESS", "0"),
        ("HAKOBU_HEARTBEAT_INTERVAL_S", "nan"),
        ("HAKOBU_HEARTBEAT_INTERVAL_S", "inf"),
        ("HAKOBU_HEARTBEAT_INTERVAL_S", "0"),
        ("HAKOBU_ACK_TIMEOUT_S", "-1"),
        ("HAKOBU_MAX_PAYLOAD_BYTES", "12"),
        ("HAKOBU_DURABILITY", "sometimes"),
        ("HAKOBU_LOG_LEVEL", "LOUD"),
        ("HAKOBU_LOG_JSON", "maybe"),
        ("HAKOBU_BATCH_MAX", ""),
        ("HAKOBU_RETENTION_S", "-1"),
        ("HAKOBU_RETENTION_S", "inf"),
        ("HAKOBU_PRUNE_BATCH", "0"),
    ],
)
def test_bad_env_value_names_setting_and_source(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_broker_settings(env={name: value})

    message = config_error(info)
    assert name.removeprefix("HAKOBU_").lower() in message
    assert name in message


@pytest.mark.parametrize(
    "line",
    [
        'heartbeat_interval_s = "fast"',
        "liveness = 3.0",
        "liveness = true",
        "max_sends = 0",
        'durability = "off"',
        "log_json = 3",
        "retention_s = -0.5",
        "prune_batch = 0",
    ],
)
def test_bad_file_value_names_setting_and_file(tmp_path: Path, line: str) -> None:
    path = write_toml(tmp_path, f"[broker]\n{line}\n")

    with pytest.raises(ConfigError) as info:
        load_broker_settings(config=path, env={})

    message = config_error(info)
    assert line.split(" = ")[0] in message
    assert str(path) in message


@pytest.mark.parametrize(
    "flags",
    [{"capacity": 0}, {"capacity": "many"}, {"grace_s": -1.0}, {"tags": 5}],
)
def test_bad_flag_value_names_setting_and_command_line(
    flags: dict[str, object],
) -> None:
    with pytest.raises(ConfigError) as info:
        load_worker_settings(env={}, worker_id="w1", **flags)

    message = config_error(info)
    assert f"invalid setting {next(iter(flags))}=" in message
    assert "from the command line" in message


def test_unknown_flag_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_broker_settings(env={}, no_such_setting=1)

    assert "no_such_setting" in config_error(info)


def test_unknown_key_in_role_table_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[broker]\nlivenes = 3\n")

    with pytest.raises(ConfigError) as info:
        load_broker_settings(config=path, env={})

    message = config_error(info)
    assert "livenes" in message and str(path) in message


@pytest.mark.parametrize("loader", [load_broker_settings, load_client_settings])
def test_unknown_table_is_refused_by_every_role(tmp_path: Path, loader: Any) -> None:
    path = write_toml(tmp_path, "[brokr]\nretention_s = -5\n")

    with pytest.raises(ConfigError) as info:
        loader(config=path, env={})

    message = config_error(info)
    assert "unknown table [brokr]" in message and str(path) in message


@pytest.mark.parametrize(
    "text", ["liveness = = 3\n", "[broker\n", "broker = 3\n", "x = 'unterminated\n"]
)
def test_malformed_file_is_refused(tmp_path: Path, text: str) -> None:
    path = write_toml(tmp_path, text)

    with pytest.raises(ConfigError) as info:
        load_broker_settings(config=path, env={})

    assert str(path) in config_error(info)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(ConfigError) as info:
        load_broker_settings(config=missing, env={})

    assert str(missing) in config_error(info)


# --- worker ids (C04) ------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(rest=st.binary(min_size=15, max_size=15))
def test_a_id_with_leading_zero_byte_is_always_refused(rest: bytes) -> None:
    raw = b"\x00" + rest

    with pytest.raises(ConfigError):
        validate_worker_id(raw)
    with pytest.raises(ConfigError):
        validate_worker_id(raw.decode("latin-1"))


@pytest.mark.parametrize("worker_id", ["x" * 256, "ü" * 128, "漢" * 86])
def test_b_id_over_255_bytes_is_refused(worker_id: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_worker_id(worker_id)

    assert str(MAX_WORKER_ID_BYTES) in config_error(info)


@pytest.mark.parametrize("worker_id", ["x" * 255, "ü" * 127, "漢" * 85])
def test_b_id_of_255_bytes_or_fewer_is_accepted(worker_id: str) -> None:
    assert validate_worker_id(worker_id) == worker_id


def test_c_id_not_text_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        validate_worker_id(b"\xff\xfe")

    assert "UTF-8" in config_error(info)


def test_d_empty_id_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        validate_worker_id("")

    assert "--id" in config_error(info)
    with pytest.raises(ConfigError):
        load_worker_settings(env={})
    with pytest.raises(ConfigError):
        load_worker_settings(env={"HAKOBU_WORKER_ID": ""})


def test_e_unicode_id_is_kept_exactly() -> None:
    assert validate_worker_id("wörker-ü") == "wörker-ü"
    assert validate_worker_id("wörker-ü".encode()) == "wörker-ü"
    assert load_worker_settings(env={}, worker_id="wörker-ü").worker_id == "wörker-ü"


@pytest.mark.parametrize("worker_id", [" w1", "w1 ", "w\n1", "w\t1", "\x7f"])
def test_whitespace_and_control_characters_are_refused(worker_id: str) -> None:
    with pytest.raises(ConfigError):
        validate_worker_id(worker_id)


@settings(max_examples=300, deadline=None)
@given(worker_id=st.text(max_size=300) | st.binary(max_size=300))
def test_worker_id_check_is_deterministic_and_routable(
    worker_id: str | bytes,
) -> None:
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(validate_worker_id(worker_id))
        except ConfigError:
            outcomes.append(None)

    assert outcomes[0] == outcomes[1]
    if outcomes[0] is not None:
        routing_id = outcomes[0].encode("utf-8")
        assert 1 <= len(routing_id) <= MAX_WORKER_ID_BYTES
        assert routing_id[0] != 0
