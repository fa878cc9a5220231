"""The backend harnesses every session-store test can run over: an app on one backend, plus
direct access to what that backend stored (``backend`` runs a test on each)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from redis.cluster import RedisCluster
from werkzeug.test import TestResponse

from pyloto_corp.records.memory import MemoryRecords, MemoryStore
from pyloto_corp.records.redis import scripts as redis_scripts
from pyloto_corp.records.redis import store as redis_store
from pyloto_corp.session_store import SessionStore
from pyloto_corp.session_store.base import Retired
from tests.conftest import DEPLOYED_COOKIE, LOCAL_COOKIE, SECRET, MakeApp


@dataclass
class Harness:
    """An app on one backend plus direct access to what that backend stored.

    ``read_raw`` returns the record as stored (a mapping of field -> encoded value, or the bytes
    of a record stored whole by an earlier release); ``write_raw`` stores bytes the way an
    earlier release did (memory, which no release outlives, stores them as one field).
    """

    name: str
    make: Callable[[], Flask]
    read_raw: Callable[[Flask, str], object]
    write_raw: Callable[[Flask, str, bytes], None]

    def store_id(self, app: Flask, sid: str) -> str:
        prefix = SessionStore.state(app).settings.session_key_prefix
        return prefix + hashlib.sha256(sid.encode()).hexdigest()


def _memory(make_app: MakeApp, request: pytest.FixtureRequest) -> Harness:
    def store(app: Flask) -> MemoryStore:
        interface = app.session_interface
        assert isinstance(interface.records, MemoryRecords)
        return interface.records.sessions

    def write(app: Flask, key: str, data: bytes) -> None:
        store(app).delete(key)
        store(app).add(key, {"counter": data}, 600)

    def read(app: Flask, key: str) -> object:
        record = store(app).get(key, 600)
        return None if isinstance(record, Retired) else record  # a retired id holds no session

    return Harness("memory", lambda: make_app(ENV="test"), read, write)


def _read_redis(client: Any, key: str) -> object:
    """The record as stored: each key's encoded value, or an earlier release's bytes."""
    data = client.get(key)
    if isinstance(data, bytes) and data[:2] == redis_scripts.RECORD_MARKER:
        return redis_store.parse_record(data)
    return data


def _redis(make_app: MakeApp, request: pytest.FixtureRequest) -> Harness:
    environ = request.getfixturevalue("redis_env")
    client = request.getfixturevalue("redis_client")
    return Harness(
        "redis",
        lambda: make_app(**environ),
        lambda app, key: _read_redis(client, key),
        lambda app, key, data: client.set(key, data, ex=600),
    )


def _firestore(make_app: MakeApp, request: pytest.FixtureRequest) -> Harness:
    from datetime import UTC, datetime, timedelta

    from pyloto_corp.records.firestore import key_of_field

    environ = request.getfixturevalue("firestore_env")
    client = request.getfixturevalue("firestore_client")
    sessions = client.collection("sessions")

    def read(app: Flask, key: str) -> object:
        snapshot = sessions.document(key).get()
        if not snapshot.exists:
            return None
        document = snapshot.to_dict() or {}
        fields = document.get("fields")
        if isinstance(fields, dict):
            return {key_of_field(name): raw for name, raw in fields.items()}
        return document.get("data")  # stored whole by an earlier release

    def write(app: Flask, key: str, data: bytes) -> None:
        expires_at = datetime.now(UTC) + timedelta(hours=1)
        sessions.document(key).set({"data": data, "expires_at": expires_at})

    return Harness("firestore", lambda: make_app(**environ), read, write)


def _redis_cluster(make_app: MakeApp, request: pytest.FixtureRequest) -> Harness:
    """The redis backend on a 3-primary Redis Cluster, from ``REDIS_URL=redis+cluster://...``
    (two seed nodes: the client discovers the third)."""
    nodes = request.getfixturevalue("redis_cluster")
    client = nodes.client()
    request.addfinalizer(client.close)
    for node in client.get_primaries():
        client.flushall(target_nodes=node)
    seeds = ",".join(f"127.0.0.1:{port}" for port in nodes.ports[:2])
    environ = {
        "ENV": "production",
        "SESSION_STORE_BACKEND": "redis",
        "REDIS_URL": f"redis+cluster://{seeds}",
        "SECRET_KEY": SECRET,
    }
    return Harness(
        "redis_cluster",
        lambda: make_app(**environ),
        lambda app, key: _read_redis(client, key),
        lambda app, key, data: client.set(key, data, ex=600),
    )


def valkey_harness(make_app: MakeApp, request: pytest.FixtureRequest) -> Harness:
    """The redis backend on valkey-server (emptied first), as ``_redis`` is on redis-server."""
    valkey = request.getfixturevalue("valkey_server")
    client = valkey.client()
    request.addfinalizer(client.close)
    client.flushall()
    environ = {
        "ENV": "production",
        "SESSION_STORE_BACKEND": "redis",
        "REDIS_URL": valkey.url,
        "SECRET_KEY": SECRET,
    }

    def write_raw(app: Flask, key: str, data: bytes) -> None:
        client.set(key, data, ex=600)

    return Harness(
        "valkey", lambda: make_app(**environ), lambda app, key: _read_redis(client, key), write_raw
    )


def _redis_cluster_tls(make_app: MakeApp, request: pytest.FixtureRequest) -> Harness:
    """The redis backend on a TLS-only, password-protected 3-primary cluster, from
    ``REDIS_URL=rediss+cluster://:PASSWORD@...`` and ``REDIS_SSL_CA_CERTS`` (Memorystore's
    shape)."""
    cluster = request.getfixturevalue("tls_cluster")
    client = RedisCluster(
        host="127.0.0.1",
        port=cluster.ports[0],
        password=cluster.password,
        ssl=True,
        ssl_ca_certs=str(cluster.files.ca),
        socket_timeout=2,
    )
    request.addfinalizer(client.close)
    for node in client.get_primaries():
        client.flushall(target_nodes=node)
    environ = {
        "ENV": "production",
        "SESSION_STORE_BACKEND": "redis",
        "REDIS_URL": cluster.url(),
        "REDIS_SSL_CA_CERTS": str(cluster.files.ca),
        "SECRET_KEY": SECRET,
    }
    return Harness(
        "redis_cluster_tls",
        lambda: make_app(**environ),
        lambda app, key: _read_redis(client, key),
        lambda app, key, data: client.set(key, data, ex=600),
    )


HARNESSES = {
    "memory": _memory,
    "redis": _redis,
    "redis_cluster": _redis_cluster,
    "redis_cluster_tls": _redis_cluster_tls,
    "valkey": valkey_harness,
    "firestore": _firestore,
}


@pytest.fixture(params=sorted(HARNESSES))
def backend(request: pytest.FixtureRequest, make_app: MakeApp) -> Harness:
    return HARNESSES[request.param](make_app, request)


def sid_of(response: TestResponse) -> str:
    """The session id the response's session cookie sets (``__Host-session`` when deployed,
    ``session`` elsewhere)."""
    headers = response.headers.getlist("Set-Cookie")
    for header in headers:
        name, _, rest = header.partition("=")
        if name in (DEPLOYED_COOKIE, LOCAL_COOKIE):
            return rest.split(";", 1)[0]
    raise AssertionError(f"no session cookie set: {headers}")


@pytest.fixture(params=sorted(set(HARNESSES) - {"memory"}))
def shared_backend(request: pytest.FixtureRequest, make_app: MakeApp) -> Harness:
    """The backends whose sessions outlive a deploy (memory lives in one process)."""
    return HARNESSES[request.param](make_app, request)


def user_routes(app: Flask) -> Flask:
    """``POST /as/<user>`` signs in as ``user`` (the id rotated, Flask-Login's key set) and
    ``GET /whoami`` says who the session belongs to: what the user-index tests share."""
    from flask import session

    from pyloto_corp.session_store import rotate_session_id

    @app.post("/as/<user>")
    def login_as(user: str) -> dict[str, bool]:
        rotate_session_id()
        session["_user_id"] = user
        return {"ok": True}

    @app.get("/whoami")
    def whoami() -> dict[str, str | None]:
        return {"user": session.get("_user_id")}

    return app
