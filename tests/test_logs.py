"""Structured logs for Cloud Logging."""

from __future__ import annotations

import json
import logging
import logging.config
from collections.abc import Iterator

import pytest
from flask import Flask

from pyloto_corp.logs import logging_config


def _configure(structured: bool, project: str | None) -> None:
    logging.config.dictConfig(logging_config(structured=structured, project=project))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_with_severity_message_and_trace(capsys: pytest.CaptureFixture[str]) -> None:
    _configure(structured=True, project="demo-proj")
    app = Flask(__name__)
    headers = {"X-Cloud-Trace-Context": "105445aa7843bc8bf206b12000100000/1;o=1"}
    with app.test_request_context("/", headers=headers):
        logging.getLogger("pyloto_corp.test").warning("store slow: %s ms", 12)
    logging.getLogger("pyloto_corp.test").error("outside a request")
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first["severity"] == "WARNING"
    assert first["message"] == "store slow: 12 ms"
    assert first["logging.googleapis.com/trace"] == (
        "projects/demo-proj/traces/105445aa7843bc8bf206b12000100000"
    )
    assert second["severity"] == "ERROR"
    assert "logging.googleapis.com/trace" not in second


def test_plain_text_in_development(capsys: pytest.CaptureFixture[str]) -> None:
    _configure(structured=False, project=None)
    logging.getLogger("pyloto_corp.test").warning("hello")
    line = capsys.readouterr().out.strip()
    assert line.endswith("WARNING pyloto_corp.test: hello")
    assert not line.startswith("{")
