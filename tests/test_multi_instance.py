"""Several gunicorn instances of the app behind a round-robin client, as Cloud Run scales out."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import SECRET
from tests.services import FirestoreEmulator, Gunicorn, RedisServer

INSTANCES = 3


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], list[Gunicorn]]]:
    started: list[Gunicorn] = []

    def start(environ: dict[str, str]) -> list[Gunicorn]:
        servers = [Gunicorn(tmp_path, environ) for _ in range(INSTANCES)]
        started.extend(servers)
        return [server.start() for server in servers]

    yield start
    for server in started:
        server.stop()


def _conversation(servers: list[Gunicorn]) -> list[int]:
    """Log in on A, then 9 increments round-robin, then log out on B; counters seen on each."""
    a, b = servers[0], servers[1]
    status, headers, _ = a.request("POST", "/session/counter")
    assert status == 200
    cookie = {"Cookie": headers["Set-Cookie"].split(";", 1)[0]}
    seen = []
    for server in itertools.islice(itertools.cycle(servers), 9):
        status, _, body = server.request("POST", "/session/counter", cookie)
        assert status == 200
        seen.append(json.loads(body)["counter"])
    assert b.request("DELETE", "/session", cookie)[0] == 200
    after_logout = [json.loads(s.request("GET", "/session/counter", cookie)[2]) for s in servers]
    assert after_logout == [{"counter": 0}] * INSTANCES
    return seen


def test_redis_session_carries_across_instances(
    instances: Callable[[dict[str, str]], list[Gunicorn]], redis_server: RedisServer
) -> None:
    servers = instances(
        {
            "ENV": "production",
            "SESSION_STORE_BACKEND": "redis",
            "REDIS_URL": redis_server.url,
            "SECRET_KEY": SECRET,
        }
    )
    assert _conversation(servers) == list(range(2, 11))


def test_firestore_session_carries_across_instances(
    instances: Callable[[dict[str, str]], list[Gunicorn]], firestore_emulator: FirestoreEmulator
) -> None:
    firestore_emulator.clear()
    servers = instances(
        {
            "ENV": "production",
            "SESSION_STORE_BACKEND": "firestore",
            "FIRESTORE_PROJECT": firestore_emulator.project,
            "FIRESTORE_EMULATOR_HOST": firestore_emulator.host,
            "SECRET_KEY": SECRET,
        }
    )
    assert _conversation(servers) == list(range(2, 11))


def test_memory_sessions_split_between_instances(
    instances: Callable[[dict[str, str]], list[Gunicorn]],
) -> None:
    """Why memory is refused in production: each instance has its own sessions."""
    servers = instances({"ENV": "development"})
    a = servers[0]
    _, headers, _ = a.request("POST", "/session/counter")
    cookie = {"Cookie": headers["Set-Cookie"].split(";", 1)[0]}
    seen = [
        json.loads(server.request("GET", "/session/counter", cookie)[2])["counter"]
        for server in servers
    ]
    assert seen == [1, 0, 0]
