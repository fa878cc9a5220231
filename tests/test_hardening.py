"""Hardening: hung stores answer in time, login and logout race safely, configuration fuzzing.

Every case asserts the fixed behaviour against real services (redis-server, the Firestore
emulator); the measured times are printed (``-s`` or ``-rA`` shows them).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from email.utils import parsedate_to_datetime
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from click.testing import CliRunner
from flask import Flask, Response, flash, make_response, session
from flask.testing import FlaskClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyloto_corp import ConfigurationError, Settings, create_app
from pyloto_corp.cli import session_store_cli
from pyloto_corp.config.settings import redact_url
from pyloto_corp.errors import SessionStoreUnavailable
from pyloto_corp.records.redis.store import RedisRecords
from pyloto_corp.session_store import end_session, rotate_session_id
from pyloto_corp.session_store.base import (
    CREATED_AT,
    Changes,
    Record,
    StoreInterface,
    hashed_store_id,
)
from tests.conftest import (
    _CONFIG_VARS,
    DEPLOYED_COOKIE,
    SECRET,
    MakeApp,
    cookie_name,
    redis_production_env,
    session_cookie,
)
from tests.services import ROOT, FirestoreEmulator, RedisServer, free_port, wait_until
from tests.stored import store_session, stored_session
from tests.tls_services import write_tls_files

TIMEOUT = 1.0
#: A request against a hung store must be answered within the timeout plus this slack.
BOUND = TIMEOUT + 0.5
JSON = {"Accept": "application/json"}


# -- helpers -------------------------------------------------------------------------------------


def _session_cookie(response: Response) -> str | None:
    """The value the response sets for the session cookie (None: no session Set-Cookie)."""
    return session_cookie(response)


def _cookie_expires(response: Response) -> dt.datetime:
    for header in response.headers.getlist("Set-Cookie"):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        if DEPLOYED_COOKIE in jar:
            return parsedate_to_datetime(jar[DEPLOYED_COOKIE]["expires"])
    raise AssertionError("no session cookie")


def _as(sid: str, name: str = DEPLOYED_COOKIE) -> dict[str, str]:
    """The session cookie of a deployed app (``name``: another app's)."""
    return {"Cookie": f"{name}={sid}", **JSON}


def _client(app: Flask) -> FlaskClient:
    """A test client without a cookie jar: every request names its cookie explicitly."""
    return app.test_client(use_cookies=False)


def _login(app: Flask, user: str = "ana", sid: str | None = None) -> str:
    headers = _as(sid) if sid else JSON
    response = _client(app).post("/session/login", json={"user": user}, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    new_sid = _session_cookie(response)
    assert new_sid is not None
    return new_sid


def _counter_session(app: Flask, increments: int = 1) -> str:
    client = _client(app)
    response = client.post("/session/counter", headers=JSON)
    sid = _session_cookie(response)
    assert sid is not None
    for _ in range(increments - 1):
        assert client.post("/session/counter", headers=_as(sid)).status_code == 200
    return sid


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def _assert_fast_503(response: Response, elapsed: float, what: str) -> None:
    assert response.status_code == 503, (what, response.status_code)
    assert elapsed < BOUND, f"{what}: 503 after {elapsed:.3f} s (bound {BOUND} s)"
    # The store really was hung: the answer came from the socket timeout, not a refused connect.
    assert elapsed >= 0.9 * TIMEOUT, f"{what}: answered in {elapsed:.3f} s; was the store hung?"
    assert response.headers.get("Retry-After") == "5"
    assert _session_cookie(response) is None


# -- 1. a hung Redis answers in time -----------------------------------------------------------


@contextlib.contextmanager
def _hung(server: RedisServer) -> Iterator[None]:
    """redis-server stopped (SIGSTOP): connections are accepted by the kernel, nothing answers."""
    assert server.process is not None
    pid = server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _hung_env(server: RedisServer) -> dict[str, str]:
    return {
        "ENV": "production",
        "SESSION_STORE_BACKEND": "redis",
        "REDIS_URL": server.url,
        "SECRET_KEY": SECRET,
        "REDIS_SOCKET_TIMEOUT": str(TIMEOUT),
        "REDIS_ALLOW_PLAINTEXT_AUTH": "true",  # loopback, some with a password
    }


def _report_hung(name: str, figures: dict[str, Any]) -> None:
    print("HUNG redis:", json.dumps({"case": name, **figures}))


def test_own_redis_busy_pool(make_app: MakeApp, own_redis: RedisServer) -> None:
    app = make_app(**_hung_env(own_redis))
    sid = _counter_session(app)
    assert _client(app).get("/session/counter", headers=_as(sid)).json == {"counter": 1}
    with _hung(own_redis):
        response, elapsed = _timed(lambda: _client(app).get("/session/counter", headers=_as(sid)))
    _report_hung("busy pool", {"seconds_to_503": round(elapsed, 3)})
    _assert_fast_503(response, elapsed, "busy pool")


def test_own_redis_idle_pool(make_app: MakeApp, own_redis: RedisServer) -> None:
    """No idle-connection health check adds its own PING: the bound holds after any idle time."""
    app = make_app(**_hung_env(own_redis))
    interface = app.session_interface
    assert isinstance(interface.records, RedisRecords)
    # Whatever the idle time, no PING precedes the command (redis-py's check is off at 0).
    assert interface.records.client.connection_pool.connection_kwargs["health_check_interval"] == 0
    sid = _counter_session(app)
    idle = 3.0
    time.sleep(idle)
    with _hung(own_redis):
        response, elapsed = _timed(lambda: _client(app).get("/session/counter", headers=_as(sid)))
    _report_hung("idle pool", {"idle_s": idle, "seconds_to_503": round(elapsed, 3)})
    _assert_fast_503(response, elapsed, "idle pool")


@pytest.mark.parametrize("password", [None, "hung-pass-31415"])
def test_own_redis_fresh_app(
    make_app: MakeApp, tmp_path: Path, password: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A new instance (connect + handshake + GETEX), with and without AUTH in the handshake."""
    server = RedisServer(tmp_path, password=password)
    server.start()
    try:
        sid = _counter_session(make_app(**_hung_env(server)))
        fresh = make_app(**_hung_env(server))
        with _hung(server):
            response, elapsed = _timed(
                lambda: _client(fresh).get("/session/counter", headers=_as(sid))
            )
            written, write_elapsed = _timed(
                lambda: _client(make_app(**_hung_env(server))).post("/session/counter")
            )
    finally:
        server.stop()
    name = "fresh app, password" if password else "fresh app"
    _report_hung(
        name,
        {"seconds_to_503": round(elapsed, 3), "new_session_write_s": round(write_elapsed, 3)},
    )
    _assert_fast_503(response, elapsed, name)
    _assert_fast_503(written, write_elapsed, name + " (new session)")
    if password:
        assert password not in caplog.text


def test_own_redis_readyz(make_app: MakeApp, own_redis: RedisServer) -> None:
    app = make_app(**_hung_env(own_redis))
    assert _client(app).get("/readyz").status_code == 200
    with _hung(own_redis):
        response, elapsed = _timed(lambda: _client(app).get("/readyz"))
    _report_hung("readyz", {"seconds_to_503": round(elapsed, 3)})
    assert response.status_code == 503
    assert response.json == {"status": "unavailable", "session_store": "redis"}
    assert 0.9 * TIMEOUT <= elapsed < BOUND


def test_own_redis_cli_ping(own_redis: RedisServer) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _CONFIG_VARS}
    env.update(_hung_env(own_redis), FLASK_SKIP_DOTENV="1")
    command = [sys.executable, "-m", "pyloto_corp", "ping"]

    def ping() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
        )

    healthy, baseline = _timed(ping)
    assert healthy.returncode == 0, healthy.stderr
    with _hung(own_redis):
        result, elapsed = _timed(ping)
    _report_hung(
        "cli ping",
        {"seconds_to_exit_1": round(elapsed, 3), "healthy_run_s": round(baseline, 3)},
    )
    assert result.returncode == 1
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "TimeoutError" in lines[0]
    assert elapsed < TIMEOUT + 3


def test_own_redis_concurrent_requests_do_not_pile_up(
    make_app: MakeApp, own_redis: RedisServer
) -> None:
    app = make_app(**_hung_env(own_redis))
    sids = [_counter_session(app) for _ in range(8)]
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(sids))

    def request(sid: str) -> None:
        client = _client(app)
        barrier.wait(5)
        response, elapsed = _timed(lambda: client.get("/session/counter", headers=_as(sid)))
        with lock:
            results.append((response.status_code, elapsed))

    threads = [threading.Thread(target=request, args=(sid,)) for sid in sids]
    with _hung(own_redis):
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        wall = time.monotonic() - started
    latencies = sorted(round(elapsed, 3) for _, elapsed in results)
    _report_hung("8 concurrent", {"seconds_to_503": latencies, "wall_s": round(wall, 3)})
    assert [status for status, _ in results] == [503] * 8
    assert max(latencies) < BOUND
    assert wall < BOUND + 0.5


# -- 2. Firestore emulator stopped ---------------------------------------------------------------


def test_firestore_emulator_stopped_answers_503_in_time(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator = FirestoreEmulator()
    emulator.start()
    try:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", emulator.host)
        from google.cloud import firestore

        # A just-started emulator (a JVM) takes over a second to answer its first request.
        warm = firestore.Client(project=emulator.project)
        warm.collection("warm-up").document("x").get(timeout=30)
        warm.close()
        app = make_app(
            ENV="production",
            SESSION_STORE_BACKEND="firestore",
            FIRESTORE_PROJECT=emulator.project,
            FIRESTORE_TIMEOUT=str(TIMEOUT),
            SECRET_KEY=SECRET,
        )
        sid = _counter_session(app)
        assert _client(app).get("/session/counter", headers=_as(sid)).json == {"counter": 1}
    finally:
        emulator.stop()
    response, elapsed = _timed(lambda: _client(app).get("/session/counter", headers=_as(sid)))
    readiness, ready_elapsed = _timed(lambda: _client(app).get("/readyz"))
    figures = {"seconds_to_503": round(elapsed, 3), "readyz_s": round(ready_elapsed, 3)}
    print("FIRESTORE stopped:", json.dumps(figures))
    assert response.status_code == 503
    assert response.headers.get("Retry-After") == "5"
    assert _session_cookie(response) is None
    assert elapsed < BOUND
    assert readiness.status_code == 503
    assert ready_elapsed < BOUND


# -- 3. Firestore NotFound is a 503 -------------------------------------------------------------


def test_firestore_not_found_is_503_not_500(
    make_app: MakeApp, firestore_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The emulator creates any well-formed database on first use, so a missing database gives
    no NotFound on a get there. A real NotFound from the emulator (an update of a missing
    document) is put through the interface's mapping where it does not mean "session gone"."""
    app = make_app(**firestore_env, FIRESTORE_DATABASE="nope-db")
    interface = app.session_interface
    from pyloto_corp.records.firestore import FirestoreRecords

    assert isinstance(interface.records, FirestoreRecords)
    missing = interface.records._document("missing-" + "0" * 16)

    @app.get("/not-found-probe")
    def not_found_probe() -> dict[str, bool]:
        interface.records._call(missing.update, {"x": 1})
        return {"reached": True}

    sid = _counter_session(app)
    response = _client(app).get("/session/counter", headers=_as(sid))
    readiness = _client(app).get("/readyz")
    print(
        "FIRESTORE nope-db on the emulator:",
        json.dumps({"session": response.status_code, "readyz": readiness.status_code}),
    )
    assert response.status_code in (200, 503)  # never a 500
    assert readiness.status_code in (200, 503)

    with pytest.raises(SessionStoreUnavailable) as raised:
        interface.records._call(missing.update, {"x": 1})
    assert "'nope-db'" in str(raised.value)
    assert "NotFound" in str(raised.value)

    probe = _client(app).get("/not-found-probe", headers=JSON)
    assert probe.status_code == 503
    assert probe.json is not None
    assert probe.json["error"] == "session_store_unavailable"
    # Where it means "this session is gone" it stays NotFound (answered 409 by save_session).
    changes = Changes(set={"x": b"x"}, delete=(), whole=False)
    assert interface.records.update(missing.id, changes, timedelta(hours=1), Record({})) is False


# -- 4. logout then flash in the same request ------------------------------------------------------


def test_logout_then_flash_gets_a_new_id_and_a_slow_write_cannot_revive(
    make_app: MakeApp, redis_env: dict[str, str], redis_client: redis.Redis
) -> None:
    app = make_app(**redis_env)
    entered, release = threading.Event(), threading.Event()
    loaded: dict[str, Any] = {}

    @app.post("/logout-and-flash")
    def logout_and_flash() -> dict[str, bool]:
        end_session()
        flash("Signed out")
        session["note"] = "bye"
        return {"ok": True}

    @app.post("/slow-write")
    def slow_write() -> dict[str, Any]:
        user = loaded["user"] = session.get("user")
        entered.set()
        assert release.wait(10)
        session["late"] = 1
        return {"user": user}

    old = _login(app, "ana")
    old_key = hashed_store_id("session:", old)
    assert stored_session(app, old_key) is not None

    slow: dict[str, Response] = {}
    thread = threading.Thread(
        target=lambda: slow.update(r=_client(app).post("/slow-write", headers=_as(old)))
    )
    thread.start()
    try:
        assert entered.wait(10)
        logout = _client(app).post("/logout-and-flash", headers=_as(old))
    finally:
        release.set()
        thread.join(10)

    assert logout.status_code == 200
    new = _session_cookie(logout)
    assert new is not None
    assert new != old
    assert stored_session(app, old_key) is None
    data = stored_session(app, hashed_store_id("session:", new))
    assert data is not None
    assert "user" not in data
    assert data["note"] == "bye"
    assert data["_flashes"] == [("message", "Signed out")]

    late = slow["r"]
    assert loaded["user"] == "ana"  # the slow request had loaded the session before the logout
    assert late.status_code == 409
    assert late.json is not None
    assert late.json["error"] == "session_ended"
    assert late.json.get("user") is None
    assert _session_cookie(late) is None
    assert stored_session(app, old_key) is None
    for key in redis_client.scan_iter(count=100):
        value = stored_session(app, key.decode())  # None: a retired id's marker
        assert value is None or value.get("user") != "ana"


# -- 5. a failed login keeps the pre-login session -------------------------------------------------


def test_login_under_oom_keeps_the_pre_login_session(
    make_app: MakeApp,
    redis_env: dict[str, str],
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(**redis_env)
    sid = _counter_session(app, increments=2)
    saved = {
        name: redis_client.config_get(name)[name] for name in ("maxmemory", "maxmemory-policy")
    }
    try:
        redis_client.config_set("maxmemory-policy", "noeviction")
        redis_client.config_set("maxmemory", "1")
        response = _client(app).post("/session/login", json={"user": "ana"}, headers=_as(sid))
    finally:
        for name, value in saved.items():
            redis_client.config_set(name, value)
    assert response.status_code == 503
    assert "OutOfMemoryError" in caplog.text  # the write was refused for memory, nothing else
    assert _session_cookie(response) is None
    assert _client(app).get("/session/counter", headers=_as(sid)).json == {"counter": 2}
    assert redis_client.dbsize() == 1


def test_login_too_large_keeps_the_pre_login_session(
    make_app: MakeApp, redis_env: dict[str, str], redis_client: redis.Redis
) -> None:
    app = make_app(**redis_env, SESSION_MAX_BYTES="2048")

    @app.post("/login-with-blob")
    def login_with_blob() -> dict[str, bool]:
        rotate_session_id()
        session["user"] = "ana"
        session["blob"] = "x" * 4096
        return {"ok": True}

    sid = _counter_session(app, increments=2)
    response = _client(app).post("/login-with-blob", headers=_as(sid))
    assert response.status_code == 500
    assert response.json is not None
    assert response.json["error"] == "session_too_large"
    assert _session_cookie(response) is None
    assert _client(app).get("/session/counter", headers=_as(sid)).json == {"counter": 2}
    assert redis_client.dbsize() == 1


# -- 6. the absolute timeout restarts at login -----------------------------------------------------


@pytest.mark.parametrize(
    "age",
    [timedelta(days=6, hours=23), timedelta(days=7, seconds=-2)],
    ids=["6d23h", "7d-2s"],
)
def test_absolute_timeout_restarts_at_login(
    make_app: MakeApp, redis_env: dict[str, str], redis_client: redis.Redis, age: timedelta
) -> None:
    app = make_app(**redis_env, SESSION_PERMANENT="true")  # the cookie expires at the absolute end

    @app.post("/aged-session")
    def aged_session() -> dict[str, bool]:
        session["counter"] = 3
        session[CREATED_AT] = int(time.time() - age.total_seconds())
        return {"ok": True}

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        return {"user": session.get("user"), "counter": session.get("counter")}

    aged = _session_cookie(_client(app).post("/aged-session", headers=JSON))
    assert aged is not None
    new = _client(app).post("/session/login", json={"user": "ana"}, headers=_as(aged))
    assert new.status_code == 200
    sid = _session_cookie(new)
    assert sid is not None
    expires = _cookie_expires(new)
    expected = dt.datetime.now(dt.UTC) + timedelta(days=7)
    assert abs((expires - expected).total_seconds()) < 5
    stored = stored_session(app, hashed_store_id("session:", sid))
    assert stored is not None
    assert abs(stored[CREATED_AT] - time.time()) < 5

    time.sleep(2.5)  # past the pre-login session's absolute end in the 7d-2s case
    assert _client(app).get("/whoami", headers=_as(sid)).json == {"user": "ana", "counter": 3}


# -- 7. clock skew ---------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis", "firestore"])
def any_backend_app(request: pytest.FixtureRequest, make_app: MakeApp) -> Flask:
    if request.param == "memory":
        return make_app(ENV="test")
    return make_app(**request.getfixturevalue(f"{request.param}_env"))


def test_clock_skew_within_tolerance_is_kept_beyond_is_ignored_not_deleted(
    any_backend_app: Flask,
) -> None:
    app = any_backend_app
    interface = app.session_interface
    assert isinstance(interface, StoreInterface)

    def skewed_writer(sid: str, ahead: float) -> str:
        """What an instance whose clock runs ``ahead`` seconds fast stores."""
        store_id = interface.store_id(sid)
        data = {"_permanent": True, CREATED_AT: int(time.time() + ahead), "counter": 5}
        store_session(app, store_id, data)
        return store_id

    minute_ahead = "skew-minute-" + "a" * 32
    skewed_writer(minute_ahead, 60)
    client = _client(app)
    name = cookie_name(app)
    assert client.get("/session/counter", headers=_as(minute_ahead, name)).json == {"counter": 5}
    written = client.post("/session/counter", headers=_as(minute_ahead, name))
    assert written.json == {"counter": 6}
    assert _session_cookie(written) is None  # the browser already holds exactly this cookie

    hour_ahead = "skew-hour-" + "b" * 32
    store_id = skewed_writer(hour_ahead, 3600)
    assert client.get("/session/counter", headers=_as(hour_ahead, name)).json == {"counter": 0}
    fresh = client.post("/session/counter", headers=_as(hour_ahead, name))
    assert fresh.json == {"counter": 1}
    assert _session_cookie(fresh) not in (None, hour_ahead)
    stored = stored_session(app, store_id)
    assert stored is not None, "a session from a clock ahead of ours was deleted"
    assert stored["counter"] == 5


# -- 8. concurrent login vs a slow write: what the browser ends with -------------------------------


def test_login_during_slow_write_leaves_the_browser_logged_in(
    make_app: MakeApp, redis_env: dict[str, str], redis_client: redis.Redis
) -> None:
    app = make_app(**redis_env)
    entered, release = threading.Event(), threading.Event()

    loaded: dict[str, Any] = {}

    @app.post("/slow-late")
    def slow_late() -> Response:
        loaded["counter"] = session.get("counter")
        entered.set()
        assert release.wait(10)
        session["late"] = 1
        response = make_response({"ok": True})
        response.set_cookie("lang", "fr")
        return response

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        return {"user": session.get("user"), "late": session.get("late")}

    old = _counter_session(app)
    browser = {DEPLOYED_COOKIE: old}
    a: dict[str, Response] = {}
    thread = threading.Thread(
        target=lambda: a.update(r=_client(app).post("/slow-late", headers=_as(old)))
    )
    thread.start()
    try:
        assert entered.wait(10)
        b = _client(app).post("/session/login", json={"user": "ana"}, headers=_as(old))
    finally:
        release.set()
        thread.join(10)

    # The browser applies the responses in the order they arrive: B's, then A's.
    for response in (b, a["r"]):
        for header in response.headers.getlist("Set-Cookie"):
            jar: SimpleCookie = SimpleCookie()
            jar.load(header)
            browser.update({name: morsel.value for name, morsel in jar.items()})

    assert b.status_code == 200
    assert loaded["counter"] == 1  # A had loaded the pre-login session
    assert a["r"].status_code == 409
    assert _session_cookie(a["r"]) is None
    assert any(h.startswith("lang=fr") for h in a["r"].headers.getlist("Set-Cookie"))
    assert browser["lang"] == "fr"
    assert browser[DEPLOYED_COOKIE] == _session_cookie(b) != old
    assert _client(app).get("/whoami", headers=_as(browser[DEPLOYED_COOKIE])).json == {
        "user": "ana",
        "late": None,
    }
    assert stored_session(app, hashed_store_id("session:", old)) is None


# -- 9. configuration fuzz -------------------------------------------------------------------------

#: Printable secrets with the characters URLs and shells treat specially; the marker keeps a drawn
#: secret from matching ordinary output by chance.
SPECIALS = "/#?@%:&=+ $!'\"\\"
secret_chars = st.text(
    alphabet=string.ascii_letters + string.digits + SPECIALS, min_size=5, max_size=40
)
secret_values = secret_chars.map(lambda value: "Q7z" + value)

VALID: dict[str, list[str]] = {
    "ENV": ["production", "prod", "staging", "development", "test", "local", " Prod "],
    "SESSION_STORE_BACKEND": ["memory", "redis", "firestore", "REDIS"],
    "SESSION_COOKIE_NAME": ["session", "__Host-sid", "sid"],
    "SESSION_LIFETIME": ["3600", "12h", "30m"],
    "SESSION_ABSOLUTE_LIFETIME": ["7d", "604800", "1d"],
    "SESSION_MAX_BYTES": ["2048", "524288"],
    "FIRESTORE_COLLECTION": ["sessions", "s_1"],
    "FIRESTORE_PROJECT": ["demo-project"],
    "TRUSTED_PROXY_HOPS": ["0", "1", "5"],
    "REDIS_SOCKET_TIMEOUT": ["1", "0.5", "60"],
}
INVALID: dict[str, list[str]] = {
    "ENV": ["prodution", "", "живой"],
    "SESSION_STORE_BACKEND": ["mongo", "", "file"],
    "SESSION_COOKIE_NAME": ["my session", "a;b", "", "séance", "a=b"],
    "SESSION_LIFETIME": ["0", "-5", "3000000d", "abc", "401d", "1e400", "nan"],
    "SESSION_ABSOLUTE_LIFETIME": ["0", "-5", "3000000d", "1s", "abc"],
    "SESSION_MAX_BYTES": ["1023", "abc", "-1", "99999999999", "1e6"],
    "FIRESTORE_COLLECTION": ["", "a/b", "__x__", ".", "x" * 1501],
    "FIRESTORE_PROJECT": [""],
    "TRUSTED_PROXY_HOPS": ["6", "-1", "x"],
    "REDIS_SOCKET_TIMEOUT": ["0", "61", "nan", "inf", "-1", "abc"],
}
URL_FORMS = [
    "redis://:{pw}@127.0.0.1:6379/0",
    "rediss://default:{pw}@10.0.0.3:6378",
    "redis://user:{quoted}@cache:6379/1",
    "redis://:{pw}@cache:6379/0?socket_timeout=abc",
    "redis://:{pw}@cache:6379/0?db=zz",
    "redis://:{quoted}@cache:6379/0?socket_timeout=3600",
    "redis://:{pw}@cache:6379/zz",
    "redis://:{pw}@cache:99999/0",
    "redis://:{pw}@cache:notaport",
    "redis://:{pw}@",
    "http://:{pw}@x",
    "redis:/:{pw}@cache",
]
FUZZED = [*VALID, "SECRET_KEY", "REDIS_URL"]


@st.composite
def environments(draw: st.DrawFn) -> tuple[dict[str, str], list[str]]:
    """An environment (mostly valid values, a few variables broken) and its secrets."""
    broken = draw(st.sets(st.sampled_from(FUZZED), max_size=3))
    env: dict[str, str] = {}
    for name in VALID:
        pool = VALID[name] + (INVALID[name] if name in broken else [])
        value = draw(st.none() | st.sampled_from(pool))
        if value is not None:
            env[name] = value
    secrets: list[str] = []
    if draw(st.booleans()):
        key = draw(secret_values)
        if "SECRET_KEY" not in broken:
            key = (key * 4)[:60]
        env["SECRET_KEY"] = key
        secrets.append(key)
    if draw(st.booleans()):
        password = draw(secret_values)
        form = draw(st.sampled_from(URL_FORMS if "REDIS_URL" in broken else URL_FORMS[:3]))
        quoted = quote(password, safe="")
        env["REDIS_URL"] = form.format(pw=password, quoted=quoted)
        secrets += [password, quoted] if "{quoted}" in form else [password]
    return env, [secret for secret in secrets if len(secret) >= 8]


def test_configuration_fuzz() -> None:
    outcomes = {"valid": 0, "invalid": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(environments())
    def check(drawn: tuple[dict[str, str], list[str]]) -> None:
        env, secrets = drawn
        parsed = Settings.from_env(env)
        problems = parsed.validate()
        seen = [repr(parsed), str(parsed.redacted()), *problems]
        refused: ConfigurationError | None = None
        try:
            create_app(parsed)
        except ConfigurationError as exc:
            refused = exc
            seen += [str(exc), repr(exc.args)]
        assert (refused is None) == (not problems), (refused, problems)
        outcomes["invalid" if problems else "valid"] += 1
        event("valid" if not problems else "invalid")

        cli_env: dict[str, str | None] = {name: None for name in FUZZED}
        cli_env.update(env)
        result = CliRunner().invoke(session_store_cli, ["info", "--json"], env=cli_env)
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            result.exception
        )
        assert (result.exit_code == 0) == (not problems), result.output
        seen.append(result.output)
        if result.exit_code == 0:
            shown = json.loads(result.stdout)  # stderr may hold the random-key warning
            assert shown.pop("keyed_state") == {}  # no app loaded: no namespaces
            assert shown == json.loads(json.dumps(parsed.redacted()))
            seen.append(repr(shown))
        text = "\n".join(seen)
        for secret in secrets:
            assert secret not in text
            assert json.dumps(secret)[1:-1] not in text

    check()
    print("CONFIG fuzz:", json.dumps(outcomes))
    assert outcomes["valid"] >= 10
    assert outcomes["invalid"] >= 10


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SESSION_LIFETIME", "1000000000d"),
        ("SESSION_LIFETIME", "99999999999h"),
        ("SESSION_ABSOLUTE_LIFETIME", "99999999999d"),
        ("FIRESTORE_REFRESH_INTERVAL", "99999999999d"),
    ],
)
def test_out_of_range_durations_are_problems_not_crashes(variable: str, value: str) -> None:
    """A duration beyond what ``timedelta`` holds is a configuration problem like any other:
    ``from_env`` never raises, ``create_app`` raises ConfigurationError, the CLI says why."""
    env = {"SESSION_STORE_BACKEND": "firestore", variable: value}
    parsed = Settings.from_env(env)
    assert any(variable in problem for problem in parsed.validate())
    with pytest.raises(ConfigurationError):
        create_app(parsed)
    result = CliRunner().invoke(session_store_cli, ["check"], env=env)
    assert result.exit_code == 1
    assert variable in result.output


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        alphabet=st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S", "Zs"])
        | st.sampled_from(string.printable),
        min_size=4,
        max_size=40,
    )
)
def test_redact_url_never_shows_the_password(password: str) -> None:
    redacted = redact_url(f"redis://user:{password}@host:6379/0")
    assert redacted == "redis://***@host:6379/0"
    if password not in "redis://***@host:6379/0":
        assert password not in (redacted or "")


