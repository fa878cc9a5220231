"""Sessions without a user are cheap and short: a flood of cookie-less requests (each one whose
view writes the session, a CSRF token, creates a record) cannot fill the store for the users'
full lifetime, and with ``maxmemory-policy volatile-ttl`` it cannot evict a signed-in user."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from flask import Flask, Response, session
from flask_login import login_user
from werkzeug.test import TestResponse

from pyloto_corp.cli import session_store_cli
from pyloto_corp.config.settings import Settings
from pyloto_corp.records.memory import MemoryRecords, MemoryStore
from pyloto_corp.session_store import SessionStore, rotate_session_id, user_sessions
from pyloto_corp.session_store.base import hashed_store_id, is_anonymous_sid
from pyloto_corp.views import bp
from tests.conftest import SECRET, redis_production_env
from tests.host_app import HOST_COOKIE_NAME, create_host_app
from tests.redis_commands import commands
from tests.services import RedisServer
from tests.stored import store_session

BASE_URL = "https://localhost"
ANONYMOUS = 30 * 60
FULL = 12 * 3600

# --- a browser of the host app (Flask-Login, Flask-WTF) -------------------------------------------


class Visitor:
    """A browser over https; ``form()`` fetches a CSRF token (the request that creates a session
    for anyone, cookie or not)."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.client = app.test_client()

    def get(self, path: str) -> TestResponse:
        return self.client.get(path, base_url=BASE_URL)

    def post(self, path: str, data: dict[str, str]) -> TestResponse:
        headers = {"Referer": f"{BASE_URL}/form"}
        return self.client.post(path, base_url=BASE_URL, data=data, headers=headers)

    def form(self) -> str:
        response = self.get("/form")
        assert response.status_code == 200
        return response.text

    def login(self, user: str, path: str = "/login") -> None:
        response = self.post(path, {"user": user, "csrf_token": self.form()})
        assert response.status_code == 200, response.text

    def user(self) -> str:
        me = self.get("/me").json
        assert me is not None
        return str(me["user"])

    def sid(self) -> str:
        cookie = self.client.get_cookie(HOST_COOKIE_NAME, domain="localhost")
        assert cookie is not None
        return cookie.value

    def store_id(self) -> str:
        prefix = SessionStore.state(self.app).settings.session_key_prefix
        return hashed_store_id(prefix, self.sid())


def _host(config: dict[str, object]) -> Flask:
    """The host app, plus a login that does not rotate the id (plain Flask-Login)."""
    app = create_host_app(config)

    @app.post("/login-without-rotation")
    def login_without_rotation() -> dict[str, str]:
        from tests.host_app import _user

        login_user(_user("ana"))
        return {"user": "ana"}

    return app


# --- what each store says is left of a session ----------------------------------------------------


SecondsLeft = Callable[[Flask, str], float]


def _memory_left(app: Flask, store_id: str) -> float:
    interface = app.session_interface
    assert isinstance(interface.records, MemoryRecords)
    return {key: left for key, _, left in interface.records.sessions.live()}[store_id]


@pytest.fixture
def store(request: pytest.FixtureRequest) -> tuple[dict[str, object], SecondsLeft]:
    """The host app's config on one backend, and how many seconds its store gives a record."""
    if request.param == "memory":
        return {"ENV": "test"}, _memory_left
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        client: redis.Redis = request.getfixturevalue("redis_client")
        return redis_production_env(server.url), lambda app, key: float(client.pttl(key)) / 1000
    environ = request.getfixturevalue("firestore_env")
    documents = request.getfixturevalue("firestore_client").collection("sessions")

    def firestore_left(app: Flask, key: str) -> float:
        expires_at = (documents.document(key).get().to_dict() or {})["expires_at"]
        return float((expires_at - datetime.now(UTC)).total_seconds())

    return dict(environ), firestore_left


def _about(seconds: float, expected: int) -> bool:
    return expected - 30 < seconds <= expected


@pytest.mark.parametrize("store", ["memory", "redis", "firestore"], indirect=True)
def test_a_cookieless_form_gets_the_short_lifetime_a_login_the_full_one(
    store: tuple[dict[str, object], SecondsLeft],
) -> None:
    config, left = store
    app = _host(config)
    visitor = Visitor(app)
    visitor.form()  # no cookie: a CSRF token creates the session
    assert is_anonymous_sid(visitor.sid())
    assert _about(left(app, visitor.store_id()), ANONYMOUS)

    visitor.login("ana")
    assert not is_anonymous_sid(visitor.sid())
    assert _about(left(app, visitor.store_id()), FULL)
    assert visitor.user() == "ana"

    response = visitor.post("/logout", {"csrf_token": visitor.form()})
    assert response.status_code == 200
    assert is_anonymous_sid(visitor.sid())  # end_session(): a new, anonymous id for the flash
    assert _about(left(app, visitor.store_id()), ANONYMOUS)


