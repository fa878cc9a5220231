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
from .base import SessionGone, StoreInterfaceMixin, decode_session

#: SimpleCache evicts beyond this many entries; plenty for one developer's browser tabs.
MAX_SESSIONS = 10_000


class MemorySessionInterface(StoreInterfaceMixin, CacheLibSessionInterface):
    backend_name = "memory"

    # Stored as the same msgpack bytes as the other backends, so every backend meets one contract.
    def _retrieve_session_data(self, store_id: str) -> dict[str, Any] | None:
        data = self.cache.get(store_id)
        session = None if data is None else decode_session(data, store_id)
        if session is not None:
            self.remember_loaded(store_id)
        return session

    def _upsert_session(
        self, session_lifetime: timedelta, session: ServerSideSession, store_id: str
    ) -> None:
        # Rewritten on every request (SimpleCache cannot slide an expiry by itself).
        data, timeout = self.encode(session), max(1, int(session_lifetime.total_seconds()))
        if self.recall_loaded(store_id):
            if not self.cache.has(store_id):
                raise SessionGone
            self.cache.set(store_id, data, timeout=timeout)
        else:
            self.create_new(session, lambda key: bool(self.cache.add(key, data, timeout=timeout)))


def create_interface(
    app: Flask, settings: Settings, client: SimpleCache | None = None
) -> MemorySessionInterface:
    cache = client if client is not None else SimpleCache(threshold=MAX_SESSIONS)
    interface = MemorySessionInterface(app, client=cache, key_prefix=settings.session_key_prefix)
    interface.set_limits(
        absolute_lifetime=settings.session_absolute_lifetime, max_bytes=settings.session_max_bytes
    )
    return interface