# -- 10. TLS failures are named --------------------------------------------------------------------


def _write_tls_files(directory: Path) -> dict[str, Path]:
    made = write_tls_files(directory)
    return {"ca": made.ca, "other_ca": made.other_ca, "cert": made.cert, "key": made.key}


TLS_PASSWORD = "tls-pass-27182818"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, dict[str, Path]]]:
    """redis-server with TLS only (the Debian build links OpenSSL), requiring a password."""
    files = _write_tls_files(tmp_path)
    port = free_port()
    args = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    args += ["--tls-cert-file", str(files["cert"]), "--tls-key-file", str(files["key"])]
    args += ["--tls-ca-cert-file", str(files["ca"]), "--tls-auth-clients", "no"]
    args += ["--requirepass", TLS_PASSWORD, "--save", "", "--appendonly", "no"]
    args += ["--dir", str(tmp_path)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        password=TLS_PASSWORD,
        ssl=True,
        ssl_ca_certs=str(files["ca"]),
        socket_timeout=1,
    )

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError("redis-server with TLS exited")
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(ready, 10, f"redis-server with TLS on port {port}")
        yield port, files
    finally:
        client.close()
        process.terminate()
        process.wait(10)


def _tls_env(url: str, **extra: str) -> dict[str, str]:
    return redis_production_env(url, **extra)


