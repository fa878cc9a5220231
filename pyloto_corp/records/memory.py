"""In-process records for development and tests.

Refused in staging, production and on Cloud Run (see the settings' validation): each instance
would hold its own sessions and entries. It keeps the same encoded bytes and follows the same
contract as the shared stores, each operation atomic under one lock, so code that works in
development works on Redis and Firestore: a read slides the idle expiry, only a modified
session is written, a logout is final, one turn at a time (within this process).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, ClassVar

from environs import Env

from ..config.settings import MEMORY, Settings
from . import codec
from .base import (
    RETIRED_LINGER,
    Changes,
    Done,
    Entry,
    Held,
    Lease,
    Record,
    RecordStore,
    Retired,
    StoreOptions,
    UserSession,
    began_before,
    entry_size,
    listed_since,
    mark_lifetime,
    new_token,
    record_size,
    store_options,
    user_session,
)


@dataclass(frozen=True)
class Options(StoreOptions):
    """No variables: the store lives and dies with the process."""

    backend: ClassVar[str] = MEMORY
    VARIABLES: ClassVar[tuple[str, ...]] = ()
    #: Beyond this many sessions the one closest to expiry is dropped.
    max_sessions: int = 10_000

    @classmethod
    def from_env(cls, env: Env) -> Options:
        return cls()

    def problems(self, settings: Settings) -> list[str]:
        if settings.is_deployed:
            return [
                f"SESSION_STORE_BACKEND=memory is refused {settings.where()}: sessions kept in "
                "process memory are lost or split between Cloud Run instances; "
                "set SESSION_STORE_BACKEND=redis or firestore."
            ]
        return []

    def redacted(self, settings: Settings) -> dict[str, Any]:
        return {}


class MemoryStore:
    """Store id -> (each key's encoded value, or the marker a login or logout left; monotonic
    expiry), behind one lock: every operation is atomic, like a Redis script."""

    def __init__(self, max_sessions: int = 10_000) -> None:
        self.max_sessions = max_sessions
        self._items: dict[str, tuple[dict[str, bytes] | Retired, float]] = {}
        #: User -> (time of their last revoke, monotonic expiry of that mark).
        self._marks: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def _live(self, key: str, now: float) -> dict[str, bytes] | Retired | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._items[key]
            return None
        return item[0]

    def get(self, key: str, ttl: float) -> dict[str, bytes] | Retired | None:
        """A copy of the record, its expiry slid to ``ttl`` seconds from now (like GETEX); a
        retired id's marker as it is."""
        now = time.monotonic()
        with self._lock:
            fields = self._live(key, now)
            if fields is None or isinstance(fields, Retired):
                return fields
            self._items[key] = (fields, now + ttl)
            return dict(fields)

    def add(self, key: str, fields: Mapping[str, bytes], ttl: float) -> bool:
        now = time.monotonic()
        with self._lock:
            if self._live(key, now) is not None:
                return False
            if len(self._items) >= self.max_sessions:
                self._evict(now)
            self._items[key] = (dict(fields), now + ttl)
            return True

    def merge(self, key: str, changes: Changes, ttl: float, max_bytes: int) -> int | None:
        """Apply ``changes``; the merged record's size, or None when the record is gone. Over
        ``max_bytes`` nothing is written and the size is returned for the caller to refuse."""
        now = time.monotonic()
        with self._lock:
            current = self._live(key, now)
            if current is None or isinstance(current, Retired):
                return None
            merged = {} if changes.whole else dict(current)
            merged.update(changes.set)
            for name in changes.delete:
                merged.pop(name, None)
            size = record_size(merged)
            if size <= max_bytes:
                self._items[key] = (merged, now + ttl)
            return size

    def delete(self, key: str) -> bool:
        """Whether an unexpired record was there."""
        with self._lock:
            item = self._items.pop(key, None)
            return item is not None and item[1] > time.monotonic() and isinstance(item[0], dict)

    def retire(self, key: str, marker: Retired, ttl: float) -> bool:
        """Replace a live record by ``marker``; whether one was there."""
        now = time.monotonic()
        with self._lock:
            if not isinstance(self._live(key, now), dict):
                return False
            self._items[key] = (marker, now + ttl)
            return True

    def live(self) -> list[tuple[str, dict[str, bytes], float]]:
        """Every unexpired record: (key, fields, seconds left)."""
        now = time.monotonic()
        with self._lock:
            return [
                (k, dict(f), exp - now)
                for k, (f, exp) in self._items.items()
                if exp > now and isinstance(f, dict)
            ]

    def mark(self, user: str, at: float, ttl: float) -> None:
        now = time.monotonic()
        with self._lock:
            for name in [u for u, (_, expires) in self._marks.items() if expires <= now]:
                del self._marks[name]
            self._marks[user] = (at, now + ttl)

    def marked(self, user: str) -> float | None:
        item = self._marks.get(user)
        return None if item is None or item[1] <= time.monotonic() else item[0]

    def _evict(self, now: float) -> None:
        for key in [k for k, (_, expires) in self._items.items() if expires <= now]:
            del self._items[key]
        if len(self._items) >= self.max_sessions:
            del self._items[min(self._items, key=lambda k: self._items[k][1])]


