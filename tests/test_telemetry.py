"""OpenTelemetry: spans and metrics for the store calls of a read, a write, a login, a logout,
a 409 and a 503, on redis and Firestore, recorded by the SDK's in-memory exporter and reader in a
process of their own (tests/telemetry_probe.py); none of them holds a session id, a store key,
a user id or a value."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.services import ROOT, free_port
from tests.telemetry_probe import CLOUD_TRACE_ID, TRACE_ID, USER

OUTCOMES = {"hit", "miss", "written", "refused", "gone", "busy", "unavailable", "ok", "error"}


def _probe(environ: dict[str, str], dead: dict[str, str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SESSION_", "REDIS_"))}
    env.update(environ, PYTHONPATH=str(ROOT), FLASK_SKIP_DOTENV="1")
    env.update({f"PROBE_DEAD_{key}": value for key, value in dead.items()})
    done = subprocess.run(
        [sys.executable, "-m", "tests.telemetry_probe"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.fixture(params=["redis", "firestore"])
def recorded(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    environ = dict(request.getfixturevalue(f"{request.param}_env"))
    if request.param == "redis":
        dead = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "REDIS_CONNECT_TIMEOUT": "1"}
    else:
        dead = {"FIRESTORE_EMULATOR_HOST": f"127.0.0.1:{free_port()}", "FIRESTORE_TIMEOUT": "1"}
    return request.param, _probe(environ, dead)


def test_every_request_is_answered_as_without_telemetry(recorded: tuple[str, Any]) -> None:
    _, data = recorded
    statuses = {step: value["status"] for step, value in data["steps"].items() if "status" in value}
    assert statuses == {
        "write": 200,
        "read": 200,
        "login": 200,
        "logout": 200,
        "conflict": 409,
        "replay-free": 200,
        "log": 200,
        "unavailable": 503,
    }


def test_each_store_call_is_a_client_span_with_the_database_conventions(
    recorded: tuple[str, Any],
) -> None:
    backend, data = recorded
    system = {"redis": "redis", "firestore": "gcp.firestore"}[backend]
    spans = data["spans"]
    assert spans
    for span in spans:
        attributes = span["attributes"]
        assert span["kind"] == "CLIENT"
        assert attributes["db.system.name"] == system
        assert attributes["pyloto.store.backend"] == backend
        assert span["name"] == f"{attributes['db.operation.name']} {system}"
        assert attributes["pyloto.store.outcome"] in OUTCOMES
    steps = data["steps"]
    assert f"create {system}" in steps["write"]["spans"]
    assert f"read {system}" in steps["read"]["spans"]
    assert {f"create {system}", f"retire {system}"} <= set(steps["login"]["spans"])
    assert f"retire {system}" in steps["logout"]["spans"]
    assert f"acquire {system}" in steps["conflict"]["spans"]
    first = {}
    for span in spans:  # the first of each operation (the last create is the dead store's)
        first.setdefault(span["attributes"]["db.operation.name"], span["attributes"])
    assert first["create"]["pyloto.store.outcome"] == "written"
    assert first["read"]["pyloto.store.outcome"] == "hit"
    assert first["acquire"]["pyloto.store.outcome"] in {"busy", "miss"}
    failed = [span for span in spans if span["attributes"]["pyloto.store.outcome"] == "unavailable"]
    assert failed, "the store that does not answer leaves an unavailable span"
    assert all(span["status"] == "ERROR" and span["attributes"]["error.type"] for span in failed)
    if backend == "redis":
        assert all(span["attributes"]["server.address"] == "127.0.0.1" for span in spans)


def test_store_spans_join_the_incoming_trace(recorded: tuple[str, Any]) -> None:
    _, data = recorded
    spans = data["spans"]
    write = next(span for span in spans if span["attributes"]["db.operation.name"] == "create")
    assert write["trace_id"] == TRACE_ID
    assert write["parent_span_id"] == "00f067aa0ba902b7"
    read = next(span for span in spans if span["attributes"]["db.operation.name"] == "read")
    assert read["trace_id"] == CLOUD_TRACE_ID
    assert read["parent_span_id"] == f"{1234567:016x}"


def test_log_lines_carry_the_request_trace_and_span(recorded: tuple[str, Any]) -> None:
    _, data = recorded
    assert data["steps"]["log"]["fields"] == {
        "logging.googleapis.com/trace": f"projects/probe-project/traces/{TRACE_ID}",
        "logging.googleapis.com/spanId": "00f067aa0ba902b7",
    }


def test_metrics_durations_and_answers(recorded: tuple[str, Any]) -> None:
    _, data = recorded
    points = data["points"]
    durations = [p for p in points if p["name"] == "db.client.operation.duration"]
    assert durations
    assert all(p["unit"] == "s" and p["value"] >= 1 for p in durations)
    operations = {p["attributes"]["db.operation.name"] for p in durations}
    assert {"read", "create", "retire", "acquire"} <= operations
    answers = {
        (p["attributes"]["http.response.status_code"], p["attributes"]["pyloto.reason"]): p["value"]
        for p in points
        if p["name"] == "pyloto.session_store.answers"
    }
    assert answers[(409, "idempotency_key_in_progress")] == 1
    assert answers[(503, "session_store_unavailable")] == 1


def test_no_span_or_metric_holds_an_id_a_key_or_a_value(recorded: tuple[str, Any]) -> None:
    _, data = recorded
    secrets = [USER]
    for sid in (data["steps"]["sid"], data["steps"]["login_sid"]):
        secrets += [sid, hashlib.sha256(sid.encode()).hexdigest()]
    attributes = [span["attributes"] for span in data["spans"]]
    attributes += [point["attributes"] for point in data["points"]]
    text = json.dumps(attributes) + json.dumps([span["name"] for span in data["spans"]])
    for secret in secrets:
        assert secret not in text
    assert "key-1" not in text  # idempotency keys
    assert "key-2" not in text
