"""Log formats of both processes: text, or one JSON object per line with job/attempt/host ids."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The ids a line may carry: from `extra={...}` on the call, else from log_fields() around it.
ID_FIELDS = ("job_id", "attempt", "host_id")

_fields: ContextVar[dict[str, str | int]] = ContextVar("gpuplane_log_fields", default={})  # noqa: B039 - never mutated: log_fields() sets a new dict


@contextmanager
def log_fields(**fields: str | int) -> Iterator[None]:
    """Every line logged inside (in this task and the tasks it starts) carries these ids;
    empty values are left out."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v != ""}})
    try:
        yield
    finally:
        _fields.reset(token)


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", job_id/attempt/host_id when known, "exception"
    with the traceback}: one line each, so a collector needs no multi-line parsing."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_fields.get())
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value not in (None, ""):
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
