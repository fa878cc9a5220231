"""Shared fixtures: environment reset, an app factory, and the real services."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from pyloto_corp import create_app
from pyloto_corp.config.rate_limits import ENVIRONMENT_VARIABLES
from pyloto_corp.config.settings import BACKENDS, Settings, Var, backend_options
from tests.services import FirestoreEmulator, RedisClusterNodes, RedisServer
from tests.tls_services import TlsFiles, TlsRedisCluster, write_tls_files
from tests.topology_services import ValkeyServer

#: A valid secret for environments that require one; tests assert it never leaks.
SECRET = "s3cr3t-Vq8ZpL2mXw4nJ7yTb0dRf6hKc9sGe1aUo5iW"
#: The password of the TLS cluster's nodes (tests assert it never leaks either).
TLS_PASSWORD = "tls-cluster-pass-14142135"

_CONFIG_VARS = [value for name, value in vars(Var).items() if name.isupper()] + [
    variable for backend in BACKENDS for variable in backend_options(backend).VARIABLES
]
_CONFIG_VARS += ["PORT", "LOG_LEVEL", "GUNICORN_WORKERS", "GUNICORN_THREADS", "GUNICORN_TIMEOUT"]
_CONFIG_VARS += ["GUNICORN_GRACEFUL_TIMEOUT", "GUNICORN_ACCESS_LOG"]
_CONFIG_VARS += list(ENVIRONMENT_VARIABLES)  # Flask-Limiter's, judged by the same rule


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with none of the service's variables set, and no .env loading."""
    for name in _CONFIG_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("FLASK_SKIP_DOTENV", "1")


MakeApp = Callable[..., Flask]

#: The session cookie's name when deployed (staging, production, Cloud Run), and elsewhere.
DEPLOYED_COOKIE = "__Host-session"
LOCAL_COOKIE = "session"


def cookie_name(app: Flask) -> str:
    """The session cookie's name in ``app``: ``__Host-session`` when deployed, else ``session``."""
    name: str = app.config["SESSION_COOKIE_NAME"]
    return name


def session_cookie(response: Any) -> str | None:
    """What a response sets the session cookie to (under either name; ``""`` when it deletes
    it), None when it sends none."""
    for header in response.headers.getlist("Set-Cookie"):
        name, _, rest = header.partition("=")
        if name in (DEPLOYED_COOKIE, LOCAL_COOKIE):
            value: str = rest.split(";", 1)[0]
            return value
    return None


def redis_production_env(url: str, **extra: str) -> dict[str, str]:
    """A valid production app on the redis backend at ``url``, with 1 s store timeouts."""
    return {
        "ENV": "production",
        "SESSION_STORE_BACKEND": "redis",
        "REDIS_URL": url,
        "SECRET_KEY": SECRET,
        "REDIS_SOCKET_TIMEOUT": "1",
        "REDIS_CONNECT_TIMEOUT": "1",
        **extra,
    }


@pytest.fixture
def make_app() -> MakeApp:
    """``make_app(ENV="production", ...)``: an app built from exactly these variables."""

    def factory(**environ: str) -> Flask:
        app = create_app(Settings.from_env(environ))
        app.testing = True
        return app

    return factory


@pytest.fixture
def app(make_app: MakeApp) -> Flask:
    return make_app(ENV="test")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test may stop, pause or restart (the shared one stays up)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the session's redis-server, emptied before each test."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def redis_env(redis_client: redis.Redis, redis_server: RedisServer) -> dict[str, str]:
    """Variables for a valid production app on the test redis-server."""
    return {
        Var.ENV: "production",
        Var.SESSION_STORE_BACKEND: "redis",
        "REDIS_URL": redis_server.url,
        Var.SECRET_KEY: SECRET,
    }


@pytest.fixture(scope="session")
def firestore_emulator() -> Iterator[FirestoreEmulator]:
    """Started once per test session (about 10 s), only when a test needs it."""
    emulator = FirestoreEmulator()
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def firestore_env(
    firestore_emulator: FirestoreEmulator, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """Variables for a valid production app on the (emptied) emulator."""
    firestore_emulator.clear()
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator.host)
    return {
        Var.ENV: "production",
        Var.SESSION_STORE_BACKEND: "firestore",
        "FIRESTORE_PROJECT": firestore_emulator.project,
        Var.SECRET_KEY: SECRET,
    }


@pytest.fixture
def firestore_client(firestore_env: dict[str, str]) -> Iterator[Any]:
    """A client of the emulator, for reading what the backend stored."""
    from google.cloud import firestore

    client = firestore.Client(project=firestore_env["FIRESTORE_PROJECT"])
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """A 3-primary Redis Cluster, started once per test session (about 2 s)."""
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyServer]:
    """One valkey-server per test session."""
    server = ValkeyServer(tmp_path_factory.mktemp("valkey"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA, a wrong CA, and server certificates for 127.0.0.1 (and one naming another host)."""
    return write_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def tls_cluster(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> Iterator[TlsRedisCluster]:
    """3 TLS-only primaries whose certificate names 127.0.0.1, with a password."""
    cluster = TlsRedisCluster(
        tmp_path_factory.mktemp("tls-cluster"), tls_files, password=TLS_PASSWORD
    ).start()
    yield cluster
    cluster.stop()
