"""Log sinks for the command line: one stderr sink, text for humans or JSON lines.

Libraries never call this; the `hakobu` commands do, once, at start.
"""

from __future__ import annotations

import sys
from typing import Any

from loguru import logger

#: Time, level and the event line; bound context follows as key=value fields.
TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"


def setup_logging(level: str = "INFO", json: bool = False) -> None:
    """Replace loguru's sinks with one stderr sink and re-enable the sdk logger."""
    logger.remove()
    if json:
        logger.add(sys.stderr, level=level.upper(), serialize=True, backtrace=False)
    else:
        logger.add(
            sys.stderr,
            level=level.upper(),
            format=_text_format,
            backtrace=False,
            diagnose=False,
        )
    logger.enable("sdk")


def _text_format(record: Any) -> str:
    """Return the format template for one record: its bound fields as key=value."""
    # NOTE: loguru formats the returned template with the record, so values are
    # referenced by key here, never pasted in (a brace in a value would break it).
    fields = "".join(f" {key}={{extra[{key}]}}" for key in record["extra"])
    return TEXT_FORMAT + fields + "\n{exception}"
