"""SessionStore as a drop-in for an existing Flask app (``tests/host_app.py``) on every backend.

The host app sets its own ``SECRET_KEY`` and cookie name, then ``SessionStore(app)``, then
Flask-Login and Flask-WTF, exactly as a real app would: these tests check that the extension keeps
what the app configured, that both extensions work on top of it (also through real gunicorn with
two workers), that every type Flask's own cookie session keeps comes back exactly, that what
cannot be kept is refused without harming the stored session, and that the cases where the
previous release differed from Flask's cookie session now behave like it.
"""

from __future__ import annotations

import http.client
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import redis
from flask import Flask, session
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from itsdangerous import URLSafeTimedSerializer
from markupsafe import Markup
from werkzeug.test import TestResponse

from pyloto_corp.session_store import SessionStore, revoke_user_sessions, user_sessions
from pyloto_corp.session_store.base import hashed_store_id
from tests.host_app import HOST_COOKIE_NAME, HOST_SECRET_KEY, create_host_app
from tests.services import FirestoreEmulator, Gunicorn, RedisServer
from tests.stored import stored_session

BASE_URL = "https://localhost"
BACKENDS = ("memory", "redis", "firestore")

# --- backends -------------------------------------------------------------------------------


@dataclass
class Backend:
    """The app.config a host app on one backend passes, and a look into what that store holds."""

    name: str
    config: dict[str, object]

    def app(self) -> Flask:
        app = create_host_app(self.config)
        add_probes(app)
        return app

    def has_record(self, app: Flask, sid: str) -> bool:
        """Whether the store holds a session for ``sid`` (a retired id's marker is none)."""
        prefix = SessionStore.state(app).settings.session_key_prefix
        return stored_session(app, hashed_store_id(prefix, sid)) is not None


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    """One backend, by name (``request.param``), configured through the host's ``app.config``
    only (``ENV`` included). Production means the host's own SECRET_KEY is held to the
    32-character minimum and cookies are Secure (so every request goes over https)."""
    name = request.param
    if name == "memory":
        return Backend(name, {"ENV": "test"})
    if name == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        request.getfixturevalue("redis_client")  # flushed for this test
        config: dict[str, object] = {
            "ENV": "production",
            "SESSION_STORE_BACKEND": "redis",
            "REDIS_URL": server.url,
        }
        return Backend(name, config)
    assert name == "firestore"
    emulator: FirestoreEmulator = request.getfixturevalue("firestore_emulator")
    request.getfixturevalue("firestore_env")  # empties it and sets FIRESTORE_EMULATOR_HOST
    config = {
        "ENV": "production",
        "SESSION_STORE_BACKEND": "firestore",
        "FIRESTORE_PROJECT": emulator.project,
    }
    return Backend(name, config)


every_backend = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


# --- the browser and the probe routes -------------------------------------------------------


class Browser:
    """A test client that talks https, sends a same-origin Referer with every POST (Flask-WTF's
    strict https check) and can fetch a CSRF token."""

    def __init__(self, app: Flask) -> None:
        self.client: FlaskClient = app.test_client()

    def get(self, path: str, **kwargs: Any) -> TestResponse:
        return self.client.get(path, base_url=BASE_URL, **kwargs)

    def post(self, path: str, data: dict[str, str] | None = None, **kwargs: Any) -> TestResponse:
        headers = {"Referer": f"{BASE_URL}/form", **kwargs.pop("headers", {})}
        return self.client.post(path, base_url=BASE_URL, data=data, headers=headers, **kwargs)

    def token(self) -> str:
        response = self.get("/form")
        assert response.status_code == 200
        return response.text

    def login(self, user: str = "ana", *, remember: bool = False) -> TestResponse:
        data = {"user": user, "csrf_token": self.token()}
        if remember:
            data["remember"] = "1"
        response = self.post("/login", data)
        assert response.status_code == 200, response.text
        return response

    def cookie(self, name: str = HOST_COOKIE_NAME) -> str | None:
        cookie = self.client.get_cookie(name, domain="localhost")
        return None if cookie is None else cookie.value

    def drop_cookie(self, name: str = HOST_COOKIE_NAME) -> None:
        self.client.delete_cookie(name, domain="localhost")

    def set_cookie(self, value: str, name: str = HOST_COOKIE_NAME) -> None:
        self.client.set_cookie(name, value, domain="localhost")


