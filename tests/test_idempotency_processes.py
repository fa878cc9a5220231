"""Exactly once across processes, on the real services: @idempotent views served by real
gunicorn (2 workers x 4 threads), a worker SIGKILLed inside a view, two worker processes
claiming the same message ids, and a store that is stopped or hung (503, never a 500, never
"not seen")."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from pyloto_corp.errors import SessionStoreUnavailable
from pyloto_corp.idempotency import claim, idempotent
from tests import idempotency_worker as worker
from tests.conftest import MakeApp, redis_production_env
from tests.idempotent_app import RUNS, SHORT_LEASE
from tests.services import ROOT, FirestoreEmulator, Gunicorn, RedisServer

Answer = tuple[int, dict[str, str], bytes]


@pytest.fixture(params=["redis", "firestore"])
def environ(request: pytest.FixtureRequest, redis_server: RedisServer) -> dict[str, str]:
    """A production app on redis-server or on the Firestore emulator; either way the views'
    runs are counted on the (emptied) test redis-server."""
    request.getfixturevalue("redis_client")  # empties it
    name = "redis_env" if request.param == "redis" else "firestore_env"
    return {**request.getfixturevalue(name), "RUNS_REDIS_URL": redis_server.url}


@pytest.fixture
def server(environ: dict[str, str], tmp_path: Path) -> Iterator[Gunicorn]:
    workers = {"GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "4"}
    server = Gunicorn(tmp_path, {**environ, **workers}, app="tests.idempotent_app:create()")
    server.start()
    yield server
    server.stop()


def runs(client: redis.Redis, view: str) -> int:
    return int(client.get(RUNS + view) or 0)


def post(server: Gunicorn, path: str, key: str | None, body: Any = None) -> Answer:
    """POST ``body`` as JSON with ``key`` as the Idempotency-Key; header names lower-cased."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    try:
        connection.request("POST", path, body=json.dumps(body or {"item": 1}), headers=headers)
        response = connection.getresponse()
        answer = {name.lower(): value for name, value in response.getheaders()}
        return response.status, answer, response.read()
    finally:
        connection.close()


def at_once(count: int, send: Callable[[], Answer]) -> list[Answer]:
    """``count`` requests released together from as many threads."""
    barrier = threading.Barrier(count)
    answers: list[Answer] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            barrier.wait()
            answers.append(send())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return answers


def replayed(answer: Answer) -> bool:
    return answer[1].get("idempotent-replayed") == "true"


# -- @idempotent through gunicorn ---------------------------------------------------------------


def test_concurrent_repeats_through_gunicorn_run_the_view_once(
    server: Gunicorn, redis_client: redis.Redis
) -> None:
    """20 identical requests at once on 2 processes x 4 threads: one runs the view; every
    other gets 409 (with Retry-After) while it runs, or its response replayed once it is
    stored. Then: another payload under the key 422, no key 400."""
    answers = at_once(20, lambda: post(server, "/orders", "order-1"))
    assert runs(redis_client, "orders") == 1
    statuses = Counter(status for status, _, _ in answers)
    assert set(statuses) <= {201, 409}, statuses
    assert statuses[409] >= 1  # the view runs 0.3 s: repeats found it running
    first = [answer for answer in answers if answer[0] == 201 and not replayed(answer)]
    assert len(first) == 1
    body = first[0][2]
    assert json.loads(body)["order"] == 1
    for status, headers, content in answers:
        if status == 409:
            # The lease's remaining seconds, rounded up: 61 when this request read the clock
            # a moment before the first took its 60 s lease.
            assert 1 <= int(headers["retry-after"]) <= 61
            assert json.loads(content)["error"] == "idempotency_key_in_progress"
        elif replayed((status, headers, content)):
            assert content == body
    again = post(server, "/orders", "order-1")
    assert again[0] == 201
    assert replayed(again)
    assert again[2] == body
    assert again[1]["content-type"] == first[0][1]["content-type"]

    other = post(server, "/orders", "order-1", {"item": 2})
    assert other[0] == 422
    assert json.loads(other[2])["error"] == "idempotency_key_reused"
    missing = post(server, "/orders", None)
    assert missing[0] == 400
    assert json.loads(missing[2])["error"] == "idempotency_key_missing"
    assert runs(redis_client, "orders") == 1


def test_a_view_that_raised_runs_again_on_retry(
    server: Gunicorn, redis_client: redis.Redis
) -> None:
    assert post(server, "/fails", "pay-1")[0] == 500
    retried = post(server, "/fails", "pay-1")
    assert retried[0] == 200
    assert not replayed(retried)
    assert json.loads(retried[2]) == {"run": 2}
    again = post(server, "/fails", "pay-1")
    assert replayed(again)
    assert again[2] == retried[2]
    assert runs(redis_client, "fails") == 2


