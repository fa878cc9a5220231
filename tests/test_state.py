"""KeyedState over every backend's real service: the API a webhook and a worker use."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask

from pyloto_corp.errors import LeaseLost, SessionTooLarge, StateBusy, UnstorableValue
from pyloto_corp.session_store import SessionStore
from pyloto_corp.state import KeyedState, store_key
from tests.conftest import MakeApp
from tests.elsewhere import elsewhere
from tests.records.conftest import BACKENDS
from tests.session_store.conftest import HARNESSES

PHONE = "5511987654321"
conversations = KeyedState("conversations", lifetime=timedelta(hours=2))


@pytest.fixture(params=BACKENDS)
def app(request: pytest.FixtureRequest, make_app: MakeApp) -> Flask:
    return HARNESSES[request.param](make_app, request).make()


def test_open_get_exists_delete(app: Flask) -> None:
    with app.app_context():
        assert conversations.get(PHONE) is None
        assert not conversations.exists(PHONE)
        with conversations.open(PHONE) as state:
            assert dict(state) == {}
            state["step"] = "ask_cpf"
            state["history"] = ["oi"]
        assert conversations.get(PHONE) == {"step": "ask_cpf", "history": ["oi"]}
        assert conversations.exists(PHONE)
        assert conversations.delete(PHONE) is True
        assert conversations.delete(PHONE) is False
        assert conversations.get(PHONE) is None


def test_values_come_back_as_cookie_sessions_keep_them(app: Flask) -> None:
    values: dict[str, Any] = {
        "amount": Decimal("10.50"),
        "when": datetime(2026, 12, 2, 9, 30, tzinfo=UTC),
        "day": date(2026, 12, 2),
        "pair": (1, "a"),
        "nested": {"a": [1, 2, {"b": None}]},
        "bytes": b"\x00\xff",
    }
    with app.app_context():
        with conversations.open(PHONE) as state:
            state.update(values)
        assert conversations.get(PHONE) == values


def test_an_in_place_change_is_saved_and_an_unchanged_block_writes_nothing(app: Flask) -> None:
    with app.app_context():
        with conversations.open(PHONE) as state:
            state["history"] = ["a"]
        with conversations.open(PHONE) as state:
            state["history"].append("b")
        assert conversations.get(PHONE) == {"history": ["a", "b"]}


def test_an_emptied_entry_is_deleted(app: Flask) -> None:
    with app.app_context():
        with conversations.open(PHONE) as state:
            state["step"] = "x"
        with conversations.open(PHONE) as state:
            state.clear()
        assert not conversations.exists(PHONE)


def _fail_in(block: Any, key: str, value: object) -> None:
    with block as state:
        state[key] = value
        raise KeyError("boom")


def test_an_exception_in_the_block_saves_nothing(app: Flask) -> None:
    with app.app_context():
        with conversations.open(PHONE) as state:
            state["step"] = "one"
        with pytest.raises(KeyError):
            _fail_in(conversations.open(PHONE), "step", "two")
        with pytest.raises(KeyError):
            _fail_in(conversations.turn(PHONE), "step", "three")
        assert conversations.get(PHONE) == {"step": "one"}
        # The failed turn released its lease.
        with conversations.turn(PHONE, wait=timedelta(0)) as state:
            assert state["step"] == "one"


def test_concurrent_opens_changing_different_keys_all_land(app: Flask) -> None:
    with app.app_context():
        with conversations.open(PHONE) as first, conversations.open(PHONE) as second:
            first["a"] = 1
            second["b"] = 2
        assert conversations.get(PHONE) == {"a": 1, "b": 2}


def test_namespaces_and_cookie_sessions_are_separate(app: Flask) -> None:
    orders = KeyedState("orders")
    with app.app_context():
        with conversations.open(PHONE) as state:
            state["who"] = "conversation"
        with orders.open(PHONE) as state:
            state["who"] = "order"
        assert conversations.get(PHONE) == {"who": "conversation"}
        assert orders.get(PHONE) == {"who": "order"}
    client = app.test_client()
    client.post("/session/counter")
    assert client.get("/session/counter").json == {"counter": 1}
    with app.app_context():
        assert conversations.get(PHONE) == {"who": "conversation"}


def _turn_at_once() -> None:
    with conversations.turn(PHONE, wait=timedelta(0)):
        pass


def test_a_turn_is_exclusive_and_wait_zero_is_busy_at_once(app: Flask) -> None:
    with app.app_context(), conversations.turn(PHONE) as state:
        state["step"] = "held"
        started = time.monotonic()
        busy = elsewhere(app, _turn_at_once)
        assert time.monotonic() - started < 1
    assert isinstance(busy, StateBusy)
    assert 1 <= busy.retry_after <= 60
    assert PHONE not in str(busy)


def test_a_turn_waits_for_the_holder(app: Flask) -> None:
    released = threading.Event()

    def hold() -> None:
        with app.app_context(), conversations.turn(PHONE) as state:
            state["n"] = 1
            released.wait(5)
            time.sleep(0.3)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        time.sleep(0.3)
        released.set()
        with app.app_context(), conversations.turn(PHONE, wait=timedelta(seconds=5)) as state:
            assert state["n"] == 1
            state["n"] = 2
    finally:
        holder.join()
    with app.app_context():
        assert conversations.get(PHONE) == {"n": 2}


def _take_turn() -> None:
    with conversations.turn(PHONE) as state:
        state["n"] = state["n"] + 1


def _outlive_lease(app: Flask) -> None:
    with conversations.turn(PHONE, lease=timedelta(milliseconds=300)) as late:
        late["n"] = 99
        time.sleep(0.5)
        assert elsewhere(app, _take_turn) is None


def test_a_holder_that_outlived_its_lease_loses_its_save(app: Flask) -> None:
    with app.app_context():
        with conversations.open(PHONE) as state:
            state["n"] = 0
        with pytest.raises(LeaseLost, match="lease") as lost:
            _outlive_lease(app)
        assert PHONE not in str(lost.value)
        assert conversations.get(PHONE) == {"n": 1}


def _turn_again() -> None:
    with conversations.turn(PHONE):
        pass


def test_a_nested_turn_of_the_same_id_is_refused_before_any_io(app: Flask) -> None:
    with app.app_context(), conversations.turn(PHONE):
        with pytest.raises(RuntimeError, match="would wait for itself"):
            _turn_again()
        with conversations.turn("another id", wait=timedelta(0)):
            pass


def _store(block: Any, values: dict[str, Any]) -> None:
    with block as state:
        state.update(values)


def test_a_value_that_cannot_be_stored_is_refused_and_nothing_is_lost(app: Flask) -> None:
    with app.app_context():
        with conversations.open(PHONE) as state:
            state["step"] = "one"
        with pytest.raises(UnstorableValue):
            _store(conversations.open(PHONE), {"step": "two", "bad": {1, 2}})
        limit = SessionStore.state(app).interface.max_bytes
        with pytest.raises(SessionTooLarge):
            _store(conversations.turn(PHONE), {"big": "x" * limit})
        assert conversations.get(PHONE) == {"step": "one"}
        # Refused turns released their lease.
        with conversations.turn(PHONE, wait=timedelta(0)):
            pass


def test_a_phone_number_never_reaches_the_store_key_and_the_key_is_keyed(app: Flask) -> None:
    with app.app_context():
        with conversations.open(PHONE) as state:
            state["step"] = "x"
        prefix = SessionStore.state(app).settings.session_key_prefix
        secret = app.config["SECRET_KEY"]
        key = store_key(prefix, secret, "conversations", PHONE)
    assert PHONE not in key
    for plain in (PHONE, "conversations" + PHONE, "conversations\x00" + PHONE):
        for digest in (hashlib.sha256, hashlib.sha1, hashlib.md5):
            assert digest(plain.encode()).hexdigest() not in key
    assert store_key(prefix, "another secret" * 3, "conversations", PHONE) != key
    assert store_key(prefix, secret, "orders", PHONE) != key
    records = SessionStore.state(app).interface.records
    assert records.load(key, timedelta(hours=2)) is not None


def test_after_a_secret_key_rotation_every_entry_is_found_and_moves(app: Flask) -> None:
    ids = [f"55119{n:08d}" for n in range(5)]
    with app.app_context():
        for number, sender in enumerate(ids):
            with conversations.open(sender) as state:
                state["n"] = number
    app.config["SECRET_KEY_FALLBACKS"] = [old_secret := app.config["SECRET_KEY"]]
    app.config["SECRET_KEY"] = "a-new-key-Xk29fPq7LmZ3vB8nR4tYw6cJ1hDs5gE0"
    records = SessionStore.state(app).interface.records
    prefix = SessionStore.state(app).settings.session_key_prefix
    with app.app_context():
        assert [conversations.get(sender) for sender in ids] == [{"n": n} for n in range(5)]
        assert all(conversations.exists(sender) for sender in ids)
        with conversations.open(ids[0]) as state:
            state["moved"] = True
        with conversations.turn(ids[1]) as state:
            state["n"] = 10
    old, new = (
        store_key(prefix, secret, "conversations", ids[0])
        for secret in (old_secret, app.config["SECRET_KEY"])
    )
    assert records.load(old, timedelta(hours=1)) is None
    assert records.load(new, timedelta(hours=1)) is not None
    app.config["SECRET_KEY_FALLBACKS"] = []
    with app.app_context():
        assert conversations.get(ids[0]) == {"n": 0, "moved": True}
        assert conversations.get(ids[1]) == {"n": 10}
        assert conversations.get(ids[2]) == {"n": 2}  # moved by its first read after it


def test_a_view_answers_503_while_the_turn_is_held(app: Flask) -> None:
    @app.post("/webhook/<sender>")
    def webhook(sender: str) -> dict[str, Any]:
        with conversations.turn(sender, wait=timedelta(0)) as state:
            state["seen"] = state.get("seen", 0) + 1
            return {"seen": state["seen"]}

    client = app.test_client()
    assert client.post(f"/webhook/{PHONE}").json == {"seen": 1}
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with conversations.turn(PHONE):
            held.set()
            done.wait(10)

    holder = threading.Thread(target=elsewhere, args=(app, hold))
    holder.start()
    try:
        assert held.wait(10)
        response = client.post(f"/webhook/{PHONE}", headers={"Accept": "application/json"})
    finally:
        done.set()
        holder.join()
    assert response.status_code == 503
    assert response.json is not None
    assert response.json["error"] == "state_busy"
    assert PHONE not in response.get_data(as_text=True)
    assert 1 <= int(response.headers["Retry-After"]) <= 60