class MemoryRecords(RecordStore):
    """Sessions in a :class:`MemoryStore` (an app may pass its own, shared by its apps), entries
    of keyed state beside them."""

    backend_name = MEMORY

    def __init__(self, sessions: MemoryStore, **options: Any) -> None:
        super().__init__(**options)
        self.sessions = sessions
        self._entries: dict[str, tuple[Entry, float]] = {}
        self._lock = threading.Lock()

    def read(
        self, store_id: str, lifetime: timedelta, user: str | None = None
    ) -> Record | Retired | None:
        fields = self.sessions.get(store_id, lifetime.total_seconds())
        return fields if fields is None or isinstance(fields, Retired) else Record(fields)

    def create(self, store_id: str, fields: Mapping[str, bytes], lifetime: timedelta) -> bool:
        return self.sessions.add(store_id, fields, lifetime.total_seconds())

    def update(self, store_id: str, changes: Changes, lifetime: timedelta, stored: Record) -> bool:
        size = self.sessions.merge(store_id, changes, lifetime.total_seconds(), self.max_bytes)
        if size is None:
            return False
        self.check_size(size)
        return True

    def delete(self, store_id: str) -> bool:
        if self.sessions.delete(store_id):
            return True
        with self._lock:
            return self._live_entry(store_id, time.monotonic()) is not None and bool(
                self._entries.pop(store_id, None)
            )

    def retire(self, store_id: str, marker: Retired) -> bool:
        return self.sessions.retire(store_id, marker, RETIRED_LINGER.total_seconds())

    def ping(self) -> dict[str, object]:
        """Always answers: it is this process."""
        return {}

    def revoked_at(self, user: str) -> float | None:
        return self.sessions.marked(user)

    def mark_revoked(self, user: str, at: float) -> None:
        self.sessions.mark(user, at, mark_lifetime(self.absolute_lifetime))

    def find_user_sessions(self, user: str, lifetime: timedelta) -> dict[str, UserSession]:
        """A scan of the process's sessions (development has few), with the same rules as the
        shared stores: a session its user's revoke ended is not listed, nor a malformed one."""
        found: dict[str, UserSession] = {}
        mark = self.sessions.marked(user)
        for store_id, fields, left in self.sessions.live():
            owner = fields.get(self.user_key)
            if owner is None or _text(owner) != user:
                continue
            since = listed_since(fields)
            if since is not None and (mark is None or not began_before(fields, mark)):
                found[store_id] = user_session(store_id, since, lifetime, left)
        return found

    def revoke(self, user: str, keep: Collection[str], before: float) -> int:
        ended = 0
        for store_id, fields, _ in self.sessions.live():
            owner = fields.get(self.user_key)
            if owner is None or _text(owner) != user or store_id in keep:
                continue
            if began_before(fields, before) and self.sessions.delete(store_id):
                ended += 1
        return ended

    def index(self, store_id: str, user: str) -> None:
        """No index to keep; the cap on sessions per user is applied here, at the login."""
        if self.max_per_user <= 0:
            return
        found = self.find_user_sessions(user, timedelta(0))
        if len(found) > self.max_per_user:
            oldest = sorted(found, key=lambda key: found[key].created_at)
            for stale in oldest[: len(found) - self.max_per_user]:
                if stale != store_id:
                    self.sessions.delete(stale)

    # -- entries (keyed state) ---------------------------------------------------------------------

    def _live_entry(self, key: str, now: float) -> Entry | None:
        item = self._entries.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._entries[key]
            return None
        return item[0]

    def _put(self, key: str, entry: Entry, lifetime: timedelta, now: float) -> None:
        if not entry.fields and entry.lease_until <= time.time():
            self._entries.pop(key, None)
            return
        if key not in self._entries and len(self._entries) >= self.sessions.max_sessions:
            # Full: drop the record closest to expiry (bounded memory in development).
            oldest = min(self._entries, key=lambda name: self._entries[name][1])
            del self._entries[oldest]
        self._entries[key] = (entry, now + lifetime.total_seconds())

    def _merged(
        self,
        entry: Entry | None,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        *,
        fill: bool = False,
    ) -> Entry:
        base = entry or Entry()
        fields = dict(base.fields)
        for name, raw in changed.items():
            if not fill or name not in fields:
                fields[name] = raw
        for name in deleted:
            fields.pop(name, None)
        if changed:
            self.check_size(entry_size(fields))
        return replace(base, fields=fields)

    def load(self, key: str, lifetime: timedelta) -> Entry | None:
        now = time.monotonic()
        with self._lock:
            entry = self._live_entry(key, now)
            if entry is None or not entry.fields:
                return None
            self._entries[key] = (entry, now + lifetime.total_seconds())
            return entry

    def exists(self, key: str) -> bool:
        with self._lock:
            entry = self._live_entry(key, time.monotonic())
            return entry is not None and bool(entry.fields)

    def merge(
        self,
        key: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
        *,
        loaded: Mapping[str, bytes] | None = None,
    ) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._merged(self._live_entry(key, now), changed, deleted)
            self._put(key, entry, lifetime, now)

    def fill(self, key: str, fields: Mapping[str, bytes], lifetime: timedelta) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._merged(self._live_entry(key, now), fields, (), fill=True)
            self._put(key, entry, lifetime, now)

    def acquire(
        self, key: str, lease: timedelta, lifetime: timedelta, *, done: str | None = None
    ) -> Lease | Held | Done:
        now, wall = time.monotonic(), time.time()
        with self._lock:
            entry = self._live_entry(key, now)
            if entry is not None and done is not None and done in entry.fields:
                return Done(entry)
            if entry is not None and entry.lease_until > wall:
                return Held(entry.lease_until - wall)
            base = entry or Entry()
            token = new_token()
            taken = replace(base, fence=token, lease_until=wall + lease.total_seconds())
            self._put(key, taken, max(lifetime, lease), now)
            return Lease(token, entry if entry is not None and entry.fields else None)

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
            entry = self._live_entry(key, now)
            if entry is None or entry.fence != token:
                return False
            merged = replace(self._merged(entry, changed, deleted), lease_until=0.0)
            self._put(key, merged, lifetime, now)
            return True


def _text(raw: bytes) -> str | None:
    try:
        value = codec.unpack_value(raw)
    except ValueError:
        return None
    return None if value is None else str(value)


def create_store(settings: Settings, client: MemoryStore | None = None) -> MemoryRecords:
    """The app's records: in ``client`` when the app passes a MemoryStore, else in a new one."""
    options = settings.store
    assert isinstance(options, Options)
    if client is not None and not isinstance(client, MemoryStore):
        raise TypeError(
            f"client={type(client).__name__} cannot back the memory store; pass a "
            "pyloto_corp.records.memory.MemoryStore or no client."
        )
    store = client if client is not None else MemoryStore(options.max_sessions)
    return MemoryRecords(store, **store_options(settings))