def test_a_worker_killed_inside_the_view_is_run_again_after_its_lease(
    server: Gunicorn, redis_client: redis.Redis
) -> None:
    """The process dies holding the claim (no release, no response): repeats get 409 until
    the lease runs out, then one runs the view and completes; the next is replayed."""
    killed_at = time.monotonic()
    with pytest.raises(OSError):  # the connection drops: no answer at all
        post(server, "/dies", "dies-1")
    assert runs(redis_client, "dies") == 1
    busy = post(server, "/dies", "dies-1")
    assert busy[0] == 409
    assert 1 <= int(busy[1]["retry-after"]) <= SHORT_LEASE.total_seconds()
    deadline = time.monotonic() + 15
    while (answer := post(server, "/dies", "dies-1"))[0] == 409:
        assert time.monotonic() < deadline, "the dead worker's claim was never taken over"
        time.sleep(0.2)
    assert time.monotonic() - killed_at >= SHORT_LEASE.total_seconds() - 0.1
    assert answer[0] == 200
    assert not replayed(answer)
    assert json.loads(answer[2]) == {"run": 2}
    again = post(server, "/dies", "dies-1")
    assert replayed(again)
    assert again[2] == answer[2]
    assert runs(redis_client, "dies") == 2
    assert "Worker (pid:" in server.output()  # gunicorn saw its worker die, and replaced it


# -- claim() from two processes -------------------------------------------------------------------


def test_two_processes_claiming_the_same_ids_run_each_once(
    environ: dict[str, str], tmp_path: Path, redis_client: redis.Redis, make_app: MakeApp
) -> None:
    """Two workers (two instances) take the same 50 message ids at once: each id's work
    commits once, and is completed by one of them; the other skips it. An id whose work
    failed before committing is released and run again (its work still commits once); one
    that failed after committing, before complete(), is run again too: its work commits
    twice, which is why complete() goes right after the commit."""
    count = 50
    go = tmp_path / "go"
    env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "FIRESTORE_EMULATOR_HOST")},
        **environ,
        "PYTHONPATH": str(ROOT),
        "IDEMPOTENCY_WORKER_GO": str(go),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.idempotency_worker", str(count)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(2)  # both built their app and wait
    go.touch()
    reports = []
    for process in processes:
        output, errors = process.communicate(timeout=180)
        assert process.returncode == 0, errors
        reports.append(json.loads(output))

    ids = worker.message_ids(count)
    work = {id: int(redis_client.get(worker.WORK + id) or 0) for id in ids}
    attempts = {id: int(redis_client.get(worker.ATTEMPTS + id) or 0) for id in ids}
    assert work == {id: 2 if id == worker.FAILS_AFTER else 1 for id in ids}
    twice = (worker.FAILS_BEFORE, worker.FAILS_AFTER)
    assert attempts == {id: 2 if id in twice else 1 for id in ids}
    completed = Counter(id for report in reports for id in report["done"])
    assert completed == Counter(ids)  # each id completed by exactly one process
    for report in reports:
        assert sorted(report["done"] + report["skipped"]) == sorted(ids)
        assert report["done"], reports  # both did work, at the same time:
    assert sum(report["busy"] for report in reports) >= 1, reports  # ids found held
    assert sum(report["failed"] for report in reports) == 2

    app = make_app(**{k: v for k, v in environ.items() if k != "RUNS_REDIS_URL"})
    pids = set()
    with app.app_context():
        for id in ids:
            with claim(worker.NAMESPACE, id) as job:
                assert job.completed
                pids.add(job.result["by"])
    assert len(pids) == 2


# -- store stopped or hung ------------------------------------------------------------------------

TIMEOUT = 1.0
BOUND = TIMEOUT + 0.5


def _outage_app(app: Flask) -> Flask:
    """``app`` with an @idempotent view; one key and one id completed before the outage."""
    app.testing = False  # an exception is a 500, as in production
    app.config["runs"] = 0

    @app.post("/orders")
    @idempotent()
    def orders() -> dict[str, int]:
        app.config["runs"] += 1
        return {"order": app.config["runs"]}

    @app.post("/pauses")
    @idempotent()
    def pauses() -> dict[str, int]:
        app.config["runs"] += 1
        app.config["pause"]()  # the store hangs once the work is done, before it is stored
        return {"order": app.config["runs"]}

    assert _client_post(app, "done-key").status_code == 200
    with app.app_context(), claim("wa-message", "wamid.done") as job:
        job.complete("sent")
    return app


