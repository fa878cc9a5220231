"""Records on Cloud Firestore: one document per record, in the sessions' collection (so its TTL
policy on ``expires_at`` and ``flask session-store cleanup`` cover them).

A document holds ``fields`` (each key's encoded value, by :func:`field_name`), ``expires_at``,
``updated_at``, and the lease: ``fence`` (the latest fencing token) and ``lease_until`` (epoch
seconds; 0 when released). A load is one document read; it slides ``expires_at`` only when that
is more than the refresh interval (or a tenth of the lifetime) stale: a write per read would
double the cost. A merge that
only sets keys is one write, merged field by field by Firestore itself; anything that must look
at the record first (a deletion that may empty it, a lease) reads it and writes on condition
that it is unchanged since (its update time), reading again when another writer came first.

The client and the call wrapper (timeout, retries, error mapping) belong to the caller (the
session backend builds the client from FIRESTORE_PROJECT, or is given one).
"""

from __future__ import annotations

import base64
import contextlib
import re
import sys
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from google.api_core import exceptions as google_exceptions
from google.cloud import firestore
from google.cloud.firestore_v1.field_path import FieldPath

from ..config.settings import FIRESTORE
from ..errors import SessionStoreNotAnswering, SessionStoreUnavailable, UnstorableValue
from .base import Entry, Held, Lease, RecordStore, new_token
from .memory import encoded_size, too_large

FIELDS: Final = "fields"
EXPIRES_AT: Final = "expires_at"
UPDATED_AT: Final = "updated_at"
FENCE: Final = "fence"
LEASE_UNTIL: Final = "lease_until"

#: Firestore's limit on a field name's path, with room for ``fields.``.
MAX_KEY_BYTES = 1000

_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
_ENCODED = "~"


def field_name(key: str) -> str:
    """A key as a map entry name: plain identifiers as they are; anything else (dots,
    backticks, the empty string, ``__reserved__`` names, ``~...``) as ``~`` + base64url."""
    if _PLAIN_NAME.fullmatch(key) and not (key.startswith("__") and key.endswith("__")):
        return key
    encoded = base64.urlsafe_b64encode(key.encode("utf-8", "surrogatepass")).decode()
    return _ENCODED + encoded


def key_of_field(name: str) -> str:
    """The key a map entry name stands for (:func:`field_name` undone)."""
    if not name.startswith(_ENCODED):
        return name
    return base64.urlsafe_b64decode(name[1:].encode()).decode("utf-8", "surrogatepass")


def check_key_length(key: str) -> None:
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise UnstorableValue(
            f"A key of {size:,} bytes is longer than the firestore store accepts "
            f"({MAX_KEY_BYTES:,}); use a shorter key."
        )


def real_time() -> float:
    """Seconds since the epoch from the system clock. freezegun (common in apps' test suites)
    patches ``time.time``, ``time.monotonic`` and ``datetime``, not ``clock_gettime``."""
    if sys.platform == "win32":
        return time.time()
    return time.clock_gettime(time.CLOCK_REALTIME)


def real_monotonic() -> float:
    """A monotonic clock freezegun does not stop, for retry budgets."""
    if sys.platform == "win32":
        return time.monotonic()
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def now() -> datetime:
    """Now on the real clock: what Firestore's TTL policy and every other process compare the
    stored ``expires_at`` with."""
    return datetime.fromtimestamp(real_time(), UTC)


def _path(key: str) -> str:
    return FieldPath(FIELDS, field_name(key)).to_api_repr()