class Widget:
    """A custom object: no session can keep it."""


def add_probes(app: Flask) -> dict[str, Any]:
    """Routes reading and writing the session directly; the returned box carries values in
    (``box["value"]``) and out (``box["got"]``) of the app, which runs in this process."""
    box: dict[str, Any] = {}

    @app.get("/probe/put")
    def put() -> str:
        session["v"] = box["value"]
        return "stored"

    @app.get("/probe/take")
    def take() -> dict[str, str]:
        value = session["v"]
        box["got"] = value
        return {"repr": repr(value), "type": type(value).__name__}

    @app.get("/probe/bump")
    def bump() -> dict[str, int]:
        session["counter"] = session.get("counter", 0) + 1
        return {"counter": session["counter"]}

    @app.get("/probe/counter")
    def counter() -> dict[str, int | None]:
        return {"counter": session.get("counter")}

    @app.get("/probe/pop")
    def pop() -> dict[str, int | None]:
        return {"popped": session.pop("counter", None)}

    @app.get("/probe/refuse/<case>")
    def refuse(case: str) -> str:
        # This request's other change must not be stored either.
        session["counter"] = session.get("counter", 0) + 100
        if case == "set":
            session["x"] = {1, 2}
        elif case == "int_key":
            session[42] = "seen"  # type: ignore[index]
        elif case == "custom":
            session["widget"] = Widget()
        elif case == "nested":
            session["cart"] = [{"ok": 1}, {3}]
        return "the view returned normally"

    @app.get("/probe/cart/init")
    def cart_init() -> dict[str, Any]:
        session["cart"] = {"items": []}
        return session["cart"]

    @app.get("/probe/cart/append")
    def cart_append() -> dict[str, Any]:
        session["cart"]["items"].append("apple")  # no session.modified = True
        return session["cart"]

    @app.get("/probe/cart")
    def cart() -> dict[str, Any]:
        return session["cart"]

    return box


def flask_cookie_app() -> tuple[Flask, dict[str, Any]]:
    """A plain Flask app on its own signed-cookie session: the reference behaviour."""
    app = Flask(__name__)
    app.secret_key = HOST_SECRET_KEY
    return app, add_probes(app)


def set_cookie_header(response: TestResponse, name: str = HOST_COOKIE_NAME) -> str | None:
    for header in response.headers.getlist("Set-Cookie"):
        if header.startswith(f"{name}="):
            return header
    return None


def sid_set_by(response: TestResponse) -> str:
    header = set_cookie_header(response)
    assert header is not None, response.headers.getlist("Set-Cookie")
    return header.split(";", 1)[0].split("=", 1)[1]


# --- Flask-Login ----------------------------------------------------------------------------


@every_backend
def test_login_flashes_a_markup_and_moves_the_session_to_a_new_id(backend: Backend) -> None:
    app = backend.app()
    browser = Browser(app)
    before = sid_set_by(browser.get("/form"))
    token = browser.token()
    after = sid_set_by(browser.post("/login", {"user": "ana", "csrf_token": token}))
    assert after != before
    assert not backend.has_record(app, before)
    assert backend.has_record(app, after)

    me = browser.get("/me").json
    assert me == {
        "user": "ana",
        "flashes": [
            {"category": "info", "message": "Welcome <b>back</b>", "markup": True, "tuple": True}
        ],
        "fresh": True,
    }
    assert browser.get("/me").json["flashes"] == []  # shown once


