"""Redis authentication and transport on real servers: Memorystore-style IAM authentication with
a rotating token, a Redis Cluster that speaks only TLS, and a plain cluster named by REDIS_URL.

Real redis-server processes on loopback only. The one stand-in is the token source: a fake of
Google's token endpoint (what ``google_access_token`` would ask), so a test can rotate the token
and make it fail. The measured figures are printed (``-s`` or ``-rA`` shows them).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from werkzeug.test import TestResponse

from pyloto_corp import ConfigurationError, Settings, create_app
from pyloto_corp.records.redis import options as redis_options
from pyloto_corp.records.redis import scripts as redis_scripts
from pyloto_corp.records.redis.client import (
    IAM_REFRESH_MARGIN,
    RETRIES,
    IamCredentialProvider,
    PinnedSSLConnection,
)
from pyloto_corp.records.redis.store import RedisRecords
from pyloto_corp.session_store import SessionStore
from pyloto_corp.session_store.base import hashed_store_id
from pyloto_corp.views import bp
from tests.conftest import DEPLOYED_COOKIE, SECRET, TLS_PASSWORD, MakeApp, redis_production_env
from tests.redis_commands import commands
from tests.services import RedisClusterNodes, RedisServer
from tests.tls_services import TlsFiles, TlsRedisCluster, TlsRedisServer, TlsSentinel

STORE_LOGGER = "pyloto_corp.session_store"
TOKENS = ("tok-1", "tok-2")
ADMIN_PASSWORD = "admin-pass-16180339"
JSON = {"Accept": "application/json"}
#: IAM over plaintext redis:// (these tests' servers speak no TLS), allowed by name.
PLAINTEXT_IAM = {"REDIS_IAM_AUTH": "true", "REDIS_ALLOW_PLAINTEXT_AUTH": "true"}


# -- helpers ---------------------------------------------------------------------------------------


def _env(url: str, **extra: str) -> dict[str, str]:
    return redis_production_env(url, **extra)


def _http(app: Flask) -> FlaskClient:
    """A test client without a cookie jar: every request names its cookie explicitly."""
    return app.test_client(use_cookies=False)


def _as(sid: str) -> dict[str, str]:
    return {"Cookie": f"{DEPLOYED_COOKIE}={sid}", **JSON}


def _sid(response: TestResponse) -> str:
    for header in response.headers.getlist("Set-Cookie"):
        name, _, rest = header.partition("=")
        if name == DEPLOYED_COOKIE:
            return rest.split(";", 1)[0]
    raise AssertionError(f"no session cookie: {response.headers}")


def _store_lines(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == STORE_LOGGER and r.levelno >= level]


def _counter(app: Flask, sid: str) -> int:
    response = _http(app).get("/session/counter", headers=_as(sid))
    assert response.status_code == 200, response.get_data(as_text=True)
    return int(response.get_json()["counter"])


def _holds_session(admin: Any) -> Any:
    """``holds(store_id)``: the store keeps a live session there (not the marker a logout
    leaves, not nothing)."""

    def holds(store_id: str) -> bool:
        data = admin.get(store_id)
        return isinstance(data, bytes) and data[:2] == redis_scripts.RECORD_MARKER

    return holds


def _round_trip(app: Flask, exists: Any) -> dict[str, Any]:
    """Create, read, modify and log out one session; ``exists(store_id)`` asks the store
    whether it holds the session."""
    http = _http(app)
    created = http.post("/session/counter", headers=JSON)
    assert created.status_code == 200, created.get_data(as_text=True)
    sid = _sid(created)
    store_id = hashed_store_id(SessionStore.state(app).settings.session_key_prefix, sid)
    assert exists(store_id)
    assert _counter(app, sid) == 1
    modified = http.post("/session/counter", headers=_as(sid))
    assert modified.status_code == 200
    assert modified.json == {"counter": 2}
    assert _counter(app, sid) == 2
    logout = http.delete("/session", headers=_as(sid))
    assert logout.status_code == 200
    assert logout.json == {"cleared": True}
    assert f"{DEPLOYED_COOKIE}=;" in logout.headers.get("Set-Cookie", "")
    assert not exists(store_id)
    assert _counter(app, sid) == 0  # the old cookie names nothing any more
    return {"store_id": store_id}


# -- 1. IAM authentication with a rotating token ---------------------------------------------------


class FakeTokenSource:
    """Stands in for Google's token endpoint: ``(token, expires_at_epoch)``, counted."""

    def __init__(self, token: str, lifetime: float) -> None:
        self.token = token
        self.lifetime = lifetime
        self.failing = False
        self.calls = 0
        self.expires_at = 0.0

    def __call__(self) -> tuple[str, float]:
        self.calls += 1
        if self.failing:
            # Even the source's own error text holds a token: it must not reach a log either.
            raise RuntimeError(f"token endpoint refused; last token was {self.token}")
        self.expires_at = time.time() + self.lifetime
        return self.token, self.expires_at


