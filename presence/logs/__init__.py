"""Structured logging: one JSON object per line (or plain text for humans)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

# Record attributes that are not fields of ours (uvicorn adds a coloured copy of messages).
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",
}


# A field's dict may have keys that are not strings (room sizes by count, say).
_OPTIONS = orjson.OPT_NON_STR_KEYS


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields passed with ``extra=``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # Fields passed with ``extra=`` become fields of the entry.
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str, option=_OPTIONS).decode()


class TextFormatter(logging.Formatter):
    """For people: the message, then the ``extra=`` fields as key=value (an access log
    line is all fields)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # before a traceback
        text = super().formatMessage(record)
        fields = _fields(record)
        if not fields:
            return text
        pairs = (
            f"{k}={orjson.dumps(v, default=str, option=_OPTIONS).decode()}"
            for k, v in fields.items()
        )
        return f"{text} {' '.join(pairs)}"


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
