"""Redis backend specifics, counted on the real server with INFO commandstats."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from flask import Flask, session

from pyloto_corp.config.settings import Settings
from pyloto_corp.records.redis import options as redis_options
from pyloto_corp.records.redis import store as redis_store
from pyloto_corp.records.redis.options import parse_url
from pyloto_corp.records.redis.store import RedisRecords
from pyloto_corp.session_store import SessionStore
from pyloto_corp.session_store.base import hashed_store_id
from tests.conftest import SECRET, MakeApp, cookie_name
from tests.redis_commands import commands
from tests.services import free_port


def _measure(client: redis.Redis, request: object) -> dict[str, int]:
    client.config_resetstat()
    assert callable(request)
    request()
    return commands(client)


@pytest.fixture
def app(make_app: MakeApp, redis_env: dict[str, str]) -> Flask:
    # Anonymous sessions too get the full hour here (tests/session_store/test_anonymous.py
    # covers the shorter timeout of sessions without a user).
    return make_app(**redis_env, SESSION_LIFETIME="1h", SESSION_ANONYMOUS_LIFETIME="1h")


def test_commands_per_request(app: Flask, redis_client: redis.Redis) -> None:
    client = app.test_client()
    # Round trips: each script call is one, whatever it runs inside Redis. A server that does
    # not know a script yet answers NOSCRIPT once: it is loaded, and the call repeated.
    redis_client.script_flush()
    first = app.test_client()
    assert _measure(redis_client, lambda: first.post("/session/counter")) == {
        "evalsha": 2,
        "script|load": 1,
    }
    first.get("/session/counter")
    first.delete("/session")  # loads the retire script too
    assert _measure(redis_client, lambda: client.get("/session/counter")) == {}
    assert _measure(redis_client, lambda: client.post("/session/counter")) == {"evalsha": 1}
    assert _measure(redis_client, lambda: client.get("/session/counter")) == {"getex": 1}
    assert _measure(redis_client, lambda: client.post("/session/counter")) == {
        "getex": 1,
        "evalsha": 1,
    }
    # A logout retires the id (one script call): see test_login_sticks.py.
    assert _measure(redis_client, lambda: client.delete("/session")) == {"getex": 1, "evalsha": 1}


def test_reading_slides_the_idle_timeout(app: Flask, redis_client: redis.Redis) -> None:
    client = app.test_client()
    client.post("/session/counter")
    (key,) = redis_client.keys("session:*")
    redis_client.expire(key, 5)  # as if the session had been idle for almost an hour
    client.get("/session/counter")
    assert redis_client.ttl(key) > 3590


def test_read_only_request_sets_no_cookie(app: Flask) -> None:
    """The cookie expires at the absolute lifetime, so reads need not re-send it."""
    client = app.test_client()
    assert "Set-Cookie" in client.post("/session/counter").headers
    response = client.get("/session/counter")
    assert "Set-Cookie" not in response.headers
    assert response.headers["Vary"] == "Cookie"


def test_stored_ttl_is_the_session_lifetime(app: Flask, redis_client: redis.Redis) -> None:
    app.test_client().post("/session/counter")
    (key,) = redis_client.keys("session:*")
    lifetime = SessionStore.state(app).settings.session_lifetime
    assert lifetime == timedelta(hours=1)
    assert 3590 < redis_client.ttl(key) <= 3600


def test_production_cookie_is_secure_httponly_lax(app: Flask) -> None:
    header = app.test_client().post("/session/counter").headers["Set-Cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in header.split(";")}
    assert {"secure", "httponly"} <= attributes
    assert "SameSite=Lax" in header


def test_key_is_prefix_plus_sha256(app: Flask, redis_client: redis.Redis) -> None:
    header = app.test_client().post("/session/counter").headers["Set-Cookie"]
    sid = header.split(";")[0].split("=", 1)[1]
    assert redis_client.keys("*") == [hashed_store_id("session:", sid).encode()]
    assert len(sid) >= 43  # 32 random bytes, base64url


def test_a_login_costs_one_round_trip_more_for_the_user_index(
    app: Flask, redis_client: redis.Redis
) -> None:
    """Read, create the new id, retire the old one, and one index update; read-only requests of
    a logged-in session stay at one round trip: the GETEX and the GET of the user's revocation
    mark, pipelined (test_revoke.py counts the socket writes)."""
    from pyloto_corp.session_store import rotate_session_id

    @app.post("/login-as-ana")
    def login() -> dict[str, bool]:
        rotate_session_id()
        session["_user_id"] = "ana"
        return {"ok": True}

    client = app.test_client()
    client.post("/session/counter")
    client.post("/login-as-ana")  # the index script is loaded once
    client.post("/session/counter")
    assert _measure(redis_client, lambda: client.post("/login-as-ana")) == {
        "getex": 1,  # the read
        "get": 1,  # pipelined with it: the user's revocation mark
        "evalsha": 3,  # the new id's record, the old id retired, the user index
        "zrem": 1,  # the previous login's index entry: this session's old id
    }
    assert _measure(redis_client, lambda: client.get("/session/counter")) == {
        "getex": 1,
        "get": 1,
    }


@pytest.mark.parametrize(
    ("url", "mode", "tls", "hosts", "db", "service"),
    [
        ("redis://h:6380/2", "standalone", False, (("h", 6380),), 2, None),
        ("rediss://:pw@10.0.0.3:6378", "standalone", True, (("10.0.0.3", 6378),), 0, None),
        ("redis://[::1]:7000", "standalone", False, (("::1", 7000),), 0, None),
        ("redis+cluster://a:7000,b:7001", "cluster", False, (("a", 7000), ("b", 7001)), 0, None),
        ("rediss+cluster://u:p@a:7000/0", "cluster", True, (("a", 7000),), 0, None),
        (
            "redis+sentinel://s1,s2:26380/mymaster/3",
            "sentinel",
            False,
            (("s1", 26379), ("s2", 26380)),
            3,
            "mymaster",
        ),
    ],
)
def test_redis_url_forms(
    url: str, mode: str, tls: bool, hosts: tuple[tuple[str, int], ...], db: int, service: str | None
) -> None:
    target = parse_url(url)
    assert (target.mode, target.tls, target.hosts, target.db, target.service) == (
        mode,
        tls,
        hosts,
        db,
        service,
    )


def test_a_password_with_reserved_characters_is_read_and_never_shown() -> None:
    target = parse_url("redis://user:p%40ss%2Fw%3Frd@cache:6379/1")
    assert (target.username, target.password) == ("user", "p@ss/w?rd")
    raw = parse_url("redis://:a/b#c@cache:6379")  # not percent-encoded: the last @ still splits
    assert raw.password == "a/b#c"
    assert "p@ss" not in repr(target)
    assert "a/b#c" not in repr(raw)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("redis+cluster://a:7000/1", "a Redis Cluster has only db 0"),
        ("redis+sentinel://s1:26379", "names the service after the hosts"),
        ("redis://a:1,b:2", "a redis:// URL names one host"),
        ("redis://a:6379/?socket_timeout=3600", "must not carry options after '?'"),
        ("redis+cluster://a:0", "not a valid Redis URL"),
        ("memcached://a:1", "not a valid Redis URL"),
    ],
)
def test_redis_url_problems_name_the_fix(url: str, fragment: str) -> None:
    problems = Settings(
        session_store_backend="redis", store=redis_options.Options(url=url)
    ).validate()
    assert len(problems) == 1
    assert fragment in problems[0]


def test_a_cluster_url_builds_no_client_until_the_first_request(make_app: MakeApp) -> None:
    """RedisCluster reads the slot map when it is built: that waits for the first request (in
    the serving process, after gunicorn forks), so a cluster that is down is a 503, not a boot
    crash."""
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    app = make_app(
        ENV="production", SESSION_STORE_BACKEND="redis", REDIS_URL=url, SECRET_KEY=SECRET
    )
    interface = app.session_interface
    assert isinstance(interface.records, RedisRecords)
    assert interface.records.has_client() is False
    client = app.test_client()
    client.set_cookie(cookie_name(app), "x" * 43)
    response = client.get("/session/counter", headers={"Accept": "application/json"})
    assert response.status_code == 503
    assert app.test_client().get("/readyz").status_code == 503


def test_a_record_rewritten_by_the_previous_release_mid_request_is_written_whole(
    app: Flask, redis_client: redis.Redis
) -> None:
    """A rolling deploy: an instance of the previous release rewrites the session in its own
    layout (a msgpack map) while a request of this release runs; that request's write cannot
    merge into it, so it writes its own session whole instead of failing."""
    import msgspec

    @app.post("/late")
    def late() -> dict[str, bool]:
        session["late"] = True
        key = hashed_store_id("session:", session.sid)  # type: ignore[attr-defined]
        redis_client.set(key, msgspec.msgpack.encode({"counter": 7}), keepttl=True)
        return {"ok": True}

    client = app.test_client()
    client.post("/session/counter")
    assert client.post("/late").status_code == 200
    assert client.get("/session/counter").json == {"counter": 1}  # this request's view won


@pytest.mark.parametrize(
    "data",
    [b"\xc1\x02\x00\x00\x00\x05ab", b"\xc1\x02\x00\x00\x00\x01a\x00\x00\x01\x00x", b"\xc1\x02\xff"],
)
def test_a_broken_record_is_a_fresh_session(
    app: Flask, redis_client: redis.Redis, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ValueError, match="record"):
        redis_store.parse_record(data)
    client = app.test_client()
    client.post("/session/counter")
    (key,) = redis_client.keys("session:*")
    redis_client.set(key, data, ex=600)
    assert client.get("/session/counter").json == {"counter": 0}
    assert "Discarded undecodable session data" in caplog.text