def _iam_client(port: int, source: FakeTokenSource) -> redis.Redis:
    """Built the way create_client builds a standalone IAM client, with the fake source."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        credential_provider=IamCredentialProvider(source),
        socket_timeout=1,
        socket_connect_timeout=1,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), RETRIES, (redis.ConnectionError,)),
        health_check_interval=0,
        driver_info=None,
    )


def _iam_app(port: int, client: redis.Redis) -> Flask:
    app = Flask("iam_app")
    app.testing = True
    settings = Settings(
        environment="production",
        secret_key=SECRET,
        session_store_backend="redis",
        store=redis_options.Options(url=f"redis://127.0.0.1:{port}/0", iam_auth=True),
    )
    SessionStore(app, settings, client=client)
    app.register_blueprint(bp)
    return app


@pytest.fixture
def iam_redis(own_redis: RedisServer) -> Iterator[redis.Redis]:
    """``own_redis`` whose default user needs the password "tok-1"; yields an admin client (an
    ACL user of its own, so rotating the default user's passwords never locks it out)."""
    bootstrap = own_redis.client()
    bootstrap.execute_command(
        "ACL", "SETUSER", "admin", "on", f">{ADMIN_PASSWORD}", "~*", "&*", "+@all"
    )
    bootstrap.execute_command("ACL", "SETUSER", "default", "on", ">tok-1")
    bootstrap.close()
    admin = redis.Redis(
        port=own_redis.port, username="admin", password=ADMIN_PASSWORD, socket_timeout=2
    )
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=own_redis.port, socket_timeout=2).ping()  # no password: refused
    yield admin
    admin.close()


def _handshakes(admin: redis.Redis) -> int:
    """Connections that authenticated since the last CONFIG RESETSTAT (HELLO ... AUTH under
    RESP3, AUTH under RESP2); the admin's own connection is already open."""
    stats = admin.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("hello", "auth"))


def _open_connections(client: redis.Redis, count: int) -> None:
    """Check ``count`` connections out of the pool at once (as concurrent requests would), so
    the pool has to open the ones it lacks, then give them back."""
    pool = client.connection_pool
    connections = [pool.get_connection() for _ in range(count)]
    for connection in connections:
        pool.release(connection)


def _accepts(token: str, port: int) -> bool:
    probe = redis.Redis(port=port, password=token, socket_timeout=2)
    try:
        return bool(probe.ping())
    except redis.AuthenticationError:
        return False
    finally:
        probe.close()


