"""Keyed state fails closed: a store that is down or hung raises SessionStoreUnavailable within
its timeout (a view answers 503), never an empty entry a bot would take for a new conversation."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask

from pyloto_corp.errors import SessionStoreUnavailable
from pyloto_corp.state import KeyedState
from tests.conftest import MakeApp, redis_production_env
from tests.services import FirestoreEmulator, RedisServer

TIMEOUT = 1.0
BOUND = TIMEOUT + 0.5
SENDER = "5511987654321"
conversations = KeyedState("conversations")


def _open() -> None:
    with conversations.open(SENDER) as state:
        state["step"] = "x"


def _turn() -> None:
    with conversations.turn(SENDER, wait=timedelta(0)) as state:
        state["step"] = "x"


OPERATIONS: dict[str, Callable[[], object]] = {
    "get": lambda: conversations.get(SENDER),
    "exists": lambda: conversations.exists(SENDER),
    "delete": lambda: conversations.delete(SENDER),
    "open": _open,
    "turn": _turn,
}


@contextlib.contextmanager
def _paused(pid: int, *, group: bool = False) -> Iterator[None]:
    """SIGSTOP: the kernel still accepts connections, nothing answers."""
    send = os.killpg if group else os.kill
    send(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        send(pid, signal.SIGCONT)


def _assert_fails_closed(app: Flask) -> None:
    with app.app_context():
        for name, operation in OPERATIONS.items():
            started = time.monotonic()
            with pytest.raises(SessionStoreUnavailable) as failed:
                operation()
            elapsed = time.monotonic() - started
            assert elapsed < BOUND, (name, elapsed)
            assert SENDER not in str(failed.value)

    @app.post("/webhook")
    def webhook() -> dict[str, Any]:
        with conversations.open(SENDER) as state:
            return {"step": state.get("step")}

    response = app.test_client().post("/webhook", headers={"Accept": "application/json"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"


def _seed(app: Flask) -> None:
    with app.app_context():
        _open()
        assert conversations.get(SENDER) == {"step": "x"}


@pytest.fixture
def redis_app(make_app: MakeApp, own_redis: RedisServer) -> Flask:
    return make_app(**redis_production_env(own_redis.url))  # 1 s timeouts


def test_redis_hung(redis_app: Flask, own_redis: RedisServer) -> None:
    _seed(redis_app)
    assert own_redis.process is not None
    with _paused(own_redis.process.pid):
        _assert_fails_closed(redis_app)
    time.sleep(1.1)  # the breaker's cool-down: then the store is used again
    with redis_app.app_context():
        assert conversations.get(SENDER) == {"step": "x"}


def test_redis_down(redis_app: Flask, own_redis: RedisServer) -> None:
    _seed(redis_app)
    own_redis.stop()
    _assert_fails_closed(redis_app)


def test_firestore_hung(
    make_app: MakeApp, firestore_env: dict[str, str], firestore_emulator: FirestoreEmulator
) -> None:
    app = make_app(**firestore_env, FIRESTORE_TIMEOUT=str(TIMEOUT))
    _seed(app)
    assert firestore_emulator.process is not None
    with _paused(firestore_emulator.process.pid, group=True):
        _assert_fails_closed(app)
    time.sleep(1.1)
    with app.app_context():
        assert conversations.get(SENDER) == {"step": "x"}
