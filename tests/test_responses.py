"""What our responses tell caches and browsers: answers that depend on a session stay private,
one that sets or deletes the session cookie is never stored, our error answers are never stored
nor sniffed, and their bodies say nothing of limits, backends or the session's key names.

Against the memory store, a real redis-server and the Firestore emulator; the 503 paths against
a redis and a Firestore client whose address has nothing listening.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from flask import Flask, Response, make_response, session
from werkzeug.test import TestResponse

from pyloto_corp.session_store import SessionStore
from tests.conftest import SECRET, MakeApp, cookie_name, session_cookie
from tests.services import RedisServer, free_port

JSON = {"Accept": "application/json"}
BACKENDS = ("memory", "redis", "firestore")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _make(make_app: MakeApp, request: pytest.FixtureRequest, backend: str, **extra: str) -> Flask:
    if backend == "memory":
        return make_app(ENV="test", **extra)
    env: dict[str, str] = request.getfixturevalue(f"{backend}_env")
    return make_app(**env, **extra)


def _sid(response: TestResponse) -> str:
    cookie = _session_cookie(response)
    assert cookie, response.headers
    return cookie


def _session_cookie(response: TestResponse) -> str | None:
    return session_cookie(response)


def _as(app: Flask, sid: str) -> dict[str, str]:
    return {"Cookie": f"{cookie_name(app)}={sid}", **JSON}


def _directives(response: TestResponse) -> set[str]:
    header = response.headers.get("Cache-Control", "")
    return {part.strip() for part in header.split(",") if part.strip()}


def _assert_error_headers(response: TestResponse, status: int) -> None:
    assert response.status_code == status, response.status_code
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert _session_cookie(response) is None


@pytest.fixture
def app(make_app: MakeApp, request: pytest.FixtureRequest, backend: str) -> Flask:
    app = _make(make_app, request, backend)

    @app.post("/public-write")
    def public_write() -> Response:
        session["seen"] = True
        response = make_response({"ok": True})
        response.cache_control.public = True
        response.cache_control.max_age = 600
        response.cache_control.s_maxage = 600
        return response

    @app.get("/public-read")
    def public_read() -> Response:
        response = make_response({"counter": session.get("counter", 0)})
        response.cache_control.public = True
        response.cache_control.max_age = 60
        return response

    @app.get("/no-store-read")
    def no_store_read() -> Response:
        response = make_response({"counter": session.get("counter", 0)})
        response.cache_control.no_store = True
        return response

    return app


# -- sessions and caches ---------------------------------------------------------------------------


def test_setting_the_cookie_is_private_no_store(app: Flask) -> None:
    response = app.test_client(use_cookies=False).post("/session/counter")
    assert _session_cookie(response)
    assert _directives(response) == {"private", "no-store"}
    assert "Cookie" in response.headers["Vary"]


def test_a_public_page_that_sets_the_cookie_becomes_private(app: Flask) -> None:
    response = app.test_client(use_cookies=False).post("/public-write")
    assert _session_cookie(response)
    directives = _directives(response)
    assert {"private", "no-store"} <= directives
    assert "public" not in directives
    assert not any(d.startswith("s-maxage") for d in directives)


def test_deleting_the_cookie_is_private_no_store(app: Flask) -> None:
    client = app.test_client(use_cookies=False)
    sid = _sid(client.post("/session/counter"))
    response = client.delete("/session", headers=_as(app, sid))
    assert response.status_code == 200
    assert _session_cookie(response) == ""
    assert _directives(response) == {"private", "no-store"}


def test_reading_the_session_is_private(app: Flask) -> None:
    client = app.test_client(use_cookies=False)
    sid = _sid(client.post("/session/counter"))
    response = client.get("/session/counter", headers=_as(app, sid))
    assert response.json == {"counter": 1}
    assert _session_cookie(response) is None
    assert _directives(response) == {"private"}
    public = client.get("/public-read", headers=_as(app, sid))
    assert _directives(public) == {"private", "max-age=60"}
    stronger = client.get("/no-store-read", headers=_as(app, sid))
    assert _directives(stronger) == {"private", "no-store"}


def test_a_response_that_never_touched_the_session_is_left_alone(app: Flask) -> None:
    response = app.test_client(use_cookies=False).get("/healthz")
    assert "Cache-Control" not in response.headers


# -- our error answers -----------------------------------------------------------------------------


def test_409_session_ended_is_no_store_nosniff(app: Flask) -> None:
    @app.post("/ended-meanwhile")
    def ended_meanwhile() -> dict[str, bool]:
        session.get("counter")
        interface = SessionStore.state().interface
        interface.records.delete(interface.store_id(session.sid))  # a logout elsewhere, meanwhile
        session["late"] = True
        return {"ok": True}

    client = app.test_client(use_cookies=False)
    for accept in (JSON, {"Accept": "text/html"}):
        sid = _sid(client.post("/session/counter"))
        response = client.post("/ended-meanwhile", headers={**_as(app, sid), **accept})
        _assert_error_headers(response, 409)


@pytest.mark.parametrize("accept", [JSON, {"Accept": "text/html"}])
def test_500_too_large_is_generic_with_a_correlation_id(
    make_app: MakeApp,
    request: pytest.FixtureRequest,
    backend: str,
    accept: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = _make(make_app, request, backend, SESSION_MAX_BYTES="1024")

    @app.post("/big")
    def big() -> dict[str, bool]:
        session["blob"] = "x" * 5000
        return {"ok": True}

    response = app.test_client(use_cookies=False).post("/big", headers=accept)
    _assert_error_headers(response, 500)
    body = response.get_data(as_text=True)
    _assert_says_nothing_of_the_detail(body, backend, "blob")
    correlation_id = _correlation_id(body)
    line = _log_line(caplog, correlation_id)
    assert "1,024" in line
    assert "SESSION_MAX_BYTES" in line
    if accept == JSON:
        assert response.json is not None
        assert response.json["error"] == "session_too_large"
        assert response.json["correlation_id"] == correlation_id
    else:
        assert response.mimetype == "text/plain"


def test_500_unstorable_never_echoes_the_sessions_key_names(
    app: Flask, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    @app.post("/unstorable")
    def unstorable() -> dict[str, bool]:
        session["account-settings"] = {"favourite-colours-of-alice": {"red", "blue"}}
        return {"ok": True}

    response = app.test_client(use_cookies=False).post("/unstorable", headers=JSON)
    _assert_error_headers(response, 500)
    assert response.json is not None
    assert response.json["error"] == "session_unstorable"
    body = response.get_data(as_text=True)
    _assert_says_nothing_of_the_detail(body, backend, "account-settings")
    assert "favourite-colours-of-alice" not in body
    line = _log_line(caplog, response.json["correlation_id"])
    assert "session['account-settings']['favourite-colours-of-alice'] is a set" in line


def _assert_says_nothing_of_the_detail(body: str, backend: str, key: str) -> None:
    for detail in (key, backend, "SESSION_MAX_BYTES", "1,024", "1024", "5,0", "bytes"):
        assert detail not in body, (detail, body)


def _correlation_id(body: str) -> str:
    match = re.search(r"correlation id ([0-9a-f]{16})", body)
    assert match, body
    return match.group(1)


def _log_line(caplog: pytest.LogCaptureFixture, correlation_id: str) -> str:
    lines = [r.getMessage() for r in caplog.records if correlation_id in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0]


# -- 503: the store is down ------------------------------------------------------------------------


@pytest.fixture(params=["redis", "firestore"])
def unreachable(
    request: pytest.FixtureRequest, make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> Flask:
    """An app whose store address has nothing listening (connections refused at once)."""
    port = free_port()
    if request.param == "redis":
        env = {
            "SESSION_STORE_BACKEND": "redis",
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "REDIS_SOCKET_TIMEOUT": "1",
            "REDIS_CONNECT_TIMEOUT": "1",
        }
    else:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{port}")
        env = {
            "SESSION_STORE_BACKEND": "firestore",
            "FIRESTORE_PROJECT": "demo-responses",
            "FIRESTORE_TIMEOUT": "1",
        }
    # The breaker off: each request reaches the store and fails on its own path.
    return make_app(ENV="production", SECRET_KEY=SECRET, SESSION_STORE_COOLDOWN="0", **env)


@pytest.mark.parametrize("accept", [JSON, {"Accept": "text/html"}])
def test_503_from_the_error_handler_is_no_store_nosniff(
    unreachable: Flask, accept: dict[str, str]
) -> None:
    """A view used the session, which could not be read: the error handler's 503."""
    headers = {"Cookie": f"{cookie_name(unreachable)}=from-before-the-outage", **accept}
    response = unreachable.test_client(use_cookies=False).get("/session/counter", headers=headers)
    _assert_error_headers(response, 503)
    assert response.headers["Retry-After"] == "5"
    _assert_generic_503(response)


