"""Keyed state at its edges (each found by a review, each failing before its fix): sizes at the
limit, a rotated SECRET_KEY while turns run or die, leases against lifetimes, undecodable
values, expired Firestore documents awaiting their sweep."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask

from pyloto_corp.errors import SessionTooLarge, StateBusy
from pyloto_corp.records import codec
from pyloto_corp.records.base import entry_size
from pyloto_corp.session_store import SessionStore
from pyloto_corp.state import KeyedState, store_key
from tests.conftest import MakeApp
from tests.elsewhere import elsewhere

PHONE = "5511987654321"
NEW_SECRET = "a-new-key-Xk29fPq7LmZ3vB8nR4tYw6cJ1hDs5gE0"
LIMIT = 2048
conversations = KeyedState("conversations", lifetime=timedelta(hours=2))


@pytest.fixture(params=["memory", "redis", "firestore"])
def app(request: pytest.FixtureRequest, make_app: MakeApp) -> Flask:
    extra = {"SESSION_MAX_BYTES": str(LIMIT)}
    if request.param == "memory":
        return make_app(ENV="test", **extra)
    return make_app(**request.getfixturevalue(f"{request.param}_env"), **extra)


def _records(app: Flask) -> Any:
    return SessionStore.state(app).interface.records


def _key(app: Flask, secret: str) -> str:
    prefix = SessionStore.state(app).settings.session_key_prefix
    return store_key(prefix, secret, "conversations", PHONE)


def _rotate(app: Flask) -> None:
    app.config["SECRET_KEY_FALLBACKS"] = [app.config["SECRET_KEY"]]
    app.config["SECRET_KEY"] = NEW_SECRET


def _value_filling(limit: int) -> str:
    """A value that makes an entry just under ``limit`` bytes."""
    n = 1
    while entry_size({"h": codec.pack_value("h", "x" * (n + 1))}) <= limit - 10:
        n += 1
    return "x" * n


def _held_elsewhere(app: Flask, state: KeyedState, work: Any) -> Any:
    """Run ``work`` while another thread holds the turn of PHONE."""
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with app.app_context(), state.turn(PHONE):
            held.set()
            done.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(10)
        with app.app_context():
            return work()
    finally:
        done.set()
        thread.join()


def test_an_entry_at_the_limit_can_still_be_turned_and_released(app: Flask) -> None:
    with app.app_context():
        with conversations.open(PHONE) as state:
            state["h"] = _value_filling(LIMIT)
        with conversations.turn(PHONE, wait=timedelta(0)) as state:  # reads only
            assert state["h"]
        with pytest.raises(KeyError), conversations.turn(PHONE, wait=timedelta(0)):
            raise KeyError("the block failed")  # its release is never refused by size
        with conversations.turn(PHONE, wait=timedelta(0)):
            pass


def test_every_backend_refuses_an_entry_over_the_limit(app: Flask) -> None:
    half = "y" * (LIMIT // 2)
    with app.app_context():
        with conversations.open(PHONE) as state:
            state["a"] = half
        with pytest.raises(SessionTooLarge), conversations.open(PHONE) as state:
            state["b"] = half
        assert conversations.get(PHONE) == {"a": half}


def test_a_rotated_entry_is_seen_while_another_caller_holds_its_turn(app: Flask) -> None:
    with app.app_context(), conversations.open(PHONE) as state:
        state["history"] = ["oi", "quero pagar"]
    _rotate(app)
    seen = _held_elsewhere(app, conversations, lambda: conversations.get(PHONE))
    assert seen == {"history": ["oi", "quero pagar"]}


def test_a_rotated_entry_survives_a_turn_that_died(app: Flask) -> None:
    with app.app_context(), conversations.open(PHONE) as state:
        state["history"] = ["oi", "quero pagar"]
    _rotate(app)
    # A worker takes the turn under the new key and dies: its lease runs out.
    _records(app).acquire(_key(app, NEW_SECRET), timedelta(milliseconds=200), timedelta(hours=2))
    time.sleep(0.4)
    with app.app_context(), conversations.turn(PHONE, wait=timedelta(0)) as state:
        assert state.get("history") == ["oi", "quero pagar"]


def test_a_turn_that_died_on_a_new_id_leaves_no_entry(app: Flask) -> None:
    _records(app).acquire(
        _key(app, app.config["SECRET_KEY"]), timedelta(milliseconds=200), timedelta(hours=2)
    )
    time.sleep(0.4)
    with app.app_context():
        assert conversations.get(PHONE) is None
        assert not conversations.exists(PHONE)


def test_concurrent_opens_of_a_rotated_id_changing_different_keys_all_land(app: Flask) -> None:
    with app.app_context(), conversations.open(PHONE) as state:
        state.update(a=0, b=0)
    _rotate(app)
    with app.app_context():
        with conversations.open(PHONE) as first, conversations.open(PHONE) as second:
            first["a"] = 1
            second["b"] = 2
        assert conversations.get(PHONE) == {"a": 1, "b": 2}


def _turn_at_once() -> None:
    with conversations.turn(PHONE, wait=timedelta(0)):
        pass


def test_a_turn_that_cannot_decode_the_entry_releases_its_lease(app: Flask) -> None:
    _records(app).merge(_key(app, app.config["SECRET_KEY"]), {"x": b"\xc1"}, (), timedelta(hours=2))
    with app.app_context():
        for _attempt in range(2):  # the same decode error each time, never StateBusy
            with pytest.raises(ValueError, match="cannot be decoded"):
                _turn_at_once()


short = KeyedState("short", lifetime=timedelta(seconds=2))


def test_a_lease_longer_than_the_lifetime_is_refused_and_the_default_fits(app: Flask) -> None:
    with app.app_context():
        with pytest.raises(ValueError, match="lease must not be longer than the lifetime"):
            short.turn(PHONE, lease=timedelta(seconds=10)).__enter__()
        with short.turn(PHONE) as state:  # the default lease: the lifetime, when shorter
            short.get(PHONE)  # another caller's read slides the expiry, never below the lease
            state["n"] = 1
            time.sleep(1.2)
            busy = elsewhere(app, _short_turn_at_once)
        assert isinstance(busy, StateBusy)


def _short_turn_at_once() -> None:
    with short.turn(PHONE, wait=timedelta(0)):
        pass


@pytest.fixture
def firestore_app(make_app: MakeApp, firestore_env: dict[str, str]) -> Flask:
    return make_app(**firestore_env)


def _expired_document(app: Flask, key: str, fields: dict[str, bytes]) -> None:
    records = _records(app)
    records.client.collection(records.collection).document(key).set(
        {"fields": fields, "expires_at": datetime.now(UTC) - timedelta(minutes=1)}
    )


def test_firestore_an_expired_entry_awaiting_its_sweep_is_no_entry(firestore_app: Flask) -> None:
    app = firestore_app
    _expired_document(app, _key(app, app.config["SECRET_KEY"]), {"a": codec.pack_value("a", 1)})
    with app.app_context():
        assert conversations.get(PHONE) is None
        assert not conversations.exists(PHONE)
        assert conversations.delete(PHONE) is False


def test_firestore_a_moved_entry_never_revives_an_expired_one(firestore_app: Flask) -> None:
    app = firestore_app
    _expired_document(app, _key(app, NEW_SECRET), {"stale": codec.pack_value("stale", "old")})
    with app.app_context(), conversations.open(PHONE) as state:
        state["n"] = 1
    _rotate(app)
    with app.app_context():
        with conversations.open(PHONE) as state:
            state["n"] = 2
        assert conversations.get(PHONE) == {"n": 2}
