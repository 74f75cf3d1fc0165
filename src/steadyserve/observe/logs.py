"""Logging setup: JSON lines (one object per event) or readable text on a terminal."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import orjson

_LINE = "_steadyserve_line"  # a record's JSON line, kept for the next handler to reuse
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", _LINE}


# the request a replica is serving: its log lines (the service's own too) carry its id
REQUEST_ID: ContextVar[str | None] = ContextVar("steadyserve_request_id", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "request_id" not in record.__dict__:
            rid = REQUEST_ID.get()
            if rid is not None:
                record.request_id = rid
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, static: dict[str, Any]) -> None:
        super().__init__()
        self.static = static

    def format(self, record: logging.LogRecord) -> str:
        cached = record.__dict__.get(_LINE)
        if cached is not None and cached[0] is self.static:  # stderr and the file: one encoding
            return str(cached[1])
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static,
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        line = orjson.dumps(out, default=str).decode()
        record.__dict__[_LINE] = (self.static, line)
        return line


class TextFormatter(logging.Formatter):
    def __init__(self, static: dict[str, Any]) -> None:
        super().__init__()
        self.prefix = " ".join(f"{v}" for v in static.values())

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _RESERVED
        )
        line = f"{stamp} {record.levelname:<7} {self.prefix + ' ' if self.prefix else ''}" \
               f"{record.getMessage()}{' ' + extras if extras else ''}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


@dataclass(frozen=True, slots=True)
class FileSink:
    """Where a process also writes its lines, as JSON (observe.logfiles)."""

    path: str
    max_bytes: int
    backups: int


def configure_logging(level: str, fmt: str, file: FileSink | None = None,
                      **static: Any) -> None:
    """Lines to stderr (JSON, or text on a terminal) and, with `file`, JSON lines to a
    rotating file that `steadyserve logs` reads back."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(static) if fmt == "json" else TextFormatter(static))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if file is not None:
        from .logfiles import LogFile

        try:
            os.makedirs(os.path.dirname(file.path) or ".", mode=0o700, exist_ok=True)
            to_file = LogFile(file.path, file.max_bytes, file.backups)
        except OSError as exc:  # the lines still reach stderr
            logging.getLogger("steadyserve.logs").warning(
                "cannot write log file %s: %s", file.path, exc)
        else:
            to_file.setFormatter(JsonFormatter(static))
            to_file.addFilter(_RequestIdFilter())
            root.handlers.append(to_file)
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