def test_503_from_save_is_no_store_nosniff(unreachable: Flask) -> None:
    """A new session could not be written: save_session's 503 replaces the view's answer."""
    response = unreachable.test_client(use_cookies=False).post("/session/counter", headers=JSON)
    _assert_error_headers(response, 503)
    assert response.headers["Retry-After"] == "5"
    _assert_generic_503(response)


@pytest.mark.parametrize("store", ["redis", "firestore"])
def test_503_while_failing_fast_has_the_same_headers(
    store: str, make_app: MakeApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a store call timed out, the answers given at once (the breaker) carry the same
    headers: a paused redis-server, a Firestore address where nothing listens."""
    if store == "redis":
        server = RedisServer(tmp_path)
        server.start()
        env = {"SESSION_STORE_BACKEND": "redis", "REDIS_URL": server.url}
        env.update(REDIS_SOCKET_TIMEOUT="1", REDIS_CONNECT_TIMEOUT="1")
    else:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
        env = {"SESSION_STORE_BACKEND": "firestore", "FIRESTORE_PROJECT": "demo-responses"}
        env.update(FIRESTORE_TIMEOUT="1")
    app = make_app(ENV="production", SECRET_KEY=SECRET, SESSION_STORE_COOLDOWN="30", **env)
    client = app.test_client(use_cookies=False)
    headers = {"Cookie": f"{cookie_name(app)}=from-before-the-outage", **JSON}
    if store == "redis":
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
    try:
        responses = [client.get("/session/counter", headers=headers) for _ in range(2)]
        responses.append(client.post("/session/counter", headers=JSON))
        assert SessionStore.state(app).interface.breaker.state == "open"
    finally:
        if store == "redis":
            os.kill(server.process.pid, signal.SIGCONT)
            server.stop()
    for response in responses:
        _assert_error_headers(response, 503)
        assert response.headers["Retry-After"] == "5"
        _assert_generic_503(response)


def _assert_generic_503(response: TestResponse) -> None:
    body = response.get_data(as_text=True)
    assert "unavailable" in body
    for detail in ("redis", "Redis", "firestore", "Firestore", "127.0.0.1", "Error"):
        assert detail not in body, (detail, body)
    if response.mimetype == "application/json":
        assert set(json.loads(body)) == {"error", "message"}
