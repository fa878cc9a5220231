"""Concurrent requests of one session that change different keys all land (real gunicorn)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import SECRET
from tests.merge_app import REQUESTS, THREADS, concurrent_writers
from tests.services import FirestoreEmulator, Gunicorn, RedisServer


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    started: list[Gunicorn] = []

    def start(app: str, **environ: str) -> Gunicorn:
        server = Gunicorn(tmp_path, environ, app=app)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def _report(name: str, statuses: list[int], kept: int) -> None:
    lost = THREADS * REQUESTS - kept
    summary = {"requests": len(statuses), "ok_200": statuses.count(200), "keys_lost": lost}
    print(f"LOST UPDATES {name}:", json.dumps(summary))


def test_redis_keeps_every_concurrent_change_flask_session_loses_some(
    serve: Callable[..., Gunicorn], redis_server: RedisServer, redis_client: object
) -> None:
    env = {"REDIS_URL": redis_server.url, "SECRET_KEY": SECRET}
    workers = {"GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "4"}
    ours = serve(
        "tests.merge_app:ours()",
        ENV="production",
        SESSION_STORE_BACKEND="redis",
        **env,
        **workers,
    )
    statuses, kept = concurrent_writers(ours.port)
    _report("ours redis", statuses, kept)
    assert statuses == [200] * THREADS * REQUESTS
    assert kept == THREADS * REQUESTS

    theirs = serve("tests.merge_app:flask_session_defaults()", **env, **workers)
    statuses, kept = concurrent_writers(theirs.port)
    _report("Flask-Session 0.8 defaults", statuses, kept)
    assert statuses == [200] * THREADS * REQUESTS
    assert kept < THREADS * REQUESTS  # the last write wins: the others' keys are gone


def test_firestore_keeps_every_concurrent_change(
    serve: Callable[..., Gunicorn],
    firestore_env: dict[str, str],
    firestore_emulator: FirestoreEmulator,
) -> None:
    server = serve(
        "tests.merge_app:ours()",
        **firestore_env,
        FIRESTORE_EMULATOR_HOST=firestore_emulator.host,
        GUNICORN_WORKERS="2",
        GUNICORN_THREADS="4",
    )
    statuses, kept = concurrent_writers(server.port)
    _report("ours firestore", statuses, kept)
    assert statuses == [200] * THREADS * REQUESTS
    assert kept == THREADS * REQUESTS


def test_memory_keeps_every_concurrent_change_in_its_process(
    serve: Callable[..., Gunicorn],
) -> None:
    server = serve(
        "tests.merge_app:ours()", ENV="development", GUNICORN_WORKERS="1", GUNICORN_THREADS="8"
    )
    statuses, kept = concurrent_writers(server.port)
    _report("ours memory", statuses, kept)
    assert statuses == [200] * THREADS * REQUESTS
    assert kept == THREADS * REQUESTS
