"""The least-privilege Redis user the README documents: the whole session lifecycle, and keyed
state, work as that user, on a standalone server and on a Redis Cluster, and everything else is
refused."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from werkzeug.test import TestResponse

from pyloto_corp.session_store.lifecycle import revoke_user_sessions, user_sessions
from pyloto_corp.state import KeyedState
from tests.conftest import MakeApp, redis_production_env
from tests.services import RedisClusterNodes, RedisServer

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "acl-user-pass-27182818"
PREFIX = "session:"  # SESSION_KEY_PREFIX's default, the README's pattern


def _documented_rules() -> list[list[str]]:
    """The README's ``ACL SETUSER sessions ...`` lines, as command arguments."""
    readme = (ROOT / "README.md").read_text()
    lines = re.findall(r"^\s*(ACL SETUSER sessions .*)$", readme, re.MULTILINE)
    assert len(lines) == 2, lines  # the user, then what a cluster adds
    return [shlex.split(line.replace(">PASSWORD", f">{PASSWORD}")) for line in lines]


def _grant(port: int, rules: list[list[str]]) -> None:
    admin = redis.Redis(port=port, socket_timeout=5)
    try:
        for rule in rules:
            assert admin.execute_command(*rule) in (b"OK", True)
    finally:
        admin.close()


def _cookie(response: TestResponse) -> str:
    return str(response.headers["Set-Cookie"]).split(";", 1)[0]


def _lifecycle(app: Flask) -> None:
    """Create, read, change, log in (rotate + index), list, log out, revoke, ready: every
    command and script of the redis backend, each answered 200."""
    client = app.test_client(use_cookies=False)

    def call(method: str, path: str, cookie: str | None = None, **kwargs: Any) -> TestResponse:
        headers = {"Cookie": cookie} if cookie else {}
        base = "https://localhost"
        response = client.open(path, method=method, headers=headers, base_url=base, **kwargs)
        assert response.status_code == 200, (method, path, response.get_data(as_text=True))
        return response

    first = _cookie(call("POST", "/session/counter"))  # new session: SCRIPT LOAD, EVALSHA
    assert call("GET", "/session/counter", first).json == {"counter": 1}
    call("POST", "/session/counter", first)  # merge
    devices = []
    for _ in range(3):
        anonymous = _cookie(call("POST", "/session/counter"))
        login = call("POST", "/session/login", anonymous, json={"user": "ana"})
        devices.append(_cookie(login))  # rotated: new record, old UNLINKed, user indexed
    assert call("GET", "/session/counter", devices[0]).json == {"counter": 1}
    call("DELETE", "/session", devices[2])  # logout: UNLINK (and the index entry goes)
    with app.test_request_context():
        assert len(user_sessions("ana")) == 2  # ZRANGE and PTTLs (scripts), ZREM of the stale
        assert revoke_user_sessions("ana") == 2  # the mark, the index popped (scripts), UNLINK
        assert user_sessions("ana") == []
    assert call("GET", "/session/counter", devices[0]).json == {"counter": 0}
    assert call("GET", "/session/counter", first).json == {"counter": 2}
    assert call("GET", "/readyz").json["status"] == "ready"
    conversations = KeyedState("conversations")
    with app.app_context():  # keyed state: GETEX, and its scripts (merge, lease, save, exists)
        with conversations.open("5511987654321") as state:
            state["step"] = "ask_cpf"
        with conversations.turn("5511987654321") as state:
            state["history"] = ["oi"]
        assert conversations.get("5511987654321") == {"step": "ask_cpf", "history": ["oi"]}
        assert conversations.exists("5511987654321")
        assert conversations.delete("5511987654321")


def _refused(user: redis.Redis | redis.RedisCluster) -> None:
    other: Callable[..., object]
    for other in (
        lambda: user.get("other:key"),
        lambda: user.set(f"{PREFIX}x", "v"),
        lambda: user.execute_command("EVAL", "return 1", 0),
        lambda: user.execute_command("FLUSHALL"),
        lambda: user.execute_command("CONFIG", "GET", "*"),
        lambda: user.execute_command("KEYS", "*"),
        lambda: user.execute_command("SCRIPT", "FLUSH"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            other()


def test_the_documented_user_runs_every_session_operation_and_nothing_else(
    make_app: MakeApp, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        _grant(server.port, _documented_rules()[:1])
        url = f"redis://sessions:{PASSWORD}@127.0.0.1:{server.port}/0"
        _lifecycle(
            make_app(
                **redis_production_env(
                    url, SESSION_USER_KEY="user", REDIS_ALLOW_PLAINTEXT_AUTH="true"
                )
            )
        )
        user = redis.Redis.from_url(url, socket_timeout=5)
        try:
            _refused(user)
        finally:
            user.close()
        # What the session commands did, they did as that user: the default user saw none.
        admin = server.client()
        # (Sessions, user indexes, and the markers retired ids leave: "{session:...}~retired".)
        assert {k.decode().split(":", 1)[0] for k in admin.keys("*")} <= {"session", "{session"}
        admin.close()
    finally:
        server.stop()


def test_the_documented_user_on_a_redis_cluster(make_app: MakeApp, tmp_path: Path) -> None:
    cluster = RedisClusterNodes(tmp_path / "cluster", primaries=3)
    cluster.start()
    try:
        for port in cluster.ports:
            _grant(port, _documented_rules())
        seed = f"sessions:{PASSWORD}@127.0.0.1:{cluster.ports[0]}"
        url = f"redis+cluster://{seed}"
        _lifecycle(
            make_app(
                **redis_production_env(
                    url, SESSION_USER_KEY="user", REDIS_ALLOW_PLAINTEXT_AUTH="true"
                )
            )
        )
        user = redis.RedisCluster(
            host="127.0.0.1",
            port=cluster.ports[0],
            username="sessions",
            password=PASSWORD,
            socket_timeout=5,
        )
        try:
            _refused(user)
        finally:
            user.close()
    finally:
        cluster.stop()
