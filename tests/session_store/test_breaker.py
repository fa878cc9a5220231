"""Fail fast together: after a store failure a process answers 503 at once for the cool-down,
then one request probes the store, and the first success closes the breaker.

Against a real gunicorn and a real redis-server (SIGSTOP: the kernel accepts connections,
nothing answers), in-process against a hung redis-server, a Firestore client whose emulator is
not there, and the breaker alone on a fake clock. Figures are printed (``-s`` shows them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from pyloto_corp import Settings
from pyloto_corp.errors import SessionStoreNotAnswering, SessionStoreUnavailable
from pyloto_corp.session_store import SessionStore
from pyloto_corp.session_store.breaker import Breaker
from tests.conftest import DEPLOYED_COOKIE, SECRET, MakeApp, redis_production_env
from tests.services import Gunicorn, RedisServer, free_port

TIMEOUT = 1.0
#: Every request is answered within the store timeout plus this.
BOUND = TIMEOUT + 0.5
OPENED = "answering 503 at once"
RECOVERED = "answers again"
JSON = {"Accept": "application/json"}


@contextlib.contextmanager
def _hung(server: RedisServer) -> Iterator[None]:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def _redis_env(server: RedisServer, **extra: str) -> dict[str, str]:
    """A production app on ``server`` with TIMEOUT (1 s) store timeouts."""
    return redis_production_env(server.url, **extra)


def _timed(call: Callable[[], TestResponse]) -> tuple[TestResponse, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def _sid(response: TestResponse) -> str:
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"{DEPLOYED_COOKIE}="), cookie
    return cookie.split(";", 1)[0].split("=", 1)[1]


def _as(sid: str) -> dict[str, str]:
    return {"Cookie": f"{DEPLOYED_COOKIE}={sid}", **JSON}


def _client(app: Flask) -> FlaskClient:
    return app.test_client(use_cookies=False)


# -- 16 clients, 2 workers x 4 threads, the store hung for 10 s -----------------------------------


@dataclass
class Sample:
    started: float
    latency: float
    status: int


CLIENTS = 16
HUNG_SECONDS = 10.0


def test_sixteen_clients_against_a_hung_store_get_503s_in_time_and_recover(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each request is answered within the timeout + 0.5 s (with SESSION_STORE_COOLDOWN=0,
    requests queued behind others' timeouts waited up to 3.1 s); none is a 500; after SIGCONT
    requests succeed within the 1 s cool-down; each worker logs one opening, not one line per
    request."""
    redis = RedisServer(tmp_path)
    redis.start()
    server = Gunicorn(
        tmp_path, {**_redis_env(redis), "GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "4"}
    ).start()
    samples: list[Sample] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(index: int) -> None:
        # Two of the sixteen never send a cookie: each request writes a new session.
        cookie = None
        if index % 8 != 7:
            status, headers, _ = server.request("POST", "/session/counter")
            assert status == 200
            cookie = headers["Set-Cookie"].split(";", 1)[0]
        for n in range(100_000):
            if stop.is_set():
                return
            headers = {"Accept": "application/json"}
            if cookie is not None:
                headers["Cookie"] = cookie
            method = "POST" if n % 2 or cookie is None else "GET"
            started = time.monotonic()
            try:
                status, _, _ = server.request(method, "/session/counter", headers, timeout=15)
            except OSError:
                status = -1
            with lock:
                samples.append(Sample(started, time.monotonic() - started, status))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        with _hung(redis):
            down_at = time.monotonic()
            time.sleep(HUNG_SECONDS)
        up_at = time.monotonic()
        time.sleep(3.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        output = server.stop()
        redis.stop()

    during = [s for s in samples if down_at <= s.started < up_at]
    done_ok = sorted(s.started + s.latency for s in samples if s.status == 200)
    recovered = [t - up_at for t in done_ok if t >= up_at]
    figures: dict[str, Any] = {
        "requests": len(samples),
        "during_outage": len(during),
        "ok_200": sum(s.status == 200 for s in samples),
        "unavailable_503": sum(s.status == 503 for s in samples),
        "other": sorted({s.status for s in samples} - {200, 503}),
        "max_latency_s": round(max(s.latency for s in samples), 3),
        "p50_latency_during_outage_s": round(
            sorted(s.latency for s in during)[len(during) // 2], 3
        ),
        "recovery_s": round(recovered[0], 3) if recovered else None,
        "openings_logged": output.count(OPENED),
        "recoveries_logged": output.count(RECOVERED),
    }
    with capsys.disabled():
        print(f"\nBREAKER 16 clients, 2x4, hung {HUNG_SECONDS:g} s: {json.dumps(figures)}")
    assert {s.status for s in samples} <= {200, 503}, figures
    assert max(s.latency for s in samples) < BOUND, figures
    assert figures["unavailable_503"] > 50, figures
    assert recovered, figures
    # At most one cool-down (1 s) plus one request: usually a probe is waiting on the store.
    assert recovered[0] < 1.0 + 0.2, figures
    # After the store is back, every client's requests succeed again.
    late = [s for s in samples if s.started >= up_at + 1.5]
    assert late, figures
    assert all(s.status == 200 for s in late), figures
    # Once per opening per worker: the hung store stays one opening (failed probes keep it open).
    assert 1 <= figures["openings_logged"] <= 2, figures
    assert figures["openings_logged"] == figures["recoveries_logged"], figures
    assert "Traceback" not in output


# -- one process against a real store ------------------------------------------------------------


def _opened_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if OPENED in r.getMessage()]


def _assert_503_at_once(response: TestResponse, elapsed: float, what: str) -> None:
    assert response.status_code == 503, (what, response.status_code)
    assert elapsed < 0.2, f"{what}: 503 after {elapsed:.3f} s, not at once"
    assert response.headers["Retry-After"] == "5"
    assert "Set-Cookie" not in response.headers


def test_after_a_timeout_the_process_answers_503_at_once(
    make_app: MakeApp, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(**_redis_env(own_redis, SESSION_STORE_COOLDOWN="3"))
    breaker = SessionStore.state(app).interface.breaker
    sid = _sid(_client(app).post("/session/counter"))
    with _hung(own_redis):
        first, first_s = _timed(lambda: _client(app).get("/session/counter", headers=_as(sid)))
        assert first.status_code == 503
        assert 0.9 * TIMEOUT <= first_s < BOUND, first_s
        assert breaker.state == "open"
        for what, call in [
            ("read", lambda: _client(app).get("/session/counter", headers=_as(sid))),
            ("write", lambda: _client(app).post("/session/counter", headers=_as(sid))),
            ("new session", lambda: _client(app).post("/session/counter", headers=JSON)),
            ("logout", lambda: _client(app).delete("/session", headers=_as(sid))),
        ]:
            _assert_503_at_once(*_timed(call), what)
        # What needs nothing from the store still works: liveness, a visitor without a cookie
        # reading an empty session.
        assert _client(app).get("/healthz").status_code == 200
        anonymous, anonymous_s = _timed(lambda: _client(app).get("/session/counter"))
        assert anonymous.json == {"counter": 0}
        assert anonymous_s < 0.2
        ready, ready_s = _timed(lambda: _client(app).get("/readyz"))
    print(f"\nBREAKER in process: first 503 {first_s:.3f} s, readyz {ready_s:.3f} s")
    assert ready.status_code == 503
    assert ready_s < 0.2
    assert ready.json is not None
    assert ready.json["status"] == "unavailable"
    assert "503 at once" in ready.json["reason"]
    assert own_redis.url.split("//")[1] not in json.dumps(ready.json)
    # One line for the opening, none for the requests answered at once.
    assert len(_opened_lines(caplog)) == 1, _opened_lines(caplog)
    assert "Redis session store at" in _opened_lines(caplog)[0]


def test_a_views_own_store_calls_open_the_breaker_and_then_fail_at_once(
    make_app: MakeApp, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """ "Log out everywhere" from a view (no session cookie, so nothing read first): its
    timeout opens the breaker, logged; the next such call answers 503 at once."""
    from pyloto_corp.session_store import revoke_user_sessions, user_sessions

    app = make_app(**_redis_env(own_redis, SESSION_STORE_COOLDOWN="3"))

    @app.post("/revoke/<user>")
    def revoke(user: str) -> dict[str, int]:
        return {"ended": revoke_user_sessions(user)}

    @app.get("/sessions/<user>")
    def sessions(user: str) -> dict[str, int]:
        return {"count": len(user_sessions(user))}

    breaker = SessionStore.state(app).interface.breaker
    with _hung(own_redis):
        first, first_s = _timed(lambda: _client(app).post("/revoke/ana"))
        assert first.status_code == 503
        assert 0.9 * TIMEOUT <= first_s < BOUND, first_s
        assert breaker.state == "open"
        assert len(_opened_lines(caplog)) == 1
        _assert_503_at_once(*_timed(lambda: _client(app).get("/sessions/ana")), "listing")


def test_one_request_probes_after_the_cooldown_and_success_closes_it(
    make_app: MakeApp, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cooldown = 0.5
    app = make_app(**_redis_env(own_redis, SESSION_STORE_COOLDOWN=str(cooldown)))
    breaker = SessionStore.state(app).interface.breaker
    sid = _sid(_client(app).post("/session/counter"))
    results: dict[str, tuple[TestResponse, float]] = {}

    def probe() -> None:
        results["probe"] = _timed(lambda: _client(app).get("/session/counter", headers=_as(sid)))

    with _hung(own_redis):
        assert _client(app).get("/session/counter", headers=_as(sid)).status_code == 503
        time.sleep(cooldown + 0.1)
        assert breaker.state == "half-open"
        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(0.2)
        # The probe holds the store; everyone else is answered at once.
        _assert_503_at_once(
            *_timed(lambda: _client(app).get("/session/counter", headers=_as(sid))), "others"
        )
        prober.join(5)
        probe_response, probe_s = results["probe"]
        assert probe_response.status_code == 503
        assert 0.9 * TIMEOUT <= probe_s < BOUND
        # The failed probe starts another cool-down.
        assert breaker.state == "open"
        _assert_503_at_once(
            *_timed(lambda: _client(app).get("/session/counter", headers=_as(sid))), "again"
        )
        time.sleep(cooldown + 0.1)
        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(0.3)
    # The store came back while the probe waited on it: the probe itself succeeds.
    prober.join(5)
    probe_response, probe_s = results["probe"]
    assert probe_response.status_code == 200, probe_response.status_code
    assert probe_response.json == {"counter": 1}
    assert breaker.state == "closed"
    assert breaker.reason() is None
    assert _client(app).post("/session/counter", headers=_as(sid)).json == {"counter": 2}
    assert len(_opened_lines(caplog)) == 1
    assert sum(RECOVERED in r.getMessage() for r in caplog.records) == 1


def test_recovery_is_automatic_within_the_cooldown(
    make_app: MakeApp, own_redis: RedisServer
) -> None:
    """No probe under way when the store returns: the first request after the cool-down is
    the probe and succeeds; before it, requests are answered at once."""
    app = make_app(**_redis_env(own_redis))  # the default cool-down: 1 s
    sid = _sid(_client(app).post("/session/counter"))
    with _hung(own_redis):
        assert _client(app).get("/session/counter", headers=_as(sid)).status_code == 503
    back = time.monotonic()
    statuses = []
    for _ in range(200):
        response = _client(app).get("/session/counter", headers=_as(sid))
        statuses.append(response.status_code)
        if response.status_code == 200:
            break
        time.sleep(0.02)
    recovery = time.monotonic() - back
    print(f"\nBREAKER recovery after the store returned: {recovery:.3f} s")
    assert statuses[-1] == 200
    assert set(statuses[:-1]) <= {503}
    assert recovery < 1.0 + 0.25  # one cool-down plus one request


def test_cooldown_zero_turns_the_breaker_off(
    make_app: MakeApp, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(**_redis_env(own_redis, SESSION_STORE_COOLDOWN="0"))
    sid = _sid(_client(app).post("/session/counter"))
    with _hung(own_redis):
        for _ in range(2):
            response, elapsed = _timed(
                lambda: _client(app).get("/session/counter", headers=_as(sid))
            )
            assert response.status_code == 503
            assert elapsed >= 0.9 * TIMEOUT
    assert SessionStore.state(app).interface.breaker.state == "closed"
    # Each failure is logged, as without a breaker.
    assert sum("Redis session store at" in r.getMessage() for r in caplog.records) == 2
    assert _opened_lines(caplog) == []


def test_a_forked_worker_starts_closed(make_app: MakeApp, own_redis: RedisServer) -> None:
    """gunicorn forks workers from a preloaded app: a breaker opened before the fork (or
    its lock held by another thread then) must not carry over into the child."""
    app = make_app(**_redis_env(own_redis, SESSION_STORE_COOLDOWN="30"))
    breaker = SessionStore.state(app).interface.breaker
    sid = _sid(_client(app).post("/session/counter"))
    with _hung(own_redis):
        assert _client(app).get("/session/counter", headers=_as(sid)).status_code == 503
    assert breaker.state == "open"
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        try:
            ok = breaker.state == "closed" and _client(app).get(
                "/session/counter", headers=_as(sid)
            ).json == {"counter": 1}
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert breaker.state == "open"  # the parent's own state is untouched


def test_firestore_unreachable_fails_fast_together(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The breaker sits in the shared request path: Firestore gets it too (here its client
    points at a loopback port where nothing listens)."""
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    app = make_app(
        ENV="production",
        SESSION_STORE_BACKEND="firestore",
        FIRESTORE_PROJECT="demo-breaker",
        FIRESTORE_TIMEOUT=str(TIMEOUT),
        SECRET_KEY=SECRET,
        SESSION_STORE_COOLDOWN="5",
    )
    headers = _as("a-cookie-from-before")
    first, first_s = _timed(lambda: _client(app).get("/session/counter", headers=headers))
    second, second_s = _timed(lambda: _client(app).get("/session/counter", headers=headers))
    print(f"\nBREAKER firestore unreachable: first {first_s:.3f} s, then {second_s:.3f} s")
    assert first.status_code == 503
    assert first_s < BOUND
    _assert_503_at_once(second, second_s, "firestore")
    assert SessionStore.state(app).interface.breaker.state == "open"
    assert len(_opened_lines(caplog)) == 1
    assert "Firestore session store" in _opened_lines(caplog)[0]


# -- the setting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("0", 0.0), ("0.25", 0.25), ("60", 60.0)])
def test_cooldown_setting_accepts_zero_to_sixty(value: str, expected: float) -> None:
    settings = Settings.from_env({"SESSION_STORE_COOLDOWN": value})
    assert settings.validate() == []
    assert settings.session_store_cooldown == expected
    assert settings.redacted()["SESSION_STORE_COOLDOWN"] == expected


def test_cooldown_default_is_one_second() -> None:
    assert Settings.from_env({}).session_store_cooldown == 1.0


@pytest.mark.parametrize("value", ["-1", "60.5", "nan", "inf", "abc", ""])
def test_cooldown_setting_refuses_the_rest(value: str) -> None:
    problems = Settings.from_env({"SESSION_STORE_COOLDOWN": value}).validate()
    assert len(problems) == 1, problems
    assert problems[0].startswith("SESSION_STORE_COOLDOWN")


# -- the breaker alone, on a fake clock -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _fail(breaker: Breaker, **guard: bool) -> None:
    with pytest.raises(SessionStoreNotAnswering), breaker.guard(**guard):
        raise SessionStoreNotAnswering("store timed out")


def _refused(breaker: Breaker, **guard: bool) -> bool:
    try:
        with breaker.guard(**guard):
            return False
    except SessionStoreUnavailable:
        return True


def test_states_closed_open_half_open_closed() -> None:
    clock = Clock()
    breaker = Breaker(2.0, clock=clock)
    assert breaker.state == "closed"
    _fail(breaker)
    assert breaker.state == "open"
    clock.now += 1.9
    assert _refused(breaker)
    clock.now += 0.1
    assert breaker.state == "half-open"
    with breaker.guard():  # the probe
        assert _refused(breaker)  # one probe at a time
        assert breaker.state == "half-open"
    assert breaker.state == "closed"
    assert not _refused(breaker)


def test_a_failed_probe_starts_another_cooldown() -> None:
    clock = Clock()
    breaker = Breaker(1.0, clock=clock)
    _fail(breaker)
    clock.now += 1.0
    _fail(breaker)  # the probe fails
    assert breaker.state == "open"
    clock.now += 0.9
    assert _refused(breaker)
    clock.now += 0.1
    assert not _refused(breaker)
    assert breaker.state == "closed"


def test_a_probe_without_a_verdict_lets_the_next_request_probe() -> None:
    clock = Clock()
    breaker = Breaker(1.0, clock=clock)
    _fail(breaker)
    clock.now += 1.0
    with pytest.raises(KeyError), breaker.guard():
        raise KeyError("the view's own error")
    assert breaker.state == "half-open"
    with breaker.guard():
        pass
    assert breaker.state == "closed"


def test_a_request_already_under_way_neither_extends_nor_reopens() -> None:
    clock = Clock()
    breaker = Breaker(1.0, clock=clock)
    with breaker.guard():
        with breaker.guard():
            _fail(breaker)  # another request opens it meanwhile
        clock.now += 0.5
    # This request's success (the store answered it) closes the breaker.
    assert breaker.state == "closed"
    _fail(breaker)
    clock.now += 0.5
    _fail(breaker, admit=False)  # a straggler's failure: same outage, same cool-down
    clock.now += 0.5
    assert breaker.state == "half-open"


def test_an_error_the_store_answered_neither_opens_nor_keeps_it_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    breaker = Breaker(1.0, clock=clock)
    for _ in range(2):
        with pytest.raises(SessionStoreUnavailable), breaker.guard():
            raise SessionStoreUnavailable("OutOfMemoryError")
    assert breaker.state == "closed"
    # Logged each time: no breaker stands for it.
    assert [r.getMessage() for r in caplog.records] == ["OutOfMemoryError"] * 2
    _fail(breaker)
    clock.now += 1.0
    with pytest.raises(SessionStoreUnavailable), breaker.guard():  # the probe
        raise SessionStoreUnavailable("OutOfMemoryError")
    assert breaker.state == "closed"


def test_admit_false_is_never_refused_and_its_success_proves_nothing() -> None:
    clock = Clock()
    breaker = Breaker(1.0, clock=clock)
    _fail(breaker)
    assert not _refused(breaker, admit=False)
    assert breaker.state == "open"


def test_opens_false_keeps_a_closed_breaker_closed() -> None:
    clock = Clock()
    breaker = Breaker(1.0, clock=clock)
    _fail(breaker, opens=False)
    assert breaker.state == "closed"
    _fail(breaker)
    clock.now += 1.0
    _fail(breaker, opens=False)  # a readiness probe that failed: still open
    assert breaker.state == "open"
    clock.now += 1.0
    assert not _refused(breaker, opens=False)  # a readiness probe that succeeded closes it
    assert breaker.state == "closed"


@pytest.mark.parametrize("cooldown", [-1.0, 60.5, float("nan"), float("inf")])
def test_breaker_refuses_a_bad_cooldown(cooldown: float) -> None:
    with pytest.raises(ValueError, match="SESSION_STORE_COOLDOWN"):
        Breaker(cooldown)


def test_breaker_logs_once_per_opening(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pyloto_corp.session_store")
    clock = Clock()
    breaker = Breaker(1.0, clock=clock)
    for _ in range(3):
        _fail(breaker)
        for _ in range(5):
            assert _refused(breaker)
        clock.now += 1.0
        _fail(breaker)  # a failed probe
        clock.now += 1.0
        with breaker.guard():
            pass
    messages = [r.getMessage() for r in caplog.records]
    assert sum(OPENED in m for m in messages) == 3
    assert sum(RECOVERED in m for m in messages) == 3
    assert "5 requests were answered 503 at once" in messages[-1]
    assert len(messages) == 6
