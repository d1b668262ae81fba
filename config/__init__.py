"""Settings for every hakobu role: defaults < TOML file < HAKOBU_* env < flags."""

from __future__ import annotations

from config.errors import ConfigError, HakobuError
from config.settings import (
    BrokerSettings,
    ClientSettings,
    WorkerSettings,
    load_broker_settings,
    load_client_settings,
    load_worker_settings,
    validate_worker_id,
)

__all__ = [
    "BrokerSettings",
    "ClientSettings",
    "ConfigError",
    "HakobuError",
    "WorkerSettings",
    "load_broker_settings",
    "load_client_settings",
    "load_worker_settings",
    "validate_worker_id",
]
