"""Logging: one line per event, as text or JSON, with the job's fields on every line.

The consumer puts the job's fields (job_id, vm_id, disk, export_name, correlation_id,
outcome) into a context variable; each job runs in its own task, so they never mix.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, Literal

#: Fields of the job being handled in this task.
job_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "job_fields", default=None
)


def bind_job(**fields: Any) -> None:
    """Adds fields to this task's job context (None values are left out)."""
    current = job_fields.get()
    merged = dict(current) if current else {}
    for key, value in fields.items():
        if value is not None:
            merged[key] = value
    job_fields.set(merged)


class JobContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job = job_fields.get() or {}
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "job", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """logging's own format, its strftime made once a second (each reuse logs a line)."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"  # default_msec_format's

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = getattr(record, "job", {})
        # Fields the message does not already carry as key=value.
        extra = [f"{k}={v}" for k, v in fields.items() if f"{k}=" not in record.message]
        return f"{text} {' '.join(extra)}" if extra else text


def setup_logging(log_format: Literal["text", "json"], level: str) -> None:
    # No format here uses the caller's file and line, thread or process: the
    # logging HOWTO's "Optimization" settings skip collecting them for every record (each
    # reuse logs a line, so this is on the hot path). stack_info=True would print nothing.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiormq logs every reconnect attempt at length; ours say what matters.
    logging.getLogger("aiormq").setLevel(logging.WARNING)
