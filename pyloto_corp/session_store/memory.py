"""In-process store for development and tests: Flask-Session's cachelib interface over SimpleCache.

Refused in staging, production and on Cloud Run (see the settings' validation): each instance
would hold its own sessions.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from cachelib import SimpleCache
from flask import Flask
from flask_session.cachelib import CacheLibSessionInterface

from ..config.settings import Settings
from .base import StoreInterfaceMixin

#: SimpleCache evicts beyond this many entries; plenty for one developer's browser tabs.
MAX_SESSIONS = 10_000


class MemorySessionInterface(StoreInterfaceMixin, CacheLibSessionInterface):
    backend_name = "memory"

    # Stored as the same msgpack bytes as the other backends, so every backend meets one contract;
    # rewritten on every request (SimpleCache cannot slide an expiry by itself).
    def _retrieve_session_data(self, store_id: str) -> dict[str, Any] | None:
        return self.load(self.cache.get(store_id), store_id)

    def replace_existing(self, store_id: str, data: bytes, lifetime: timedelta) -> bool:
        if not self.cache.has(store_id):
            return False
        return bool(self.cache.set(store_id, data, timeout=_seconds(lifetime)))

    def create_absent(self, store_id: str, data: bytes, lifetime: timedelta) -> bool:
        return bool(self.cache.add(store_id, data, timeout=_seconds(lifetime)))


def _seconds(lifetime: timedelta) -> int:
    return max(1, int(lifetime.total_seconds()))


def create_interface(
    app: Flask, settings: Settings, client: SimpleCache | None = None
) -> MemorySessionInterface:
    cache = client if client is not None else SimpleCache(threshold=MAX_SESSIONS)
    interface = MemorySessionInterface(app, client=cache, key_prefix=settings.session_key_prefix)
    interface.set_limits(
        absolute_lifetime=settings.session_absolute_lifetime, max_bytes=settings.session_max_bytes
    )
    return interface
