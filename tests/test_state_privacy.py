"""A sender's phone number never reaches the store: not in a key, not in a stored value, not
in a document id or field (scanned on the real Redis and the Firestore emulator)."""

from __future__ import annotations

from typing import Any

import redis
from flask import Flask

from pyloto_corp.state import KeyedState
from tests.conftest import MakeApp

PHONE = "5511987654321"
conversations = KeyedState("conversations")


def _write(app: Flask) -> None:
    with app.app_context():
        with conversations.open(PHONE) as state:
            state["step"] = "ask_cpf"
        with conversations.turn(PHONE) as state:
            state["history"] = ["oi"]
        assert conversations.get(PHONE) == {"step": "ask_cpf", "history": ["oi"]}


def test_no_phone_number_in_redis(
    make_app: MakeApp, redis_env: dict[str, str], redis_client: redis.Redis
) -> None:
    _write(make_app(**redis_env))
    keys = redis_client.keys("*")
    assert keys
    for key in keys:
        assert PHONE.encode() not in key
        assert PHONE.encode() not in (redis_client.get(key) or b"")


def test_no_phone_number_in_firestore(
    make_app: MakeApp, firestore_env: dict[str, str], firestore_client: Any
) -> None:
    _write(make_app(**firestore_env))
    documents = [
        document
        for collection in firestore_client.collections()
        for document in collection.stream()
    ]
    assert documents
    for document in documents:
        assert PHONE not in document.id
        assert PHONE not in repr(document.to_dict())
