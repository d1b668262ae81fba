"""The root of hakobu's error tree and the settings error.

They live here because `config` imports nothing else of hakobu; `sdk.errors`
builds the rest of the tree on `HakobuError` and re-exports both.
"""

from __future__ import annotations


class HakobuError(Exception):
    """Base class of every error hakobu raises on purpose."""


class ConfigError(HakobuError):
    """A setting is missing, malformed or out of range."""