def _client_post(app: Flask, key: str, path: str = "/orders") -> Any:
    headers = {"Idempotency-Key": key, "Accept": "application/json"}
    return app.test_client().post(path, json={"item": 1}, headers=headers)


def _claim(id: str) -> None:
    with claim("wa-message", id):
        raise AssertionError("claimed while the store is down")


def _assert_fails_closed(app: Flask) -> None:
    """Neither a new key nor a completed one runs anything: 503 with Retry-After, or
    SessionStoreUnavailable, within the store's timeout (and the margin)."""
    for key in ("new-key", "done-key"):
        started = time.monotonic()
        response = _client_post(app, key)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, (key, response.status_code)
        assert response.headers["Retry-After"] == "5"
        assert elapsed < BOUND, (key, elapsed)
    assert app.config["runs"] == 1
    with app.app_context():
        for id in ("wamid.new", "wamid.done"):
            started = time.monotonic()
            with pytest.raises(SessionStoreUnavailable) as failed:
                _claim(id)
            elapsed = time.monotonic() - started
            assert elapsed < BOUND, (id, elapsed)
            assert id not in str(failed.value)


@contextlib.contextmanager
def _paused(pid: int, *, group: bool = False) -> Iterator[None]:
    """SIGSTOP: the kernel still accepts connections, nothing answers."""
    send = os.killpg if group else os.kill
    send(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        send(pid, signal.SIGCONT)


def _recovers(app: Flask) -> None:
    time.sleep(1.1)  # the breaker's cool-down: then the store is used again
    again = _client_post(app, "done-key")
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert app.config["runs"] == 1


def _answers_after_the_view_ran(app: Flask, resume: Callable[[], None]) -> None:
    """The store hangs after the view ran, while its response is being stored: the client gets
    the view's answer, not a 503 that would have it retry (a webhook's sender does) and run the
    view again once the lease ran out. A repeat does not run it either: it finds the key in
    progress, or completed (redis-server, resumed, ran the save the client gave up on)."""
    started = time.monotonic()
    try:
        response = _client_post(app, "paused-key", "/pauses")
        elapsed = time.monotonic() - started
    finally:
        resume()
    assert response.status_code == 200
    assert response.json == {"order": 2}
    assert elapsed < BOUND
    time.sleep(1.1)  # the breaker's cool-down
    repeat = _client_post(app, "paused-key", "/pauses")
    assert repeat.status_code == 409 or repeat.headers["Idempotent-Replayed"] == "true"
    assert app.config["runs"] == 2


def test_redis_hung(make_app: MakeApp, own_redis: RedisServer) -> None:
    app = _outage_app(make_app(**redis_production_env(own_redis.url)))  # 1 s timeouts
    assert own_redis.process is not None
    with _paused(own_redis.process.pid):
        _assert_fails_closed(app)
    _recovers(app)


def test_redis_hung_after_the_view_ran(make_app: MakeApp, own_redis: RedisServer) -> None:
    app = _outage_app(make_app(**redis_production_env(own_redis.url)))
    assert own_redis.process is not None
    pid = own_redis.process.pid
    app.config["pause"] = lambda: os.kill(pid, signal.SIGSTOP)
    _answers_after_the_view_ran(app, lambda: os.kill(pid, signal.SIGCONT))


def test_redis_down(make_app: MakeApp, own_redis: RedisServer) -> None:
    app = _outage_app(make_app(**redis_production_env(own_redis.url)))
    own_redis.stop()
    _assert_fails_closed(app)


def test_firestore_hung(
    make_app: MakeApp, firestore_env: dict[str, str], firestore_emulator: FirestoreEmulator
) -> None:
    app = _outage_app(make_app(**firestore_env, FIRESTORE_TIMEOUT=str(TIMEOUT)))
    assert firestore_emulator.process is not None
    with _paused(firestore_emulator.process.pid, group=True):
        _assert_fails_closed(app)
    _recovers(app)


def test_firestore_hung_after_the_view_ran(
    make_app: MakeApp, firestore_env: dict[str, str], firestore_emulator: FirestoreEmulator
) -> None:
    app = _outage_app(make_app(**firestore_env, FIRESTORE_TIMEOUT=str(TIMEOUT)))
    assert firestore_emulator.process is not None
    group = firestore_emulator.process.pid
    app.config["pause"] = lambda: os.killpg(group, signal.SIGSTOP)
    _answers_after_the_view_ran(app, lambda: os.killpg(group, signal.SIGCONT))