def test_tls_with_the_wrong_ca_names_the_handshake(
    make_app: MakeApp, tls_redis: tuple[int, dict[str, Path]], caplog: pytest.LogCaptureFixture
) -> None:
    port, files = tls_redis
    url = f"rediss://:{TLS_PASSWORD}@127.0.0.1:{port}/0"
    good = make_app(**_tls_env(url, REDIS_SSL_CA_CERTS=str(files["ca"])))
    assert _client(good).post("/session/counter").status_code == 200  # TLS works with its CA

    app = make_app(**_tls_env(url, REDIS_SSL_CA_CERTS=str(files["other_ca"])))
    caplog.clear()
    response = _client(app).post("/session/counter", headers=JSON)
    assert response.status_code == 503
    lines = [r.getMessage() for r in caplog.records if r.name == "pyloto_corp.session_store"]
    print("TLS wrong CA:", lines)
    assert any("TLS handshake failed" in line for line in lines), lines
    assert TLS_PASSWORD not in caplog.text


def test_tls_to_a_plain_server_names_the_handshake(
    make_app: MakeApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path, password=TLS_PASSWORD)
    server.start()
    try:
        url = f"rediss://:{TLS_PASSWORD}@127.0.0.1:{server.port}/0"
        app = make_app(**_tls_env(url))
        response, elapsed = _timed(lambda: _client(app).post("/session/counter", headers=JSON))
    finally:
        server.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "pyloto_corp.session_store"]
    print("TLS to plain server:", json.dumps({"seconds": round(elapsed, 3), "log": lines}))
    assert response.status_code == 503
    assert any("TLS handshake failed" in line for line in lines), lines
    assert TLS_PASSWORD not in caplog.text


# -- 11. login with a JSON body that is not an object ----------------------------------------------


@pytest.mark.parametrize("body", ['["ana"]', '"ana"', "null", "42", "[]"])
def test_login_with_non_object_json_is_400(make_app: MakeApp, body: str) -> None:
    app = make_app(ENV="test")
    response = _client(app).post(
        "/session/login", data=body, content_type="application/json", headers=JSON
    )
    assert response.status_code == 400
    assert _session_cookie(response) is None