def _measure(client: redis.Redis, request: Callable[[], object]) -> dict[str, int]:
    client.config_resetstat()
    request()
    return commands(client)


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_reads_slide_each_kind_by_its_own_lifetime_in_one_round_trip(
    store: tuple[dict[str, object], SecondsLeft], redis_client: redis.Redis
) -> None:
    """A cookie sent back (a browser, or a flood that replays it) never buys an anonymous
    record more than its 30 minutes; a signed-in user's read never shortens theirs."""
    config, left = store
    app = _host(config)
    anonymous = Visitor(app)
    anonymous.form()
    key = anonymous.store_id()
    for _ in range(3):
        redis_client.expire(key, 60)
        assert _measure(redis_client, anonymous.form) == {"getex": 1}  # read only
        assert _about(left(app, key), ANONYMOUS)

    user = Visitor(app)
    user.login("bob")
    assert user.user() == "bob"  # shows (and so removes) the login's flash: a write
    key = user.store_id()
    redis_client.expire(key, 60)  # idle for almost 12 hours
    # Signed in: the user's revocation mark rides in the same pipeline (one round trip).
    assert _measure(redis_client, user.user) == {"getex": 1, "get": 1}
    assert _about(left(app, key), FULL)


@pytest.mark.parametrize("rotate_on_login", ["true", "false"])
@pytest.mark.parametrize("store", ["memory", "redis"], indirect=True)
def test_a_login_without_rotation_moves_the_session_to_a_signed_in_id(
    store: tuple[dict[str, object], SecondsLeft], rotate_on_login: str
) -> None:
    """Also with SESSION_ROTATE_ON_LOGIN=false: an anonymous id must not carry a user."""
    config, left = store
    app = _host({**config, "SESSION_ROTATE_ON_LOGIN": rotate_on_login})
    visitor = Visitor(app)
    visitor.form()
    anonymous_sid = visitor.sid()

    response = visitor.post("/login-without-rotation", {"csrf_token": visitor.form()})
    assert response.status_code == 200, response.text
    assert visitor.sid() != anonymous_sid
    assert not is_anonymous_sid(visitor.sid())
    assert _about(left(app, visitor.store_id()), FULL)
    replay = Visitor(app)  # the pre-login id signs nobody in
    replay.client.set_cookie(HOST_COOKIE_NAME, anonymous_sid, domain="localhost")
    assert replay.user() == "anonymous"
    assert visitor.user() == "ana"
    with app.test_request_context():
        assert len(user_sessions("ana")) == 1


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_a_session_id_of_the_previous_release_keeps_the_full_lifetime(
    store: tuple[dict[str, object], SecondsLeft],
) -> None:
    """Ids without the anonymous mark were issued before this release: no deploy shortens a
    session, signed in or not (it keeps its id, and its writes keep the full lifetime)."""
    config, left = store
    app = _host(config)
    old_sid = "previous-release-id-" + "x" * 30
    prefix = SessionStore.state(app).settings.session_key_prefix
    store_id = hashed_store_id(prefix, old_sid)
    store_session(app, store_id, {"_permanent": True, "counter": 1})
    visitor = Visitor(app)
    visitor.client.set_cookie(HOST_COOKIE_NAME, old_sid, domain="localhost")
    visitor.get("/me")
    assert _about(left(app, store_id), FULL)
    visitor.form()  # writes the CSRF token: same id, full lifetime
    assert visitor.sid() == old_sid
    assert _about(left(app, store_id), FULL)


def test_the_memory_store_drops_anonymous_sessions_before_users_when_full() -> None:
    """MemoryStore's bound drops the session closest to expiry: anonymous ones first."""
    app = Flask(__name__)
    app.config.update(SECRET_KEY=SECRET)
    SessionStore(app, client=MemoryStore(max_sessions=100))

    @app.post("/login/<user>")
    def login(user: str) -> str:
        rotate_session_id()
        session["_user_id"] = user
        return user

    @app.get("/me")
    def me() -> str:
        return str(session.get("_user_id", "anonymous"))

    @app.post("/visit")
    def visit() -> str:
        session["csrf_token"] = "token"
        return "ok"

    users = [app.test_client() for _ in range(50)]
    for number, client in enumerate(users):
        client.post(f"/login/u{number}")
    for _ in range(500):
        assert app.test_client().post("/visit").status_code == 200
    interface = app.session_interface
    assert isinstance(interface.records, MemoryRecords)
    assert len(interface.records.sessions.live()) == 100
    assert [client.get("/me").text for client in users] == [f"u{n}" for n in range(50)]