class FirestoreRecords(RecordStore):
    """Records in ``collection`` through the caller's client: ``client()`` returns it (built per
    process), ``call(operation, *args, **kwargs)`` runs one operation within the store's timeout
    and turns its failures into SessionStoreUnavailable (NotFound, AlreadyExists and
    FailedPrecondition pass through: they are answers here)."""

    backend_name = FIRESTORE

    def __init__(
        self,
        client: Callable[[], firestore.Client],
        call: Callable[..., Any],
        *,
        collection: str,
        max_bytes: int,
        refresh_interval: timedelta,
        timeout: float,
    ) -> None:
        self._client = client
        self._call = call
        self.collection = collection
        self.max_bytes = max_bytes
        self.refresh_interval = refresh_interval
        self.timeout = timeout

    def _document(self, key: str) -> Any:
        return self._client().collection(self.collection).document(key)

    @staticmethod
    def _entry(snapshot: Any, at: datetime) -> Entry | None:
        """The live record a snapshot holds; None when absent or expired (the TTL policy or the
        cleanup command deletes it later)."""
        if not snapshot.exists:
            return None
        document = snapshot.to_dict() or {}
        expires_at = document.get(EXPIRES_AT)
        if not isinstance(expires_at, datetime) or expires_at <= at:
            return None
        stored = document.get(FIELDS) or {}
        fence, until = document.get(FENCE, ""), document.get(LEASE_UNTIL, 0.0)
        if not (
            isinstance(stored, dict)
            and all(isinstance(raw, bytes) for raw in stored.values())
            and isinstance(fence, str)
            and isinstance(until, int | float)
        ):
            raise _not_ours()
        fields = {key_of_field(name): raw for name, raw in stored.items()}
        return Entry(fields, fence, float(until))

    def _check(self, fields: Mapping[str, bytes]) -> None:
        for key in fields:
            check_key_length(key)
        size = encoded_size(fields)
        if size > self.max_bytes:
            raise too_large(size, self.max_bytes)

    def load(self, key: str, lifetime: timedelta) -> Entry | None:
        reference = self._document(key)
        snapshot = self._call(reference.get)
        at = now()
        entry = self._entry(snapshot, at)
        if entry is not None:
            expires_at = (snapshot.to_dict() or {})[EXPIRES_AT]
            # At most a tenth of a short lifetime stale, so an entry only read never lapses.
            if at + lifetime - expires_at >= min(self.refresh_interval, lifetime / 10):
                slid = {EXPIRES_AT: at + lifetime, UPDATED_AT: at}
                option = self._client().write_option(last_update_time=snapshot.update_time)
                # Written (or deleted) meanwhile: that write set its own expiry.
                with contextlib.suppress(
                    google_exceptions.FailedPrecondition, google_exceptions.NotFound
                ):
                    self._call(reference.update, slid, option=option)
        return entry

    def exists(self, key: str) -> bool:
        snapshot = self._call(self._document(key).get, field_paths=[EXPIRES_AT])
        expires_at = (snapshot.to_dict() or {}).get(EXPIRES_AT) if snapshot.exists else None
        return isinstance(expires_at, datetime) and expires_at > now()

    def merge(
        self,
        key: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
        *,
        fresh: bool = False,
    ) -> None:
        if not deleted:
            # Keys only set: one write, and the record cannot end up empty. A fresh record is
            # created (a document that expired and still waits for its sweep, or one created
            # meanwhile, makes that fail: then merged below); a live one is merged field by
            # field by Firestore itself. The size is checked on what this write knows (the
            # merged document stays under Firestore's own 1 MiB limit, which refuses the rest).
            self._check(changed)
            at = now()
            data: dict[str, Any] = {FIELDS: {field_name(k): raw for k, raw in changed.items()}}
            data |= {EXPIRES_AT: at + lifetime, UPDATED_AT: at}
            if not fresh:
                self._call(self._document(key).set, data, merge=True)
                return
            try:
                self._call(self._document(key).create, data)
                return
            except google_exceptions.AlreadyExists:
                pass

        def merged(entry: Entry | None) -> Entry | None:
            fields = {**(entry.fields if entry else {}), **changed}
            for name in deleted:
                fields.pop(name, None)
            self._check(fields)
            base = entry or Entry()
            if not fields and base.lease_until <= real_time():
                return None
            return Entry(fields, base.fence, base.lease_until)

        self._rewrite(key, merged, lifetime)

    def delete(self, key: str) -> bool:
        reference = self._document(key)
        snapshot = self._call(reference.get, field_paths=[EXPIRES_AT])
        if not snapshot.exists:
            return False
        self._call(reference.delete)
        expires_at = (snapshot.to_dict() or {}).get(EXPIRES_AT)
        return isinstance(expires_at, datetime) and expires_at > now()

    def acquire(self, key: str, lease: timedelta, lifetime: timedelta) -> Lease | Held:
        token = new_token()
        outcome: list[Lease | Held] = []

        def take(entry: Entry | None) -> Entry | Held | None:
            wall = real_time()
            if entry is not None and entry.lease_until > wall:
                held = Held(entry.lease_until - wall)
                outcome.append(held)
                return held
            base = entry or Entry()
            outcome.append(Lease(token, entry))
            return Entry(base.fields, token, wall + lease.total_seconds())

        self._rewrite(key, take, max(lifetime, lease))
        return outcome[-1]

    def save(
        self,
        key: str,
        token: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
    ) -> bool:
        saved: list[bool] = []

        def apply(entry: Entry | None) -> Entry | Held | None:
            if entry is None or entry.fence != token:
                saved.append(False)
                return Held(0)  # nothing to write
            fields = {**entry.fields, **changed}
            for name in deleted:
                fields.pop(name, None)
            self._check(fields)
            saved.append(True)
            return Entry(fields, entry.fence, 0.0) if fields else None

        self._rewrite(key, apply, lifetime)
        return saved[-1]

    def _rewrite(
        self, key: str, change: Callable[[Entry | None], Entry | Held | None], lifetime: timedelta
    ) -> None:
        """Read the record, write what ``change`` makes of it (None: delete it; Held: write
        nothing) on condition that nobody wrote it since; read again when somebody did, within
        the store's timeout."""
        reference = self._document(key)
        deadline = real_monotonic() + self.timeout
        while True:
            snapshot = self._call(reference.get)
            at = now()
            result = change(self._entry(snapshot, at))
            if isinstance(result, Held):
                return
            try:
                if not snapshot.exists:
                    if result is not None:
                        self._call(reference.create, self._document_data(result, at, lifetime))
                    return
                option = self._client().write_option(last_update_time=snapshot.update_time)
                if result is None:
                    self._call(reference.delete, option=option)
                else:
                    data = self._document_data(result, at, lifetime)
                    self._call(reference.update, data, option=option)
                return
            except (
                google_exceptions.AlreadyExists,
                google_exceptions.FailedPrecondition,
                google_exceptions.NotFound,
            ):
                if real_monotonic() >= deadline:
                    raise SessionStoreNotAnswering(
                        "Firestore record store: the record kept changing under this write "
                        f"for FIRESTORE_TIMEOUT ({self.timeout:g} s); nothing was written"
                    ) from None

    @staticmethod
    def _document_data(entry: Entry, at: datetime, lifetime: timedelta) -> dict[str, Any]:
        return {
            FIELDS: {field_name(k): raw for k, raw in entry.fields.items()},
            FENCE: entry.fence,
            LEASE_UNTIL: entry.lease_until,
            EXPIRES_AT: at + lifetime,
            UPDATED_AT: at,
        }

    def ping(self) -> dict[str, object]:
        self._call(self._document("ping").get, field_paths=[EXPIRES_AT])
        return {}


def _not_ours() -> SessionStoreUnavailable:
    return SessionStoreUnavailable(
        "Firestore record store: a document in the collection is not in the keyed-state layout "
        "(another program writes there?); remove it with `flask session-store state delete`"
    )
