"""In-process store for development and tests: Flask-Session's cachelib interface over SimpleCache.

Refused in staging, production and on Cloud Run (see the settings' validation): each instance
would hold its own sessions.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from cachelib import SimpleCache
from flask import Flask
from flask_session.base import ServerSideSession
from flask_session.cachelib import CacheLibSessionInterface

from ..config.settings import Settings
from .base import StoreInterfaceMixin, decode_session, encode_session

#: SimpleCache evicts beyond this many entries; plenty for one developer's browser tabs.
MAX_SESSIONS = 10_000


class MemorySessionInterface(StoreInterfaceMixin, CacheLibSessionInterface):
    backend_name = "memory"

    # Stored as the same msgpack bytes as the other backends, so every backend meets one contract.
    def _retrieve_session_data(self, store_id: str) -> dict[str, Any] | None:
        data = self.cache.get(store_id)
        return None if data is None else decode_session(data, store_id)

    def _upsert_session(
        self, session_lifetime: timedelta, session: ServerSideSession, store_id: str
    ) -> None:
        timeout = max(1, int(session_lifetime.total_seconds()))
        self.cache.set(store_id, encode_session(session), timeout=timeout)


def create_interface(
    app: Flask, settings: Settings, client: SimpleCache | None = None
) -> MemorySessionInterface:
    cache = client if client is not None else SimpleCache(threshold=MAX_SESSIONS)
    return MemorySessionInterface(app, client=cache, key_prefix=settings.session_key_prefix)