@pytest.mark.parametrize("store", ["firestore"], indirect=True)
def test_firestore_refreshes_an_anonymous_expiry_within_its_shorter_lifetime(
    store: tuple[dict[str, object], SecondsLeft], firestore_client: Any
) -> None:
    """A read-only request rewrites ``expires_at`` once it is the same fraction of the lifetime
    stale (a tenth by default: 3 of 30 minutes), so an anonymous visitor reading pages is not
    dropped at 30 minutes; a signed-in session keeps its 72-minute interval."""
    config, left = store
    app = _host(config)
    documents = firestore_client.collection("sessions")
    anonymous = Visitor(app)
    anonymous.form()
    key = anonymous.store_id()
    soon = datetime.now(UTC) + timedelta(minutes=25)  # 5 minutes stale
    documents.document(key).update({"expires_at": soon})
    anonymous.form()
    assert _about(left(app, key), ANONYMOUS)

    user = Visitor(app)
    user.login("ana")
    assert user.user() == "ana"  # shows (and so removes) the login's flash: a write
    key = user.store_id()
    later = datetime.now(UTC) + timedelta(hours=11)  # 1 hour stale: within the interval
    documents.document(key).update({"expires_at": later})
    assert user.user() == "ana"
    assert _about(left(app, key), 11 * 3600)


# --- the flood ------------------------------------------------------------------------------------

USERS = 50
FLOOD = 50_000
FLOOD_SECONDS = 240


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own (its memory limit and policy change), emptied."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def _flood(app: Flask, count: int) -> None:
    """``count`` cookie-less visitors of the form, each given a CSRF token: the request path
    of the app (``open_session`` of no cookie, the token Flask-WTF generates, ``save_session``)
    without the test client's cost per request."""
    interface = app.session_interface
    deadline = time.monotonic() + FLOOD_SECONDS
    with app.test_request_context("/form", base_url=BASE_URL) as context:
        for _ in range(count):
            visitor = interface.open_session(app, context.request)
            assert visitor is not None
            visitor["csrf_token"] = hashlib.sha1(os.urandom(64), usedforsecurity=False).hexdigest()
            response = Response()
            interface.save_session(app, visitor, response)
            assert response.status_code == 200
            assert time.monotonic() < deadline, "the flood is bounded in time"


