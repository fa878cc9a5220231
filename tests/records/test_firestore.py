"""Firestore specifics of keyed-state records: their documents sit in the sessions' collection,
so the TTL policy and `flask session-store cleanup` remove them once expired."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from pyloto_corp.records.firestore import FirestoreRecords
from pyloto_corp.session_store import SessionStore
from pyloto_corp.state import KeyedState
from tests.conftest import MakeApp


def test_cleanup_deletes_expired_entries_and_keeps_live_ones(
    make_app: MakeApp, firestore_env: dict[str, str], firestore_client: Any
) -> None:
    app = make_app(**firestore_env)
    short, long = KeyedState("short", lifetime=timedelta(seconds=1)), KeyedState("long")
    with app.app_context():
        with short.open("a") as state:
            state["x"] = 1
        with long.open("a") as state:
            state["x"] = 1
    time.sleep(1.2)
    interface = SessionStore.state(app).interface
    assert isinstance(interface.records, FirestoreRecords)
    assert interface.records.delete_expired() == 1
    documents = list(firestore_client.collection(interface.records.collection).stream())
    assert len(documents) == 1
    with app.app_context():
        assert short.get("a") is None
        assert long.get("a") == {"x": 1}