@every_backend
def test_logout_is_final_and_its_flash_shown_once(backend: Backend) -> None:
    app = backend.app()
    browser = Browser(app)
    logged_in = sid_set_by(browser.login("ana"))
    assert browser.get("/me").json["user"] == "ana"

    response = browser.post("/logout", {"csrf_token": browser.token()})
    assert response.status_code == 200, response.text
    assert sid_set_by(response) != logged_in  # the flash lives under a new id
    assert not backend.has_record(app, logged_in)

    first = browser.get("/me").json
    assert first["user"] == "anonymous"
    assert first["flashes"] == [
        {"category": "message", "message": "Signed out", "markup": False, "tuple": True}
    ]
    assert browser.get("/me").json == {"user": "anonymous", "flashes": [], "fresh": False}

    replay = Browser(app)
    replay.set_cookie(logged_in)
    assert replay.get("/me").json == {"user": "anonymous", "flashes": [], "fresh": False}


@every_backend
def test_remember_me_restores_a_stale_login_that_fresh_views_refuse(backend: Backend) -> None:
    app = backend.app()
    browser = Browser(app)
    browser.login("ana", remember=True)
    assert browser.cookie("remember_token") is not None
    assert browser.get("/me").json["fresh"] is True

    browser.drop_cookie()  # the browser closed: only the remember-me cookie is left
    me = browser.get("/me").json
    assert me["user"] == "ana"
    assert me["fresh"] is False
    refused = browser.post("/fresh-only", {"csrf_token": browser.token()})
    assert refused.status_code == 401 or 300 <= refused.status_code < 400, refused.status_code

    browser.login("ana")  # a fresh login
    allowed = browser.post("/fresh-only", {"csrf_token": browser.token()})
    assert allowed.status_code == 200, allowed.text
    assert allowed.json == {"user": "ana"}


# --- Flask-WTF and the host's own configuration ---------------------------------------------


@every_backend
def test_flask_login_users_are_logged_out_everywhere(backend: Backend) -> None:
    """Flask-Login writes _user_id: the sessions are indexed with no code in the app."""
    app = backend.app()
    anas = [Browser(app) for _ in range(3)]
    for browser in anas:
        browser.login("ana")
    bob = Browser(app)
    bob.login("bob")
    with app.app_context():
        assert len(user_sessions("ana")) == 3
        assert revoke_user_sessions("ana") == 3
    for browser in anas:
        assert browser.get("/me").json["user"] == "anonymous"  # type: ignore[index]
    assert bob.get("/me").json["user"] == "bob"  # type: ignore[index]


@every_backend
def test_csrf_tokens_are_checked(backend: Backend) -> None:
    app = backend.app()
    browser = Browser(app)
    token = browser.token()

    missing = browser.post("/login", {"user": "ana"})
    assert missing.status_code == 400
    assert "The CSRF token is missing." in missing.text

    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    forged = browser.post("/login", {"user": "ana", "csrf_token": tampered})
    assert forged.status_code == 400
    assert "The CSRF token is invalid." in forged.text

    someone_elses = Browser(app).token()  # valid, but for another session
    stolen = browser.post("/login", {"user": "ana", "csrf_token": someone_elses})
    assert stolen.status_code == 400
    assert "The CSRF tokens do not match." in stolen.text
    assert browser.get("/me").json["user"] == "anonymous"

    accepted = browser.post("/login", {"user": "ana", "csrf_token": token})
    assert accepted.status_code == 200, accepted.text
    assert browser.get("/me").json["user"] == "ana"


