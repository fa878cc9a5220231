"""Records in process memory, for development and tests (refused when deployed, like memory
sessions): the same contract as the shared stores, each operation atomic under one lock, so
code that works here works on Redis and Firestore, within one process."""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import replace
from datetime import timedelta

from ..config.settings import MEMORY
from ..errors import SessionTooLarge
from .base import Entry, Held, Lease, RecordStore, new_token

#: What a stored value costs beyond its bytes, counted like the Redis framing (name and value
#: lengths), so a record refused by size in production is refused in development too.
FIELD_OVERHEAD = 8
RECORD_OVERHEAD = 18


def encoded_size(fields: Mapping[str, bytes]) -> int:
    """The record's size as the shared stores count it."""
    return RECORD_OVERHEAD + sum(
        FIELD_OVERHEAD + len(name.encode("utf-8", "surrogatepass")) + len(raw)
        for name, raw in fields.items()
    )


def too_large(size: int, limit: int) -> SessionTooLarge:
    return SessionTooLarge(
        f"the record would take {size} bytes, over the store's limit of {limit} bytes "
        "(SESSION_MAX_BYTES); nothing was written: store less under this key"
    )


class MemoryRecords(RecordStore):
    backend_name = MEMORY

    def __init__(self, max_bytes: int, max_records: int = 10_000) -> None:
        self.max_bytes = max_bytes
        self.max_records = max_records
        self._items: dict[str, tuple[Entry, float]] = {}
        self._lock = threading.Lock()

    def _live(self, key: str, now: float) -> Entry | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._items[key]
            return None
        return item[0]

    def _put(self, key: str, entry: Entry, lifetime: timedelta, now: float) -> None:
        if not entry.fields and entry.lease_until <= time.time():
            self._items.pop(key, None)
            return
        if key not in self._items and len(self._items) >= self.max_records:
            # Full: drop the record closest to expiry (bounded memory in development).
            oldest = min(self._items, key=lambda name: self._items[name][1])
            del self._items[oldest]
        self._items[key] = (entry, now + lifetime.total_seconds())

    def _merged(
        self, entry: Entry | None, changed: Mapping[str, bytes], deleted: Collection[str]
    ) -> Entry:
        base = entry or Entry()
        fields = {**base.fields, **changed}
        for name in deleted:
            fields.pop(name, None)
        size = encoded_size(fields)
        if size > self.max_bytes:
            raise too_large(size, self.max_bytes)
        return replace(base, fields=fields)

    def load(self, key: str, lifetime: timedelta) -> Entry | None:
        now = time.monotonic()
        with self._lock:
            entry = self._live(key, now)
            if entry is not None:
                self._items[key] = (entry, now + lifetime.total_seconds())
            return entry

    def exists(self, key: str) -> bool:
        with self._lock:
            return self._live(key, time.monotonic()) is not None

    def merge(
        self,
        key: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
        *,
        fresh: bool = False,
    ) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._merged(self._live(key, now), changed, deleted)
            self._put(key, entry, lifetime, now)

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._live(key, time.monotonic()) is not None and bool(self._items.pop(key))

    def acquire(self, key: str, lease: timedelta, lifetime: timedelta) -> Lease | Held:
        now, wall = time.monotonic(), time.time()
        with self._lock:
            entry = self._live(key, now)
            if entry is not None and entry.lease_until > wall:
                return Held(entry.lease_until - wall)
            base = entry or Entry()
            token = new_token()
            taken = replace(base, fence=token, lease_until=wall + lease.total_seconds())
            self._put(key, taken, max(lifetime, lease), now)
            return Lease(token, entry)

    def save(
        self,
        key: str,
        token: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
    ) -> bool:
        now = time.monotonic()
        with self._lock:
            entry = self._live(key, now)
            if entry is None or entry.fence != token:
                return False
            merged = replace(self._merged(entry, changed, deleted), lease_until=0.0)
            self._put(key, merged, lifetime, now)
            return True

    def ping(self) -> dict[str, object]:
        with self._lock:
            return {"records": len(self._items)}