@pytest.mark.parametrize(
    ("anonymous_lifetime", "flood", "maxmemory", "kept_at_least", "kept_at_most"),
    [
        pytest.param("30m", FLOOD, "8mb", USERS, USERS, id="short-anonymous"),
        # For comparison, smaller: the previous behaviour (every session lived 12 h).
        pytest.param("12h", FLOOD // 2, "4mb", 0, USERS // 2, id="old-full-lifetime"),
    ],
)
def test_a_flood_of_anonymous_sessions_evicts_no_signed_in_user(
    small_redis: RedisServer,
    anonymous_lifetime: str,
    flood: int,
    maxmemory: str,
    kept_at_least: int,
    kept_at_most: int,
) -> None:
    """50 users sign in (Flask-Login, CSRF), then 50,000 cookie-less visitors each get a
    session, in a Redis of 8 MB with maxmemory-policy volatile-ttl (the flood needs about twice
    that): every user is still signed in. With the previous behaviour the users, whose records
    expire first, are the first evicted."""
    client = small_redis.client()
    client.config_set("maxmemory", maxmemory)
    client.config_set("maxmemory-policy", "volatile-ttl")
    config: dict[str, object] = {
        **redis_production_env(small_redis.url),
        "SESSION_ANONYMOUS_LIFETIME": anonymous_lifetime,
    }
    app = _host(config)
    users = [Visitor(app) for _ in range(USERS)]
    for number, user in enumerate(users):
        user.login(f"user-{number}")

    _flood(app, flood)

    assert int(client.info("stats")["evicted_keys"]) > flood // 4  # the store was full
    kept = sum(user.user() == f"user-{number}" for number, user in enumerate(users))
    assert kept_at_least <= kept <= kept_at_most
    client.close()


# --- the eviction policy, as ping and /readyz report it -------------------------------------------


def _ping_app(url: str) -> Flask:
    app = Flask(__name__)
    app.config.update(SESSION_STORE_BACKEND="redis", REDIS_URL=url, SECRET_KEY=SECRET)
    SessionStore(app)
    app.register_blueprint(bp)
    return app


def test_readyz_and_ping_show_the_eviction_policy(small_redis: RedisServer) -> None:
    client = small_redis.client()
    client.config_set("maxmemory-policy", "volatile-ttl")
    app = _ping_app(small_redis.url)
    readiness = app.test_client().get("/readyz")
    assert readiness.status_code == 200
    assert readiness.json == {
        "status": "ready",
        "session_store": "redis",
        "topology": "standalone",
        "maxmemory_policy": "volatile-ttl",
    }
    result = CliRunner().invoke(
        session_store_cli,
        ["ping"],
        env={"SESSION_STORE_BACKEND": "redis", "REDIS_URL": small_redis.url},
    )
    assert result.exit_code == 0, result.output
    assert "topology standalone, maxmemory_policy volatile-ttl" in result.output
    assert "warning" not in result.output
    client.close()


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lfu", "allkeys-random"])
def test_an_eviction_policy_by_use_is_warned_once(
    small_redis: RedisServer, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = small_redis.client()
    client.config_set("maxmemory-policy", policy)
    app = _ping_app(small_redis.url)
    with caplog.at_level(logging.WARNING, logger="pyloto_corp.session_store"):
        for _ in range(3):
            readiness = app.test_client().get("/readyz")
            assert readiness.status_code == 200  # a warning, not unreadiness
            body = readiness.json
            assert body is not None
            assert body["maxmemory_policy"] == policy
            assert "volatile-ttl" in body["maxmemory_policy_warning"]
    warnings = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(warnings) == 1
    assert policy in warnings[0]
    assert "set maxmemory-policy volatile-ttl" in warnings[0]
    client.close()


def test_a_server_that_refuses_info_is_still_ready(small_redis: RedisServer) -> None:
    """An ACL user without INFO (nor CONFIG): the policy is unknown, the store is ready."""
    client = small_redis.client()
    client.acl_setuser(
        "sessions", enabled=True, passwords=["+acl-pass-31"], keys="*", commands=["+@all", "-info"]
    )
    url = f"redis://sessions:acl-pass-31@127.0.0.1:{small_redis.port}/0"
    readiness = _ping_app(url).test_client().get("/readyz")
    assert readiness.status_code == 200
    assert readiness.json is not None
    assert readiness.json["maxmemory_policy"] == "unknown (INFO refused)"
    assert "acl-pass-31" not in readiness.text
    client.close()


# --- the setting ----------------------------------------------------------------------------------


def test_session_anonymous_lifetime_is_parsed_and_validated() -> None:
    default = Settings.from_env({})
    assert default.anonymous_lifetime == timedelta(minutes=30)
    assert default.redacted()["SESSION_ANONYMOUS_LIFETIME"] == 1800
    assert Settings.from_env({"SESSION_ANONYMOUS_LIFETIME": "5m"}).anonymous_lifetime == timedelta(
        minutes=5
    )
    short = Settings.from_env({"SESSION_LIFETIME": "10m"})
    assert short.anonymous_lifetime == timedelta(minutes=10)  # never longer than the idle one
    assert short.validate() == []

    longer = Settings.from_env({"SESSION_LIFETIME": "1h", "SESSION_ANONYMOUS_LIFETIME": "2h"})
    zero = Settings.from_env({"SESSION_ANONYMOUS_LIFETIME": "0"})
    for settings in (longer, zero):
        (problem,) = settings.validate()
        assert problem.startswith("SESSION_ANONYMOUS_LIFETIME must be a positive duration")
        assert "at most SESSION_LIFETIME" in problem
    (unparsed,) = Settings.from_env({"SESSION_ANONYMOUS_LIFETIME": "soon"}).validate()
    assert unparsed.startswith("SESSION_ANONYMOUS_LIFETIME:")


def test_session_anonymous_lifetime_from_app_config_is_used() -> None:
    app = Flask(__name__)
    app.config.update(SESSION_ANONYMOUS_LIFETIME=timedelta(minutes=5), SECRET_KEY=SECRET)
    SessionStore(app)
    app.register_blueprint(bp)
    client = app.test_client()
    client.post("/session/counter")
    interface = app.session_interface
    assert isinstance(interface.records, MemoryRecords)
    ((_, _, seconds_left),) = interface.records.sessions.live()
    assert 270 < seconds_left <= 300
    assert SessionStore.state(app).settings.anonymous_lifetime == timedelta(minutes=5)


def test_a_lifetime_shortened_at_runtime_bounds_the_anonymous_one_too() -> None:
    app = Flask(__name__)
    app.config.update(SECRET_KEY=SECRET)
    SessionStore(app)
    app.register_blueprint(bp)
    app.permanent_session_lifetime = timedelta(minutes=2)
    app.test_client().post("/session/counter")
    interface = app.session_interface
    assert isinstance(interface.records, MemoryRecords)
    ((_, _, seconds_left),) = interface.records.sessions.live()
    assert 110 < seconds_left <= 120