@every_backend
def test_the_host_keeps_its_secret_key_and_cookie_name(backend: Backend) -> None:
    app = backend.app()
    assert app.config["SECRET_KEY"] == HOST_SECRET_KEY
    assert SessionStore.state(app).settings.secret_key == HOST_SECRET_KEY
    assert app.config["SESSION_COOKIE_NAME"] == HOST_COOKIE_NAME
    resolved = SessionStore.state(app).settings
    assert resolved.environment == backend.config["ENV"]
    assert resolved.session_store_backend == backend.name

    response = Browser(app).get("/form")
    cookies = response.headers.getlist("Set-Cookie")
    assert [c.split("=", 1)[0] for c in cookies] == [HOST_COOKIE_NAME]
    assert ("; Secure" in cookies[0]) is (backend.name != "memory")
    # The CSRF token is signed with the host's own key.
    raw = URLSafeTimedSerializer(HOST_SECRET_KEY, salt="wtf-csrf-token").loads(response.text)
    assert isinstance(raw, str)
    assert len(raw) == 40


# --- CSRF through real gunicorn, two workers ------------------------------------------------


def _post_form(
    port: int, path: str, form: dict[str, str], cookie: str
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie}
        connection.request("POST", path, body=urlencode(form), headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_csrf_tokens_work_across_two_gunicorn_workers(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """Tokens signed by one worker verify in the other: both use the host's own SECRET_KEY (none
    is set in the environment) and share the sessions in Redis.

    Every request is on a new connection, several at a time (one at a time, one worker tends to
    accept them all), in rounds of 20 forms then 20 posts, until each worker has issued tokens,
    checked tokens, and checked one the other issued (at most 5 rounds).
    """
    environ = {
        "ENV": "production",
        "SESSION_STORE_BACKEND": "redis",
        "REDIS_URL": redis_server.url,
        "GUNICORN_WORKERS": "2",
    }
    server = Gunicorn(tmp_path, environ, app="tests.host_app:wsgi()")

    def fetch_form(_: int) -> tuple[str, str, str]:
        status, headers, body = server.request("GET", "/form")
        assert status == 200, body
        cookie = headers["Set-Cookie"].split(";", 1)[0]
        assert cookie.startswith(f"{HOST_COOKIE_NAME}=")
        return body.decode(), cookie, headers["X-Worker-Pid"]

    def post_token(numbered: tuple[int, tuple[str, str, str]]) -> tuple[str, str]:
        number, (token, cookie, issued_by) = numbered
        form = {"user": f"user{number}", "csrf_token": token}
        status, headers, body = _post_form(server.port, "/login", form, cookie)
        assert b"The CSRF token is invalid" not in body
        assert status == 200, body
        assert body.strip() == f'{{"user":"user{number}"}}'.encode()
        return issued_by, headers["X-Worker-Pid"]

    pairs: set[tuple[str, str]] = set()
    posts = 0
    try:
        server.start()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(5):
                forms = list(pool.map(fetch_form, range(20)))
                pairs.update(pool.map(post_token, enumerate(forms, start=posts)))
                posts += len(forms)
                issuers = {issued for issued, _ in pairs}
                checkers = {checked for _, checked in pairs}
                crossed = any(issued != checked for issued, checked in pairs)
                if len(issuers) == len(checkers) == 2 and crossed:
                    break
    finally:
        output = server.stop()
    assert "Traceback" not in output
    assert len({pid for pair in pairs for pid in pair}) == 2, f"one worker served all: {pairs}"
    assert len({issued for issued, _ in pairs}) == 2, pairs
    assert len({checked for _, checked in pairs}) == 2, pairs
    assert any(issued != checked for issued, checked in pairs), pairs


# --- what a session may hold ----------------------------------------------------------------

NAIVE = datetime(2024, 5, 17, 13, 45, 30, 123456)
AWARE = datetime(2024, 5, 17, 13, 45, 30, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
#: Every supported type, as a view would store it.
TABLE: dict[str, Any] = {
    "str": "héllo wörld ✓ \x00",
    "int": 42,
    "int 2**64": 2**64,
    "int -2**70": -(2**70),
    "float": 0.1,
    "bool": True,
    "None": None,
    "bytes": b"\x00\xffbinary",
    "list": [1, "two", 3.0, [None]],
    "dict": {"a": 1, "nested": {"b": [1, 2], "c": None}},
    "tuple": (1, "two", (3,)),
    "Markup": Markup("<b>bold</b> &amp; safe"),
    "UUID": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "naive datetime": NAIVE,
    "aware datetime": AWARE,
    "flashed messages": [("info", Markup("Welcome <b>back</b>")), ("message", "Signed out")],
}
#: Flask's cookie session keeps these only to the second, in UTC.
FLASK_LOSSY = {"naive datetime", "aware datetime"}


def _round_trip(
    get: Callable[..., TestResponse], box: dict[str, Any], value: Any
) -> dict[str, str]:
    box["value"] = value
    stored = get("/probe/put")
    assert stored.status_code == 200, stored.text
    response = get("/probe/take")
    assert response.status_code == 200, response.text
    result: dict[str, str] = response.json
    return result


@every_backend
def test_every_supported_type_round_trips_exactly(backend: Backend) -> None:
    app = create_host_app(backend.config)
    ours_box = add_probes(app)
    ours = Browser(app)
    flask_app, flask_box = flask_cookie_app()
    flask_client = flask_app.test_client()

    mismatches = []
    for name, value in TABLE.items():
        expected = {"repr": repr(value), "type": type(value).__name__}
        got = _round_trip(ours.get, ours_box, value)
        if got != expected or ours_box["got"] != value:
            mismatches.append(f"{name}: stored {expected}, read back {got}")
        reference = _round_trip(flask_client.get, flask_box, value)
        if name in FLASK_LOSSY:
            assert reference != expected, f"Flask's cookie session now keeps {name} exactly"
        else:
            assert reference == expected, f"Flask's cookie session: {name}: {reference}"
            assert got == reference, f"{name}: Flask reads back {reference}, ours {got}"
    assert not mismatches, "\n".join(mismatches)


@every_backend
@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("set", "session['x'] is a set"),
        ("int_key", "session key 42 is an int"),
        ("custom", "session['widget'] is a Widget"),
        ("nested", "session['cart'][1] is a set"),
    ],
)
def test_an_unstorable_value_is_refused_and_the_stored_session_kept(
    backend: Backend, case: str, named: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = backend.app()
    browser = Browser(app)
    browser.login("ana")
    browser.get("/probe/bump")
    assert browser.get("/probe/bump").json == {"counter": 2}
    sid = browser.cookie()

    response = browser.get(f"/probe/refuse/{case}", headers={"Accept": "application/json"})
    assert response.status_code == 500
    assert response.json["error"] == "session_unstorable"
    assert named not in response.json["message"]  # the detail goes to the log line
    assert named in caplog.text
    assert response.json["correlation_id"] in caplog.text
    assert set_cookie_header(response) is None

    assert browser.cookie() == sid
    assert browser.get("/probe/counter").json == {"counter": 2}
    assert browser.get("/me").json["user"] == "ana"


# --- where the previous release differed from Flask's cookie session ------------------------


@every_backend
def test_a_nested_change_without_modified_is_not_kept(backend: Backend) -> None:
    app = backend.app()
    browser = Browser(app)
    flask_app, _ = flask_cookie_app()
    flask_client = flask_app.test_client()
    for get in (browser.get, flask_client.get):
        assert get("/probe/cart/init").json == {"items": []}
        assert get("/probe/cart/append").json == {"items": ["apple"]}  # in this request only
        assert get("/probe/cart").json == {"items": []}


def _expiry(set_cookie: str) -> datetime:
    match = re.search(r"Expires=([^;]+)", set_cookie)
    assert match is not None, set_cookie
    return parsedate_to_datetime(match.group(1))


@every_backend
def test_emptying_the_session_key_by_key_deletes_it_and_its_cookie(backend: Backend) -> None:
    app = backend.app()
    browser = Browser(app)
    sid = sid_set_by(browser.get("/probe/bump"))
    assert backend.has_record(app, sid)

    response = browser.get("/probe/pop")
    assert response.json == {"popped": 1}
    header = set_cookie_header(response)
    assert header is not None
    assert header.startswith(f"{HOST_COOKIE_NAME}=;")
    assert _expiry(header) < datetime.now(UTC)
    assert not backend.has_record(app, sid)
    assert browser.cookie() is None

    # Flask's own cookie session does the same.
    flask_app, _ = flask_cookie_app()
    flask_client = flask_app.test_client()
    flask_client.get("/probe/bump")
    reference = set_cookie_header(flask_client.get("/probe/pop"), "session")
    assert reference is not None
    assert _expiry(reference) < datetime.now(UTC)


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_lifetime_changed_after_init_is_used_by_reads_and_writes(
    backend: Backend, redis_client: redis.Redis
) -> None:
    app = backend.app()
    assert app.permanent_session_lifetime == timedelta(hours=12)
    app.permanent_session_lifetime = timedelta(seconds=1234)
    browser = Browser(app)
    sid = sid_set_by(browser.get("/probe/bump"))  # a write
    key = hashed_store_id(SessionStore.state(app).settings.session_key_prefix, sid)
    assert 1230 <= redis_client.ttl(key) <= 1234

    redis_client.expire(key, 50)
    assert browser.get("/probe/counter").json == {"counter": 1}  # a read slides it
    assert 1230 <= redis_client.ttl(key) <= 1234


# --- any session value, by property ---------------------------------------------------------

_DAY_US = 24 * 3600 * 10**6
_offsets = st.integers(min_value=-_DAY_US + 1, max_value=_DAY_US - 1).map(
    lambda us: timezone(timedelta(microseconds=us))
)
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**100), max_value=2**100)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.text(max_size=20).map(Markup)
    | st.uuids()
    | st.datetimes()
    | st.datetimes(timezones=_offsets)
)
session_values = st.recursive(
    _leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _deep_type(value: Any) -> Any:
    """The type of every node, so that equal values of different types (1 and 1.0 and True,
    a str and a Markup, a list and a tuple) differ."""
    if isinstance(value, list | tuple):
        return (type(value), [_deep_type(item) for item in value])
    if isinstance(value, dict):
        return (dict, [(key, _deep_type(item)) for key, item in value.items()])
    return type(value)


@pytest.mark.parametrize("backend", ["redis", "firestore"], indirect=True)
def test_any_supported_value_round_trips_exactly(backend: Backend) -> None:
    app = create_host_app(backend.config)
    box = add_probes(app)
    started = time.monotonic()

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(value=session_values)
    def round_trips(value: Any) -> None:
        got = _round_trip(Browser(app).get, box, value)
        assert got == {"repr": repr(value), "type": type(value).__name__}
        assert _deep_type(box["got"]) == _deep_type(value)

    round_trips()
    assert time.monotonic() - started < 15, "the property took too long on this backend"


def test_flask_login_pages_answer_503_or_200_not_500_while_the_store_is_down(
    own_redis: RedisServer,
) -> None:
    """Flask-Login checks ``"_remember" in session`` after every request: during an outage a
    page that needs the user is a 503 and a public page still a 200, never a 500."""
    app = create_host_app(
        {"ENV": "production", "SESSION_STORE_BACKEND": "redis", "REDIS_URL": own_redis.url}
    )

    @app.get("/public")
    def public() -> str:
        return "hello"

    browser = Browser(app)
    browser.login("ana")
    own_redis.stop()
    try:
        private = browser.get("/me", headers={"Accept": "application/json"})
        assert private.status_code == 503
        assert private.json is not None
        assert private.json["error"] == "session_store_unavailable"
        assert browser.get("/public").status_code == 200
    finally:
        own_redis.start()