def test_iam_auth_from_env_installs_the_iam_provider_without_connecting(
    make_app: MakeApp,
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        app = make_app(**_env(f"redis://127.0.0.1:{port}/0", **PLAINTEXT_IAM))
        interface = SessionStore.state(app).interface
        assert isinstance(interface.records, RedisRecords)
        client = interface.records.client
        assert isinstance(client, redis.Redis)
        kwargs = client.connection_pool.connection_kwargs
        assert isinstance(kwargs["credential_provider"], IamCredentialProvider)
        assert kwargs.get("password") is None
        assert kwargs.get("username") is None
        with pytest.raises(BlockingIOError):  # nobody dialled: building the app is no IO
            listener.accept()


def test_iam_auth_with_a_password_in_the_url_is_a_problem() -> None:
    password = "url-pw-2718281828"
    environ = _env(f"redis://:{password}@h:6379", **PLAINTEXT_IAM)
    problems = Settings.from_env(environ).validate()
    iam = [problem for problem in problems if "REDIS_IAM_AUTH" in problem]
    assert len(iam) == 1, problems
    assert "password" in iam[0], iam
    assert "remove it from the URL" in iam[0], iam
    assert all(password not in problem for problem in problems)
    with pytest.raises(ConfigurationError) as raised:
        create_app(Settings.from_env(environ))
    assert "remove it from the URL" in str(raised.value)
    assert password not in str(raised.value)
    assert password not in repr(raised.value)
    # Without the password the same settings are valid.
    assert Settings.from_env(_env("redis://h:6379", **PLAINTEXT_IAM)).validate() == []


def test_iam_token_rotation_reaches_new_connections_only(
    own_redis: RedisServer, iam_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin, port = iam_redis, own_redis.port
    # tok-1 is fresh for LEAD more seconds, then inside the provider's refresh margin.
    lead = 3.0
    source = FakeTokenSource("tok-1", lifetime=IAM_REFRESH_MARGIN + lead)
    client = _iam_client(port, source)
    app = _iam_app(port, client)
    http = _http(app)
    bodies: list[str] = []
    figures: dict[str, Any] = {}

    def request(method: str, sid: str | None = None) -> TestResponse:
        headers = _as(sid) if sid else JSON
        response = http.open("/session/counter", method=method, headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)
        bodies.append(str(response.headers) + response.get_data(as_text=True))
        return response

    # A: tok-1 works; four pooled connections cost one token fetch, not one per connection.
    admin.config_resetstat()
    sid = _sid(request("POST"))
    assert request("GET", sid).json == {"counter": 1}
    _open_connections(client, 4)
    figures["A"] = {"source_calls": source.calls, "connections_opened": _handshakes(admin)}
    assert figures["A"] == {"source_calls": 1, "connections_opened": 4}
    assert time.time() < source.expires_at - IAM_REFRESH_MARGIN, "phase A outlived tok-1's lead"

    # B: the server accepts tok-2 as well; the source now hands out tok-2. A new connection
    # still gets the cached tok-1 (fresh for a few more seconds): no fetch.
    admin.execute_command("ACL", "SETUSER", "default", ">tok-2")
    source.token, source.lifetime = "tok-2", 3600.0
    client.connection_pool.disconnect()
    admin.config_resetstat()
    assert request("POST", sid).json == {"counter": 2}
    figures["B"] = {"source_calls": source.calls, "connections_opened": _handshakes(admin)}
    assert figures["B"] == {"source_calls": 1, "connections_opened": 1}

    # C: tok-1 is now within the refresh margin; an open connection is not touched by that.
    time.sleep(max(0.0, source.expires_at - IAM_REFRESH_MARGIN - time.time()) + 0.1)
    admin.config_resetstat()
    assert request("POST", sid).json == {"counter": 3}
    assert (source.calls, _handshakes(admin)) == (1, 0)

    # D: the server drops tok-1. Connections that authenticated with it keep working.
    admin.execute_command("ACL", "SETUSER", "default", "<tok-1")
    assert not _accepts("tok-1", port)
    assert _accepts("tok-2", port)
    admin.config_resetstat()
    assert request("GET", sid).json == {"counter": 3}
    figures["D"] = {"source_calls": source.calls, "connections_opened": _handshakes(admin)}
    assert figures["D"] == {"source_calls": 1, "connections_opened": 0}

    # E: new connections: the provider fetches once (tok-1 expires within 5 minutes) and every
    # new connection authenticates with tok-2 (the only password the server still accepts).
    client.connection_pool.disconnect()
    admin.config_resetstat()
    assert request("POST", sid).json == {"counter": 4}
    _open_connections(client, 4)
    assert request("GET", sid).json == {"counter": 4}
    figures["E"] = {"source_calls": source.calls, "connections_opened": _handshakes(admin)}
    assert figures["E"] == {"source_calls": 2, "connections_opened": 4}
    assert http.delete("/session", headers=_as(sid)).status_code == 200

    print("IAM rotation:", json.dumps(figures))
    assert _store_lines(caplog, logging.WARNING) == []
    for token in TOKENS:
        assert token not in caplog.text
        assert all(token not in body for body in bodies)
    client.close()


def test_iam_failing_token_source_is_503_logged_once_naming_iam(
    own_redis: RedisServer, iam_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = own_redis.port
    # Expiring in 60 s: inside the refresh margin, so every new connection asks the source;
    # while the source fails, the cached token (still valid for a minute) keeps working.
    hiccup = FakeTokenSource("tok-1", lifetime=60)
    steady = _iam_client(port, hiccup)
    steady_http = _http(_iam_app(port, steady))
    assert steady_http.post("/session/counter", headers=JSON).status_code == 200
    hiccup.failing = True
    steady.connection_pool.disconnect()
    calls = hiccup.calls
    assert steady_http.post("/session/counter", headers=JSON).status_code == 200
    assert hiccup.calls > calls  # it asked, and fell back on the token it had
    steady.close()

    # Expiring in 20 s: too close to its end to be used when no new token comes.
    source = FakeTokenSource("tok-1", lifetime=20)
    client = _iam_client(port, source)
    app = _iam_app(port, client)
    http = _http(app)
    created = http.post("/session/counter", headers=JSON)
    assert created.status_code == 200
    sid = _sid(created)

    source.token, source.failing = "tok-2", True
    client.connection_pool.disconnect()
    figures: dict[str, Any] = {}
    for name, method, headers in (
        ("read", "GET", _as(sid)),  # the session cannot be read
        ("new", "POST", JSON),  # a new session cannot be written
    ):
        caplog.clear()
        calls = source.calls
        started = time.monotonic()
        response = http.open("/session/counter", method=method, headers=headers)
        elapsed = time.monotonic() - started
        lines = _store_lines(caplog)
        figures[name] = {
            "status": response.status_code,
            "seconds": round(elapsed, 3),
            "source_calls": source.calls - calls,
            "log": lines,
        }
        assert response.status_code == 503
        assert response.headers.get("Retry-After") == "5"
        assert "Set-Cookie" not in response.headers
        assert 1 <= source.calls - calls <= 1 + RETRIES
        text = str(response.headers) + response.get_data(as_text=True) + caplog.text
        for token in TOKENS:
            assert token not in text
        assert len(lines) == 1, lines
    client.close()
    print("IAM failing source:", json.dumps(figures))
    # The one line says why: the token could not be had (not just "ConnectionError").
    logged = [line for figure in figures.values() for line in figure["log"]]
    assert all("IAM" in line for line in logged), logged


# -- 2. a Redis Cluster with TLS only --------------------------------------------------------------


@pytest.fixture(scope="module")
def mismatched_tls_cluster(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> Iterator[TlsRedisCluster]:
    """3 TLS-only primaries whose certificate (same CA) names another host: Memorystore's case."""
    cluster = TlsRedisCluster(
        tmp_path_factory.mktemp("tls-cluster-mismatched"),
        tls_files,
        password=TLS_PASSWORD,
        mismatched=True,
    ).start()
    yield cluster
    cluster.stop()


def _tls_admin(cluster: TlsRedisCluster) -> RedisCluster:
    return RedisCluster(
        host="127.0.0.1",
        port=cluster.ports[0],
        password=cluster.password,
        ssl=True,
        ssl_ca_certs=str(cluster.files.ca),
        ssl_check_hostname=False,
        socket_timeout=2,
    )


def _assert_ready_cluster(app: Flask) -> dict[str, Any]:
    response = _http(app).get("/readyz")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert isinstance(body, dict)
    assert body["topology"] == "cluster"
    assert body["primaries"] == 3
    assert body["slots_covered"] == 16384
    assert "127.0.0.1" not in response.get_data(as_text=True)
    return body


def _assert_tls_failure(app: Flask, caplog: pytest.LogCaptureFixture, detail: str) -> list[str]:
    caplog.clear()
    response = _http(app).post("/session/counter", headers=JSON)
    assert response.status_code == 503
    assert response.headers.get("Retry-After") == "5"
    assert _http(app).get("/readyz").status_code == 503
    lines = _store_lines(caplog)
    assert lines, "nothing logged"
    assert all("TLS handshake failed" in line for line in lines), lines
    assert any(detail in line for line in lines), lines
    assert TLS_PASSWORD not in caplog.text
    return lines


def test_tls_cluster_session_round_trip_and_readiness(
    make_app: MakeApp, tls_cluster: TlsRedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app = make_app(**_env(tls_cluster.url(), REDIS_SSL_CA_CERTS=str(tls_cluster.files.ca)))
    interface = SessionStore.state(app).interface
    assert isinstance(interface.records, RedisRecords)
    admin = _tls_admin(tls_cluster)
    try:
        _round_trip(app, _holds_session(admin))
    finally:
        admin.close()
    client = interface.records.client
    assert isinstance(client, RedisCluster)
    # Discovered from two seeds: all three primaries, each reached over TLS.
    assert sorted(node.port for node in client.get_primaries()) == sorted(tls_cluster.ports)
    body = _assert_ready_cluster(app)
    print("TLS cluster ready:", json.dumps(body))
    assert _store_lines(caplog, logging.WARNING) == []
    assert TLS_PASSWORD not in caplog.text


def test_tls_cluster_with_the_wrong_ca_is_503_naming_the_handshake(
    make_app: MakeApp, tls_cluster: TlsRedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    url = tls_cluster.url()
    app = make_app(**_env(url, REDIS_SSL_CA_CERTS=str(tls_cluster.files.other_ca)))
    lines = _assert_tls_failure(app, caplog, "certificate")
    print("TLS cluster wrong CA:", json.dumps(lines))
    # No CA at all: the system store does not know the test CA either.
    lines = _assert_tls_failure(make_app(**_env(url)), caplog, "certificate")
    print("TLS cluster no CA:", json.dumps(lines))


def test_tls_cluster_certificate_naming_another_host_needs_check_hostname_off(
    make_app: MakeApp,
    mismatched_tls_cluster: TlsRedisCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster = mismatched_tls_cluster
    ca = str(cluster.files.ca)
    checked = make_app(**_env(cluster.url(), REDIS_SSL_CA_CERTS=ca))
    lines = _assert_tls_failure(checked, caplog, "mismatch")
    print("TLS cluster name mismatch:", json.dumps(lines))

    # REDIS_SSL_CHECK_HOSTNAME=false (Memorystore): the name is not checked, the CA still is.
    app = make_app(**_env(cluster.url(), REDIS_SSL_CA_CERTS=ca, REDIS_SSL_CHECK_HOSTNAME="false"))
    caplog.clear()
    admin = _tls_admin(cluster)
    try:
        _round_trip(app, _holds_session(admin))
    finally:
        admin.close()
    _assert_ready_cluster(app)
    assert _store_lines(caplog) == []
    wrong_ca = make_app(
        **_env(
            cluster.url(),
            REDIS_SSL_CA_CERTS=str(cluster.files.other_ca),
            REDIS_SSL_CHECK_HOSTNAME="false",
        )
    )
    _assert_tls_failure(wrong_ca, caplog, "certificate")


# -- 3. a plain Redis Cluster named by REDIS_URL ---------------------------------------------------

SESSIONS = 200


def test_cluster_url_spreads_sessions_over_every_primary_one_round_trip_per_read(
    make_app: MakeApp, redis_cluster: RedisClusterNodes
) -> None:
    nodes = {port: redis.Redis(port=port, socket_timeout=2) for port in redis_cluster.ports}
    try:
        for node in nodes.values():
            node.flushall()
        seeds = ",".join(f"127.0.0.1:{port}" for port in redis_cluster.ports[:2])
        app = make_app(**_env(f"redis+cluster://{seeds}"))
        interface = SessionStore.state(app).interface
        assert isinstance(interface.records, RedisRecords)
        client = interface.records.client
        assert isinstance(client, RedisCluster)

        http = _http(app)
        sids = []
        for _ in range(SESSIONS):
            response = http.post("/session/counter", headers=JSON)
            assert response.status_code == 200
            sids.append(_sid(response))
        per_primary = {port: int(node.dbsize()) for port, node in nodes.items()}
        print("sessions per primary:", json.dumps(per_primary))
        assert sum(per_primary.values()) == SESSIONS
        assert all(keys > 0 for keys in per_primary.values()), per_primary
        assert sorted(node.port for node in client.get_primaries()) == sorted(nodes)

        # Every session reads back (this also loads the read script on every primary).
        assert all(_counter(app, sid) == 1 for sid in sids)

        # One session on each primary: a read is one round trip over the whole cluster, a
        # change two (read + write), all on the primary that owns the key.
        prefix = SessionStore.state(app).settings.session_key_prefix
        owners: dict[int, str] = {}
        for sid in sids:
            owner = client.get_node_from_key(hashed_store_id(prefix, sid)).port
            owners.setdefault(owner, sid)
        assert sorted(owners) == sorted(nodes)
        counted: dict[str, Any] = {}
        for owner, sid in sorted(owners.items()):
            for method, expected in (
                ("GET", {"getex": 1}),
                ("POST", {"getex": 1, "evalsha": 1}),
            ):
                for node in nodes.values():
                    node.config_resetstat()
                response = http.open("/session/counter", method=method, headers=_as(sid))
                assert response.status_code == 200
                seen = {port: commands(node) for port, node in nodes.items()}
                counted[f"{method} on {owner}"] = seen
                assert seen[owner] == expected, seen
                assert all(not c for port, c in seen.items() if port != owner), seen
        print("round trips per primary:", json.dumps(counted))
    finally:
        for node in nodes.values():
            node.close()


# -- 4. TLS pinned to REDIS_SSL_CA_CERTS -----------------------------------------------------------

FOREIGN_PASSWORD = "foreign-pass-16180339"


def _auth_attempts(admin: Any) -> int:
    """AUTH/HELLO commands the server received since CONFIG RESETSTAT, accepted or not."""
    stats = admin.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get(field, 0))
        for name in ("auth", "hello")
        for field in ("calls", "failed_calls", "rejected_calls")
    )


@pytest.fixture
def public_ca(monkeypatch: pytest.MonkeyPatch, tls_files: TlsFiles) -> TlsFiles:
    """``other_ca`` stands in for a publicly trusted CA: it is what OpenSSL loads as the
    system trust store (SSL_CERT_FILE), where redis-py's default context looks."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.other_ca))
    return tls_files


@pytest.fixture
def foreign_tls_redis(tmp_path: Path, tls_files: TlsFiles) -> Iterator[TlsRedisServer]:
    """A TLS redis-server with a password, for 127.0.0.1, whose certificate ``other_ca``
    signed: not the CA the app is configured with."""
    server = TlsRedisServer(
        tmp_path,
        cert=tls_files.foreign_cert,
        key=tls_files.foreign_key,
        ca=tls_files.other_ca,
        password=FOREIGN_PASSWORD,
    ).start()
    yield server
    server.stop()


def test_pinned_ca_refuses_a_publicly_trusted_server_before_sending_the_password(
    make_app: MakeApp,
    public_ca: TlsFiles,
    foreign_tls_redis: TlsRedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Memorystore's advice (the CA file, hostname check off) must not let a server with any
    publicly trusted certificate receive the AUTH string."""
    server, files = foreign_tls_redis, public_ca
    admin = server.admin()
    try:
        # What redis-py does with ssl_ca_certs alone: the file is added to the system's CAs,
        # so this server passes and receives the password.
        admin.config_resetstat()
        naive = redis.Redis(
            host="127.0.0.1",
            port=server.port,
            password=FOREIGN_PASSWORD,
            ssl=True,
            ssl_ca_certs=str(files.ca),
            ssl_check_hostname=False,
            socket_timeout=2,
        )
        assert naive.ping()
        naive.close()
        assert _auth_attempts(admin) == 1

        admin.config_resetstat()
        caplog.set_level(logging.DEBUG)
        pinned = {"REDIS_SSL_CA_CERTS": str(files.ca), "REDIS_SSL_CHECK_HOSTNAME": "false"}
        app = make_app(**_env(server.url(), **pinned))
        lines = _assert_tls_failure(app, caplog, "certificate")
        print("TLS pinned, foreign server:", json.dumps(lines))
        assert _auth_attempts(admin) == 0  # the password never reached it
        assert FOREIGN_PASSWORD not in caplog.text

        # Pinned to the server's own CA, the same settings work (and authenticate).
        own = {"REDIS_SSL_CA_CERTS": str(files.other_ca), "REDIS_SSL_CHECK_HOSTNAME": "false"}
        good = make_app(**_env(server.url(), **own))
        _round_trip(good, _holds_session(admin))
        assert _auth_attempts(admin) >= 1
    finally:
        admin.close()


def test_pinned_ca_file_that_cannot_be_loaded_is_a_503_naming_the_variable(
    make_app: MakeApp, foreign_tls_redis: TlsRedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = foreign_tls_redis
    missing = server.workdir / "no-such-ca.pem"
    app = make_app(**_env(server.url(), REDIS_SSL_CA_CERTS=str(missing)))
    response = _http(app).post("/session/counter", headers=JSON)
    assert response.status_code == 503
    lines = _store_lines(caplog)
    assert lines, "nothing logged"
    assert all("REDIS_SSL_CA_CERTS cannot be loaded" in line for line in lines), lines
    assert FOREIGN_PASSWORD not in caplog.text


def test_pinned_ca_refuses_a_publicly_trusted_cluster_before_auth(
    make_app: MakeApp,
    tls_cluster: TlsRedisCluster,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The cluster's CA is the 'public' one here; the app pins another: every node refuses."""
    files = tls_cluster.files
    monkeypatch.setenv("SSL_CERT_FILE", str(files.ca))
    nodes = [tls_cluster.node_client(port) for port in tls_cluster.ports]
    try:
        naive = RedisCluster(
            host="127.0.0.1",
            port=tls_cluster.ports[0],
            password=tls_cluster.password,
            ssl=True,
            ssl_ca_certs=str(files.other_ca),
            ssl_check_hostname=False,
            socket_timeout=2,
        )
        assert naive.ping()  # redis-py alone: the other CA is added, the cluster passes
        naive.close()
        for node in nodes:
            node.config_resetstat()
        pinned = {"REDIS_SSL_CA_CERTS": str(files.other_ca), "REDIS_SSL_CHECK_HOSTNAME": "false"}
        app = make_app(**_env(tls_cluster.url(), **pinned))
        lines = _assert_tls_failure(app, caplog, "certificate")
        print("TLS pinned, foreign cluster:", json.dumps(lines))
        assert [_auth_attempts(node) for node in nodes] == [0] * len(nodes)
        # Pinned to the cluster's own CA: it works (round trip in the tests above as well).
        good = make_app(**_env(tls_cluster.url(), REDIS_SSL_CA_CERTS=str(files.ca)))
        _assert_ready_cluster(good)
        interface = SessionStore.state(good).interface
        assert isinstance(interface.records, RedisRecords)
        cluster = interface.records.client
        assert isinstance(cluster, RedisCluster)
        # Every node, the seeds and the one found in the slot map, connects pinned.
        pools = [node.redis_connection.connection_pool for node in cluster.get_nodes()]
        assert len(pools) == len(tls_cluster.ports)
        assert {pool.connection_class for pool in pools} == {PinnedSSLConnection}
        assert sum(_auth_attempts(node) for node in nodes) >= len(nodes)
    finally:
        for node in nodes:
            node.close()


# -- 5. transport settings that are refused --------------------------------------------------------

PLAIN_PASSWORD = "plain-pass-57721566"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{PLAIN_PASSWORD}@10.0.0.3:6379/0",
        f"redis://default:{PLAIN_PASSWORD}@10.0.0.3",
        f"redis+cluster://:{PLAIN_PASSWORD}@10.0.0.3:6379,10.0.0.4:6379",
        f"redis+sentinel://:{PLAIN_PASSWORD}@10.0.0.3:26379/mymaster",
    ],
)
@pytest.mark.parametrize(
    "where", [{"ENV": "production"}, {"ENV": "staging"}, {"ENV": "dev", "K_SERVICE": "api"}]
)
def test_a_deployed_plaintext_url_with_a_password_is_refused_unless_allowed(
    url: str, where: dict[str, str]
) -> None:
    environ = {**_env(url), **where}
    problems = Settings.from_env(environ).validate()
    assert len(problems) == 1, problems
    assert "REDIS_URL is plaintext" in problems[0]
    assert "REDIS_ALLOW_PLAINTEXT_AUTH=true" in problems[0]
    assert PLAIN_PASSWORD not in problems[0]
    with pytest.raises(ConfigurationError) as raised:
        create_app(Settings.from_env(environ))
    assert PLAIN_PASSWORD not in str(raised.value) + repr(raised.value)
    allowed = {**environ, "REDIS_ALLOW_PLAINTEXT_AUTH": "true"}
    assert Settings.from_env(allowed).validate() == []
    tls = {**environ, "REDIS_URL": url.replace("redis", "rediss", 1)}
    assert Settings.from_env(tls).validate() == []


def test_plaintext_is_fine_without_a_secret_or_outside_deployments() -> None:
    no_password = _env("redis+cluster://10.0.0.3:6379")
    assert Settings.from_env(no_password).validate() == []
    local = {**_env(f"redis://:{PLAIN_PASSWORD}@127.0.0.1:6379"), "ENV": "development"}
    assert Settings.from_env(local).validate() == []


def test_iam_auth_over_plaintext_is_refused_when_deployed() -> None:
    problems = Settings.from_env(_env("redis://10.0.0.3:6379", REDIS_IAM_AUTH="true")).validate()
    assert len(problems) == 1, problems
    assert "REDIS_IAM_AUTH=true" in problems[0]
    assert "REDIS_ALLOW_PLAINTEXT_AUTH" in problems[0]
    assert "access token" in problems[0]
    secured = _env("rediss://10.0.0.3:6378", REDIS_IAM_AUTH="true")
    assert Settings.from_env(secured).validate() == []


@pytest.mark.parametrize("environment", ["production", "development"])
def test_hostname_check_off_needs_the_ca(environment: str) -> None:
    environ = {**_env("rediss://10.0.0.3:6378"), "ENV": environment}
    environ["REDIS_SSL_CHECK_HOSTNAME"] = "false"
    problems = Settings.from_env(environ).validate()
    assert len(problems) == 1, problems
    assert "REDIS_SSL_CHECK_HOSTNAME=false needs REDIS_SSL_CA_CERTS" in problems[0]
    environ["REDIS_SSL_CA_CERTS"] = "/secrets/memorystore-ca.pem"
    assert Settings.from_env(environ).validate() == []


def test_a_ca_file_with_a_plaintext_url_is_refused() -> None:
    environ = _env("redis://10.0.0.3:6379", REDIS_SSL_CA_CERTS="/secrets/ca.pem")
    problems = Settings.from_env(environ).validate()
    assert len(problems) == 1, problems
    assert "REDIS_SSL_CA_CERTS is set but REDIS_URL is plaintext (redis://)" in problems[0]
    assert "use rediss://" in problems[0]


def test_pinned_ca_covers_the_primary_a_tls_sentinel_names(
    make_app: MakeApp,
    public_ca: TlsFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sentinel over TLS with the pinned CA; the primary it names holds a certificate from the
    'public' CA only: refused before AUTH. With both CAs in the file, the same setup works."""
    files = public_ca
    bundle = tmp_path / "both-cas.pem"
    bundle.write_bytes(files.ca.read_bytes() + files.other_ca.read_bytes())
    primary_dir, sentinel_dir = tmp_path / "primary", tmp_path / "sentinel"
    primary_dir.mkdir()
    sentinel_dir.mkdir()
    primary = TlsRedisServer(
        primary_dir,
        cert=files.foreign_cert,
        key=files.foreign_key,
        ca=files.other_ca,
        password=FOREIGN_PASSWORD,
    ).start()
    sentinel: TlsSentinel | None = None
    admin = primary.admin()
    try:
        sentinel = TlsSentinel(
            sentinel_dir, primary, cert=files.cert, key=files.key, ca=files.ca, trusted=bundle
        ).start()
        admin.config_resetstat()
        pinned = {"REDIS_SSL_CA_CERTS": str(files.ca), "REDIS_SSL_CHECK_HOSTNAME": "false"}
        app = make_app(**_env(sentinel.url(), **pinned))
        caplog.clear()
        response = _http(app).post("/session/counter", headers=JSON)
        assert response.status_code == 503
        lines = _store_lines(caplog)
        print("TLS pinned, sentinel's foreign primary:", json.dumps(lines))
        assert any("TLS handshake failed" in line for line in lines), lines
        assert _auth_attempts(admin) == 0  # the sentinel's own links were open already

        both = {"REDIS_SSL_CA_CERTS": str(bundle), "REDIS_SSL_CHECK_HOSTNAME": "false"}
        good = make_app(**_env(sentinel.url(), **both))
        _round_trip(good, _holds_session(admin))
        ready = _http(good).get("/readyz")
        assert ready.status_code == 200
        assert ready.get_json()["topology"] == "sentinel"
        assert FOREIGN_PASSWORD not in caplog.text
    finally:
        admin.close()
        if sentinel is not None:
            sentinel.stop()
        primary.stop()
