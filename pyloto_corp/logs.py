"""Logging for Cloud Logging: one JSON object per line with ``severity``, ``message`` and the
request's trace (and span, with OpenTelemetry), via python-json-logger; plain text in
development.

Cloud Logging links a line to its request when ``logging.googleapis.com/trace`` is
``projects/PROJECT/traces/TRACE_ID``, TRACE_ID being the part of ``X-Cloud-Trace-Context``
before the ``/``.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import has_request_context, request

from .telemetry import current_ids

TRACE_FIELD = "logging.googleapis.com/trace"
SPAN_FIELD = "logging.googleapis.com/spanId"
TRACE_HEADER = "X-Cloud-Trace-Context"


class CloudTraceFilter(logging.Filter):
    """Adds the current request's trace to records logged while it is handled."""

    def __init__(self, project: str | None = None) -> None:
        super().__init__()
        self.project = project

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.project:
            return True
        ids = current_ids()  # a span is current (OpenTelemetry configured): its trace
        if ids is not None:
            setattr(record, TRACE_FIELD, f"projects/{self.project}/traces/{ids[0]}")
            setattr(record, SPAN_FIELD, ids[1])
        elif has_request_context():
            header = request.headers.get(TRACE_HEADER, "")
            trace_id = header.split("/", 1)[0].strip()
            if trace_id.isalnum():
                setattr(record, TRACE_FIELD, f"projects/{self.project}/traces/{trace_id}")
        return True


def logging_config(*, structured: bool, project: str | None, level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` mapping (gunicorn's ``logconfig_dict`` takes it as is)."""
    formatter: dict[str, Any]
    if structured:
        formatter = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(levelname)s %(message)s %(name)s",
            "rename_fields": {"levelname": "severity", "name": "logger"},
        }
    else:
        formatter = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "filters": ["trace"],
        "stream": "ext://sys.stdout",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"trace": {"()": CloudTraceFilter, "project": project}},
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "root": {"level": level, "handlers": ["default"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["default"], "propagate": False},
            "gunicorn.access": {"level": level, "handlers": ["default"], "propagate": False},
        },
    }
