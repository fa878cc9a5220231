"""A login sticks, a logout is final, and the browser's cookie is never replaced by a request
that was already running (issue: "logins that stick").

A login (or logout) leaves a short-lived marker where the old session was (``base.Retired``). A
request that still carries the old id reads the marker instead of "no session": it saves
nothing (a write answers 409) and sends no cookie, so it cannot replace the login's cookie with
a new anonymous one; a logout that carries the pre-login id ends the signed-in session too. A
response never sends the cookie the browser already holds.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, session
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from pyloto_corp.records import base
from pyloto_corp.session_store import SessionStore
from tests.conftest import DEPLOYED_COOKIE, LOCAL_COOKIE, SECRET, MakeApp, cookie_name
from tests.services import FirestoreEmulator, Gunicorn, RedisServer
from tests.session_store.conftest import Harness, sid_of


def _as(app: Flask, sid: str) -> dict[str, str]:
    return {"Cookie": f"{cookie_name(app)}={sid}"}


def _client(app: Flask) -> FlaskClient:
    """A browser that sends exactly the cookie each call names (no cookie jar)."""
    return app.test_client(use_cookies=False)


def _add_whoami(app: Flask) -> None:
    @app.get("/whoami")
    def whoami() -> dict[str, object]:
        return {"user": session.get("user"), "counter": session.get("counter")}


def _session_set_cookie(response: TestResponse) -> str | None:
    """The Set-Cookie header of the session cookie (either name), the name dropped."""
    for header in response.headers.getlist("Set-Cookie"):
        name, _, rest = header.partition("=")
        if name in (DEPLOYED_COOKIE, LOCAL_COOKIE):
            return "=" + rest
    return None


def _login(app: Flask, sid: str) -> str:
    response = _client(app).post("/session/login", json={"user": "ana"}, headers=_as(app, sid))
    assert response.status_code == 200
    new = sid_of(response)
    assert new != sid
    return new


def _signed_in(backend: Harness) -> tuple[Flask, str, str]:
    """An app with /whoami, and a session (counter 1) signed in as ana: (app, the pre-login
    id, the signed-in id)."""
    app = backend.make()
    _add_whoami(app)
    old = sid_of(_client(app).post("/session/counter"))
    return app, old, _login(app, old)


def test_a_request_carrying_the_retired_id_saves_nothing_and_sends_no_cookie(
    backend: Harness,
) -> None:
    app, old, new = _signed_in(backend)

    late_write = _client(app).post("/session/counter", headers=_as(app, old))
    assert late_write.status_code == 409
    assert _session_set_cookie(late_write) is None
    late_read = _client(app).get("/whoami", headers=_as(app, old))
    assert late_read.status_code == 200
    assert late_read.json == {"user": None, "counter": None}
    assert _session_set_cookie(late_read) is None
    assert backend.read_raw(app, backend.store_id(app, old)) is None

    signed_in = _client(app).get("/whoami", headers=_as(app, new))
    assert signed_in.json == {"user": "ana", "counter": 1}


def test_a_logout_carrying_the_pre_login_id_ends_the_signed_in_session(
    backend: Harness,
) -> None:
    app, old, new = _signed_in(backend)

    logout = _client(app).delete("/session", headers=_as(app, old))
    assert logout.status_code == 200
    deleted = _session_set_cookie(logout)
    assert deleted is not None
    assert deleted.startswith("=;")
    assert backend.read_raw(app, backend.store_id(app, new)) is None
    assert _client(app).get("/whoami", headers=_as(app, new)).json == {
        "user": None,
        "counter": None,
    }


def test_a_login_submitted_twice_signs_in_on_a_fresh_id(backend: Harness) -> None:
    """The browser cancelled the first submit, the server finished it: the second still
    carries the pre-login id. It signs in (never on the retired id), it is not refused."""
    app = backend.make()
    _add_whoami(app)
    old = sid_of(_client(app).post("/session/counter"))
    first = _login(app, old)
    again = _client(app).post("/session/login", json={"user": "ana"}, headers=_as(app, old))
    assert again.status_code == 200
    second = sid_of(again)
    assert second not in (old, first)
    assert _client(app).get("/whoami", headers=_as(app, second)).json["user"] == "ana"


def test_emptying_the_session_on_the_pre_login_id_is_a_logout_of_the_new_one(
    backend: Harness,
) -> None:
    """Flask-Login's logout_user() alone empties the session: on the retired id it still ends
    the signed-in session the id moved to, and removes the cookie."""
    app = backend.make()
    _add_whoami(app)

    @app.post("/logout-by-clearing")
    def logout_by_clearing() -> dict[str, bool]:
        session.clear()
        return {"ok": True}

    old = sid_of(_client(app).post("/session/counter"))
    new = _login(app, old)
    logout = _client(app).post("/logout-by-clearing", headers=_as(app, old))
    assert logout.status_code == 200
    assert (_session_set_cookie(logout) or "").startswith("=;")
    assert _client(app).get("/whoami", headers=_as(app, new)).json == {
        "user": None,
        "counter": None,
    }


def test_no_write_can_bring_a_retired_id_back(backend: Harness) -> None:
    """What a request that read the session before the login writes afterwards, whole (as the
    previous release does during a rolling deploy, after its merge found another layout) or
    merged, finds the session gone."""
    from pyloto_corp.session_store.base import Changes

    app = backend.make()
    old = sid_of(_client(app).post("/session/counter"))
    interface = SessionStore.state(app).interface
    store_id = interface.store_id(old)
    stored = interface.records.read(store_id, timedelta(hours=1))
    assert isinstance(stored, base.Record)
    _login(app, old)
    value = {"counter": b"\xc1\x01\x07"}
    for whole in (True, False):
        changes = Changes(set=value, delete=(), whole=whole)
        assert interface.records.update(store_id, changes, timedelta(hours=1), stored) is False
    assert backend.read_raw(app, store_id) is None


def test_a_response_never_resends_the_cookie_the_browser_holds(backend: Harness) -> None:
    app = backend.make()

    @app.post("/remember")
    def remember() -> dict[str, bool]:
        session.permanent = True
        return {"ok": True}

    first = _client(app).post("/session/counter")
    sid = sid_of(first)
    again = _client(app).post("/session/counter", headers=_as(app, sid))
    assert again.json == {"counter": 2}
    assert _session_set_cookie(again) is None
    assert "Cookie" in again.headers["Vary"]
    # Making it permanent changes the cookie's expiry: that is sent, once.
    permanent = _client(app).post("/remember", headers=_as(app, sid))
    assert "Expires=" in (_session_set_cookie(permanent) or "")
    assert sid_of(permanent) == sid
    assert _session_set_cookie(_client(app).post("/remember", headers=_as(app, sid))) is None


def test_signing_in_without_rotate_session_id_still_moves_the_session(backend: Harness) -> None:
    """Fixation defence by default: SESSION_USER_KEY appearing or changing rotates the id."""
    app = backend.make()
    _add_whoami(app)

    @app.post("/as/<user>")
    def sign_in_as(user: str) -> dict[str, bool]:
        session["_user_id"] = user  # what Flask-Login's login_user() does, without rotating
        session["user"] = user
        return {"ok": True}

    planted = sid_of(_client(app).post("/session/counter"))
    response = _client(app).post("/as/ana", headers=_as(app, planted))
    signed_in = sid_of(response)
    assert signed_in != planted
    assert backend.read_raw(app, backend.store_id(app, planted)) is None
    assert _client(app).get("/whoami", headers=_as(app, planted)).json["user"] is None
    assert _client(app).get("/whoami", headers=_as(app, signed_in)).json == {
        "user": "ana",
        "counter": 1,
    }
    # Another user taking over the session moves it again; the same user does not.
    other = sid_of(_client(app).post("/as/bob", headers=_as(app, signed_in)))
    assert other != signed_in
    same = _client(app).post("/as/bob", headers=_as(app, other))
    assert same.status_code == 200
    assert _session_set_cookie(same) is None


def test_rotation_on_sign_in_can_be_turned_off(make_app: MakeApp) -> None:
    """With SESSION_ROTATE_ON_LOGIN=false a change of user keeps the id (an anonymous id still
    moves when its session gains a user: the id says which idle lifetime applies)."""
    app = make_app(ENV="test", SESSION_ROTATE_ON_LOGIN="false")

    @app.post("/as/<user>")
    def sign_in_as(user: str) -> dict[str, bool]:
        session["_user_id"] = user
        return {"ok": True}

    anonymous = sid_of(_client(app).post("/session/counter"))
    signed_in = sid_of(_client(app).post("/as/ana", headers=_as(app, anonymous)))
    response = _client(app).post("/as/bob", headers=_as(app, signed_in))
    assert response.status_code == 200
    assert _session_set_cookie(response) is None  # same id, same cookie: nothing to send


def test_the_marker_stops_counting_after_its_linger(
    backend: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "RETIRED_LINGER", timedelta(seconds=1))
    app = backend.make()
    old = sid_of(_client(app).post("/session/counter"))
    _login(app, old)
    assert _client(app).post("/session/counter", headers=_as(app, old)).status_code == 409
    time.sleep(1.2)
    fresh = _client(app).post("/session/counter", headers=_as(app, old))
    assert fresh.status_code == 200
    assert fresh.json == {"counter": 1}
    assert sid_of(fresh) != old


def test_a_session_an_earlier_release_stored_is_retired_at_login(
    shared_backend: Harness,
) -> None:
    from pyloto_corp.records import codec

    backend = shared_backend
    app = backend.make()
    _add_whoami(app)
    old = "earlier-release-session-id"
    backend.write_raw(app, backend.store_id(app, old), codec.dumps({"counter": 5}))
    new = _login(app, old)
    assert _client(app).post("/session/counter", headers=_as(app, old)).status_code == 409
    assert _client(app).get("/whoami", headers=_as(app, new)).json == {"user": "ana", "counter": 5}


# -- through real gunicorn: a login racing the page's in-flight writes ---------------------------


Answer = tuple[float, int, str | None, bytes]


def _call(port: int, method: str, path: str, sid: str, body: object = None) -> Answer:
    """(when the answer arrived, status, the session cookie it set or deleted, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Cookie": f"{DEPLOYED_COOKIE}={sid}"}  # the servers run in production
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
        cookie = None
        for name, value in response.getheaders():
            if name.lower() == "set-cookie" and value.startswith(f"{DEPLOYED_COOKIE}="):
                jar: SimpleCookie = SimpleCookie()
                jar.load(value)
                cookie = jar[DEPLOYED_COOKIE].value
        return time.monotonic(), response.status, cookie, data
    finally:
        connection.close()


def _race_once(port: int, rng: random.Random) -> tuple[str, list[tuple[str, Answer]]]:
    """A session, two of its page's writes in flight (one slow, one sent just after the
    login) and the login: the pre-login id and every answer."""
    seeded = _call(port, "POST", "/seed", "none")
    assert seeded[1] == 200
    assert seeded[2] is not None
    old = seeded[2]
    answers: list[tuple[str, Answer]] = []
    lock = threading.Lock()

    def send(kind: str, method: str, path: str, body: object = None) -> None:
        result = _call(port, method, path, old, body)
        with lock:
            answers.append((kind, result))

    slow = threading.Thread(target=send, args=("write", "POST", "/keys/k1?delay=0.03"))
    login = threading.Thread(target=send, args=("login", "POST", "/session/login", {"user": "ana"}))
    quick = threading.Thread(target=send, args=("write", "POST", "/keys/k2?delay=0"))
    slow.start()
    time.sleep(rng.uniform(0, 0.04))
    login.start()
    time.sleep(rng.uniform(0, 0.01))
    quick.start()
    for thread in (slow, login, quick):
        thread.join(30)
    return old, answers


def _race_logins(port: int, iterations: int) -> dict[str, int]:
    """The browser applies the session cookies in the order the answers arrive; after each
    race it must hold the login's session, intact."""
    outcomes = {"iterations": iterations, "late_409": 0, "late_200_no_cookie": 0, "broken": 0}
    rng = random.Random(19)
    for _ in range(iterations):
        old, answers = _race_once(port, rng)
        browser, login_cookie = old, None
        for kind, (_, status, cookie, _) in sorted(answers, key=lambda item: item[1][0]):
            if kind == "login":
                assert status == 200
                login_cookie = cookie
            elif cookie is None:
                outcomes["late_409" if status == 409 else "late_200_no_cookie"] += 1
            if cookie is not None:
                browser = cookie
        assert login_cookie is not None
        whoami = json.loads(_call(port, "GET", "/whoami", browser)[3])
        if browser != login_cookie or whoami != {"user": "ana"}:
            outcomes["broken"] += 1
    return outcomes


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    started: list[Gunicorn] = []

    def start(**environ: str) -> Gunicorn:
        server = Gunicorn(tmp_path, environ, app="tests.merge_app:ours()")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def test_logins_racing_in_flight_writes_stick_on_redis(
    serve: Callable[..., Gunicorn], redis_server: RedisServer, redis_client: Any
) -> None:
    server = serve(
        ENV="production",
        SESSION_STORE_BACKEND="redis",
        REDIS_URL=redis_server.url,
        SECRET_KEY=SECRET,
        GUNICORN_WORKERS="2",
        GUNICORN_THREADS="4",
    )
    outcomes = _race_logins(server.port, 60)
    print("LOGIN RACES redis:", json.dumps(outcomes))
    assert outcomes["broken"] == 0
    assert outcomes["late_409"] > 0  # the race was real: some writes lost to the login


def test_logins_racing_in_flight_writes_stick_on_firestore(
    serve: Callable[..., Gunicorn],
    firestore_env: dict[str, str],
    firestore_emulator: FirestoreEmulator,
) -> None:
    server = serve(
        **firestore_env,
        FIRESTORE_EMULATOR_HOST=firestore_emulator.host,
        GUNICORN_WORKERS="2",
        GUNICORN_THREADS="4",
    )
    outcomes = _race_logins(server.port, 25)
    print("LOGIN RACES firestore:", json.dumps(outcomes))
    assert outcomes["broken"] == 0
    assert outcomes["late_409"] > 0
