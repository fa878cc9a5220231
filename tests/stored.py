"""Reading and writing a session as the store holds it, whatever the backend's format.

Through the backend's own contract (``read`` / ``create``), so a test states what is stored
without repeating each backend's layout.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Flask

from pyloto_corp.records import codec
from pyloto_corp.session_store import SessionStore
from pyloto_corp.session_store.base import Record

LIFETIME = timedelta(hours=1)


def stored_session(app: Flask, store_id: str) -> dict[str, Any] | None:
    """The decoded session stored under ``store_id`` (its expiry slides, as on any read)."""
    interface = SessionStore.state(app).interface
    record = interface.records.read(store_id, LIFETIME)
    # A retired id's marker (what a login or logout leaves) holds no session.
    return interface.decode(record, store_id) if isinstance(record, Record) else None


def store_session(app: Flask, store_id: str, data: dict[str, Any]) -> None:
    """Store ``data`` as a new session under ``store_id``, as another instance would."""
    interface = SessionStore.state(app).interface
    fields = {key: codec.pack_value(key, value) for key, value in data.items()}
    assert interface.records.create(store_id, fields, LIFETIME)
