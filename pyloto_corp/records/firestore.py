"""Firestore records: one document per record, written with preconditions, refreshed lazily.

Document ``{collection}/{prefix}{sha256(session id)}`` holds ``fields`` (a map: one entry per
session key, its encoded value), ``expires_at`` (a timestamp a Firestore TTL policy can delete
on), ``updated_at`` and ``user`` (for "log out everywhere": the query on it keeps only ids of
this prefix, as services may share a collection). A document an earlier release wrote
holds the session as one blob in ``data``: it is read, and rewritten as ``fields`` (``data``
removed) on its next change. Two field names, so that an instance of the earlier release writing
``data`` during a rolling deploy can never have a merge of ``fields.<key>`` applied on top of its
blob: a document with ``fields`` is read from ``fields``.

- A read is one document get. TTL deletion is eventual, so a document whose ``expires_at`` has
  passed is treated as absent.
- A read-only request rewrites ``expires_at`` only when it is more than the refresh interval
  stale, keeping each session far below Firestore's one write per second per document.
- A new session is ``create()``d (an id collision fails instead of overwriting), an existing one
  ``update()``d with field paths: only ``fields.<key>`` of the keys the request changed (or
  ``DELETE_FIELD`` for those it deleted), so concurrent requests changing different keys all
  land, and ``update()``'s exists precondition keeps a logout final. No transactions on the hot
  path. Keys that are not plain identifiers are stored under an encoded name.
- ``NotFound`` means "session gone" only for the ``update()`` of an existing session; anywhere
  else it means the database or collection is missing (a typo in FIRESTORE_DATABASE): the store
  is unavailable, a 503 with the database named in the log.
- The client is created on first use in the serving process: gRPC must not be initialised before
  gunicorn forks its workers.
- Time comes from the real clock, also in a test that froze ``time`` and ``datetime``
  (freezegun): the stored expiry is compared by Firestore's TTL policy and by other processes,
  and the call budget must run out.

Keyed-state entries are documents in the same collection (so its TTL policy and ``flask
session-store cleanup`` cover them), with ``fields``, ``expires_at``, ``updated_at`` and their
lease: ``fence`` (the latest fencing token) and ``lease_until`` (epoch seconds; 0 once
released). A merge that only sets keys is one write, merged field by field by Firestore itself;
anything that must look at the entry first (a deletion that may empty it, a lease) reads it and
writes on condition that it is unchanged since (its update time), reading again when another
writer came first.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final

from environs import Env
from google.api_core import exceptions as google_exceptions
from google.api_core.retry import Retry, if_transient_error
from google.auth.exceptions import GoogleAuthError
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.field_path import FieldPath

from ..config.settings import DEPLOYED_ENVIRONMENTS, FIRESTORE, INVALID, Settings, Var
from ..errors import SessionStoreNotAnswering, SessionStoreUnavailable, UnstorableValue
from . import codec
from .base import (
    CLIENT_GIVEN,
    CREATED_AT,
    USER_SINCE,
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
    store_options,
    user_session,
)

logger = logging.getLogger("pyloto_corp.session_store")

FIRESTORE_PROJECT = "FIRESTORE_PROJECT"
FIRESTORE_DATABASE = "FIRESTORE_DATABASE"
FIRESTORE_COLLECTION = "FIRESTORE_COLLECTION"
FIRESTORE_TIMEOUT = "FIRESTORE_TIMEOUT"
FIRESTORE_REFRESH_INTERVAL = "FIRESTORE_REFRESH_INTERVAL"

#: Firestore's document limit is 1 MiB including field names and the document name.
MAX_DATA_BYTES = 1_048_576 - 4_096
DELETE_BATCH_SIZE = 500
#: The document field holding the session's user (SESSION_USER_KEY's value, as text).
USER_FIELD = "user"
#: The map of the session's keys; ``data`` is where an earlier release kept the whole blob.
FIELDS = "fields"
LEGACY_DATA = "data"
#: The marker a login or a logout leaves (``base.Retired``) is a document of its own, this
#: suffix after the session's id, with ``expires_at`` (on the real clock), ``retired_to`` (the
#: successor's id) and ``retired_until`` (``Retired.until``, on the app's clock, which a test
#: may have frozen): deleting the session document keeps ``update()``'s exists precondition the
#: test of "gone".
RETIRED_SUFFIX = "~retired"
RETIRED_TO = "retired_to"
RETIRED_UNTIL = "retired_until"
#: The field of a user's revocation-mark document holding the revoke's time (epoch seconds).
MARK_FIELD = "revoked_at"
#: Documents per query page when listing or revoking a user's sessions.
QUERY_PAGE = 500


def is_valid_collection_id(name: str) -> bool:
    """Firestore's rules for a collection id (and a document id)."""
    if not name or "/" in name or name in (".", ".."):
        return False
    if name.startswith("__") and name.endswith("__"):
        return False
    return len(name.encode()) <= 1500


EXPIRES_AT: Final = "expires_at"
UPDATED_AT: Final = "updated_at"
FENCE: Final = "fence"
LEASE_UNTIL: Final = "lease_until"


@dataclass(frozen=True)
class Options(StoreOptions):
    backend: ClassVar[str] = FIRESTORE
    VARIABLES: ClassVar[tuple[str, ...]] = (
        FIRESTORE_PROJECT,
        FIRESTORE_DATABASE,
        FIRESTORE_COLLECTION,
        FIRESTORE_TIMEOUT,
        FIRESTORE_REFRESH_INTERVAL,
    )

    #: None: GOOGLE_CLOUD_PROJECT, then whatever the client library finds.
    project: str | None = None
    database: str = "(default)"
    collection: str = "sessions"
    #: Seconds a store call may take, retries included.
    timeout: float = 5.0
    #: How stale the stored expiry may get before a read-only request rewrites it (None: a tenth
    #: of the lifetime). Keeps Firestore at about one write per session per interval.
    refresh_interval: timedelta | None = None
    #: The app passes its own ``firestore.Client``: the project and database are its own.
    client_given: bool = False

    @classmethod
    def from_env(cls, env: Env) -> Options:
        project = env.str(FIRESTORE_PROJECT, None) or env.str(Var.GOOGLE_CLOUD_PROJECT, None)
        values: dict[str, Any] = {
            "project": project or None,
            "database": env.str(FIRESTORE_DATABASE, None),
            "collection": env.str(FIRESTORE_COLLECTION, None),
            "timeout": env.float(FIRESTORE_TIMEOUT, None),
            "refresh_interval": env.timedelta(FIRESTORE_REFRESH_INTERVAL, None),
        }
        return cls(**{name: value for name, value in values.items() if value is not None})

    def with_client(self) -> Options:
        return dataclasses.replace(self, client_given=True)

    def effective_refresh_interval(self, lifetime: timedelta) -> timedelta:
        return lifetime / 10 if self.refresh_interval is None else self.refresh_interval

    def problems(self, settings: Settings) -> list[str]:
        problems: list[str] = []
        deployed = settings.environment in DEPLOYED_ENVIRONMENTS
        if not self.project and deployed and not self.client_given:
            problems.append(
                f"{FIRESTORE_PROJECT} (or {Var.GOOGLE_CLOUD_PROJECT}) is required "
                f"{settings.where()} when SESSION_STORE_BACKEND=firestore; "
                "set it to the Google Cloud project id that holds the database."
            )
        if not is_valid_collection_id(self.collection):
            problems.append(
                f"{FIRESTORE_COLLECTION} is not a valid Firestore collection id: 1 to 1,500 "
                "bytes, no '/', not '.' or '..', and not of the form __name__."
            )
        if not self.database and not self.client_given:
            problems.append(
                f"{FIRESTORE_DATABASE} must not be empty; use (default) for the default database."
            )
        if "/" in settings.session_key_prefix:
            problems.append(
                f"{Var.SESSION_KEY_PREFIX} must not contain '/' with the firestore backend "
                "(it starts every document id)."
            )
        lifetime = settings.session_lifetime
        interval = self.effective_refresh_interval(lifetime)
        if lifetime > timedelta(0) and not timedelta(0) <= interval < lifetime:
            problems.append(
                f"{FIRESTORE_REFRESH_INTERVAL} must be at least 0 and shorter than "
                f"{Var.SESSION_LIFETIME}."
            )
        if not 0 < self.timeout <= 60:
            problems.append(
                f"{FIRESTORE_TIMEOUT} must be a number of seconds above 0 and at most 60."
            )
        return problems

    def redacted(self, settings: Settings) -> dict[str, Any]:
        interval = self.effective_refresh_interval(settings.session_lifetime)
        return {
            FIRESTORE_PROJECT: CLIENT_GIVEN if self.client_given else self.project,
            FIRESTORE_DATABASE: CLIENT_GIVEN if self.client_given else self.database,
            FIRESTORE_COLLECTION: self.collection
            if is_valid_collection_id(self.collection)
            else INVALID,
            FIRESTORE_TIMEOUT: self.timeout,
            FIRESTORE_REFRESH_INTERVAL: int(interval.total_seconds()),
        }


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


def _now() -> datetime:
    """Now on the real clock: what Firestore's TTL policy and every other process compare the
    stored ``expires_at`` with."""
    return datetime.fromtimestamp(real_time(), UTC)


#: Backoff between retries of a transient error (seconds).
RETRY_INITIAL, RETRY_MAXIMUM = 0.05, 0.5


def _retryable(deadline: float, exc: Exception) -> bool:
    """A transient error, with time left for another attempt before ``deadline`` (real
    monotonic seconds; google-api-core's own budget reads ``time.monotonic()``, which a frozen
    clock stops)."""
    return bool(if_transient_error(exc)) and real_monotonic() + RETRY_MAXIMUM < deadline


#: What follows SESSION_KEY_PREFIX in a session's document id (``hashed_store_id``).
_HASHED_ID = re.compile(r"[0-9a-f]{64}")


_SINCE_PATHS = tuple(FieldPath(FIELDS, key).to_api_repr() for key in (USER_SINCE, CREATED_AT))


def _since_fields(document: Mapping[str, Any]) -> dict[str, bytes]:
    """The session keys a listing reads, from a document fetched with ``_SINCE_PATHS``."""
    stored = document.get(FIELDS)
    if not isinstance(stored, dict):
        return {}
    return {
        key: raw for key in (USER_SINCE, CREATED_AT) if isinstance(raw := stored.get(key), bytes)
    }


#: Firestore did not answer within FIRESTORE_TIMEOUT (transient errors are retried until then:
#: one that ends ``_call`` is the last before the budget ran out, see :func:`_not_answering`).
NOT_ANSWERING = (google_exceptions.DeadlineExceeded, google_exceptions.RetryError)


def _not_answering(exc: Exception) -> bool:
    return isinstance(exc, NOT_ANSWERING) or bool(if_transient_error(exc))


class FirestoreRecords(RecordStore):
    backend_name = FIRESTORE

    def __init__(
        self,
        client_factory: Callable[[], firestore.Client],
        *,
        database: str,
        collection: str,
        timeout: float,
        refresh_interval: timedelta,
        full_lifetime: timedelta,
        **options: Any,
    ) -> None:
        options["max_bytes"] = min(options["max_bytes"], MAX_DATA_BYTES)
        super().__init__(**options)
        self.database = database
        self.collection = collection
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self._client_factory = client_factory
        #: A session's full idle lifetime (a shorter, anonymous one refreshes more often).
        self.full_lifetime = full_lifetime

    # -- client ------------------------------------------------------------------------------------

    @property
    def client(self) -> firestore.Client:
        """Built on first use in each process (a gRPC channel does not survive a fork)."""
        try:
            return self.process_client(self._client_factory)
        except GoogleAuthError as exc:
            raise SessionStoreUnavailable(
                "Firestore session store: no usable Google credentials "
                f"({type(exc).__name__}); on Cloud Run grant the service account "
                "roles/datastore.user"
            ) from None

    def server_address(self) -> str | None:
        """The emulator's host when FIRESTORE_EMULATOR_HOST is set, else Firestore's endpoint."""
        emulator = os.environ.get("FIRESTORE_EMULATOR_HOST", "")
        return emulator.rsplit(":", 1)[0] if emulator else "firestore.googleapis.com"

    def _document(self, store_id: str) -> firestore.DocumentReference:
        return self.client.collection(self.collection).document(store_id)

    def _call(
        self,
        operation: Callable[..., Any],
        *args: Any,
        missing_is_gone: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run one operation within the timeout, retrying transient errors (unavailable, internal,
        too many requests) while time is left. ``NotFound`` is re-raised only where it means
        "this session is gone" (``missing_is_gone``); elsewhere the database is missing."""
        deadline = real_monotonic() + self.timeout
        retry = Retry(
            predicate=functools.partial(_retryable, deadline),
            initial=RETRY_INITIAL,
            maximum=RETRY_MAXIMUM,
            timeout=None,
        )
        # gRPC turns the timeout into a deadline by adding it to ``time.time()``: under a clock
        # frozen in the past that deadline has already passed. Add how far behind it is (a clock
        # frozen ahead only makes the deadline later; the retry budget above still holds).
        timeout = self.timeout + max(0.0, real_time() - time.time())
        try:
            return operation(*args, retry=retry, timeout=timeout, **kwargs)
        except google_exceptions.NotFound:
            if missing_is_gone:
                raise
            raise SessionStoreUnavailable(
                f"Firestore session store: database {self.database!r} or collection "
                f"{self.collection!r} not found (NotFound); check FIRESTORE_PROJECT and "
                "FIRESTORE_DATABASE"
            ) from None
        except (google_exceptions.AlreadyExists, google_exceptions.FailedPrecondition):
            raise  # answers: the condition of a write did not hold
        except (google_exceptions.GoogleAPIError, GoogleAuthError) as exc:
            silent = _not_answering(exc)
            raise (SessionStoreNotAnswering if silent else SessionStoreUnavailable)(
                f"Firestore session store (database {self.database!r}, collection "
                f"{self.collection!r}) failed: {type(exc).__name__}"
            ) from None

    # -- the contract ------------------------------------------------------------------------------

    def read(
        self, store_id: str, lifetime: timedelta, user: str | None = None
    ) -> Record | Retired | None:
        if not is_valid_collection_id(store_id):
            return None
        mark: float | None = None
        if user is None:
            snapshot = self._call(self._document(store_id).get)
        else:
            # The user's revocation mark in the same call (one round trip, two document reads).
            session_ref, mark_ref = self._document(store_id), self._mark_document(user)
            found = {
                each.reference.path: each
                for each in self._call(self._get_all, [session_ref, mark_ref])
            }
            snapshot, mark_snapshot = found[session_ref.path], found[mark_ref.path]
            mark = _mark((mark_snapshot.to_dict() or {}) if mark_snapshot.exists else {})
        if not snapshot.exists:
            return self._retired(store_id)
        document = snapshot.to_dict() or {}
        expires_at, stored = document.get("expires_at"), document.get(FIELDS)
        if not isinstance(expires_at, datetime):
            return self._malformed(store_id)
        if expires_at <= _now():
            return None  # expired; the TTL policy or the cleanup command deletes it later
        if stored is None:
            blob = document.get(LEGACY_DATA)
            if not isinstance(blob, bytes):
                return self._malformed(store_id)
            # An earlier release's blob.
            return Record(None, blob=blob, version=expires_at, mark_user=user, mark=mark)
        if not isinstance(stored, dict):
            return self._malformed(store_id)
        try:
            fields = {key_of_field(name): raw for name, raw in stored.items()}
        except ValueError:
            return self._malformed(store_id)
        if not fields or not all(isinstance(raw, bytes) for raw in fields.values()):
            return self._malformed(store_id)
        return Record(fields, version=expires_at, mark_user=user, mark=mark)

    def _get_all(self, references: list[Any], **kwargs: Any) -> list[Any]:
        """``Client.get_all``, read to the end inside the call's error handling."""
        return list(self.client.get_all(references, **kwargs))

    def _retired(self, store_id: str) -> Retired | None:
        """The marker left at a retired id: a second read, only for an id with no session."""
        snapshot = self._call(self._document(store_id + RETIRED_SUFFIX).get)
        document = (snapshot.to_dict() or {}) if snapshot.exists else {}
        expires_at, successor = document.get("expires_at"), document.get(RETIRED_TO)
        if not isinstance(expires_at, datetime) or expires_at <= _now():
            return None
        until = document.get(RETIRED_UNTIL)
        if not isinstance(until, float):
            until = expires_at.timestamp()  # written by the previous release: one clock
        return Retired(successor if isinstance(successor, str) else None, until)

    @staticmethod
    def _malformed(store_id: str) -> None:
        logger.warning(
            "Discarded malformed session document %s; starting a fresh session", store_id
        )

    @staticmethod
    def _data(fields: Mapping[str, bytes]) -> dict[str, bytes]:
        for key in fields:
            check_key_length(key)
        return {field_name(key): raw for key, raw in fields.items()}

    def create(self, store_id: str, fields: Mapping[str, bytes], lifetime: timedelta) -> bool:
        now = _now()
        document = {FIELDS: self._data(fields), "expires_at": now + lifetime, "updated_at": now}
        owner = self._owner(fields)
        if owner is not None:
            document[USER_FIELD] = owner
        try:
            self._call(self._document(store_id).create, document)
        except google_exceptions.AlreadyExists:
            return False
        return True

    def update(self, store_id: str, changes: Changes, lifetime: timedelta, stored: Record) -> bool:
        now = _now()
        updates: dict[str, Any] = {"expires_at": now + lifetime, "updated_at": now}
        if changes.whole:
            updates[FIELDS] = self._data(changes.set)
            updates[LEGACY_DATA] = firestore.DELETE_FIELD
        else:
            for key, raw in changes.set.items():
                check_key_length(key)
                updates[FieldPath(FIELDS, field_name(key)).to_api_repr()] = raw
            for key in changes.delete:
                updates[FieldPath(FIELDS, field_name(key)).to_api_repr()] = firestore.DELETE_FIELD
        if changes.whole or self.user_key in changes.set or self.user_key in changes.delete:
            owner = self._owner(changes.set)
            updates[USER_FIELD] = firestore.DELETE_FIELD if owner is None else owner
        return self._update(store_id, updates)

    def _owner(self, fields: Mapping[str, bytes]) -> str | None:
        """The ``user`` field: the session's user as text, queried by find_user_sessions()."""
        raw = fields.get(self.user_key)
        value = None if raw is None else codec.unpack_value(raw)
        return None if value is None else str(value)

    def _update(self, store_id: str, fields: dict[str, Any]) -> bool:
        try:
            self._call(self._document(store_id).update, fields, missing_is_gone=True)
        except google_exceptions.NotFound:
            return False
        return True

    def touch(self, store_id: str, stored: Record, lifetime: timedelta) -> None:
        """Slide the stored expiry when it is more than the refresh interval stale (for a
        shorter, anonymous lifetime, at most a tenth of it: 3 min of 30 with the defaults, so
        a visitor who only reads never drops out; a shorter interval set is kept)."""
        now = _now()
        expires_at = stored.version
        interval, full = self.refresh_interval, self.full_lifetime
        if timedelta(0) < lifetime < full:
            interval = min(interval, lifetime / 10)
        if not isinstance(expires_at, datetime) or now + lifetime - expires_at < interval:
            return
        self._update(store_id, {"expires_at": now + lifetime, "updated_at": now})

    def delete(self, store_id: str) -> bool:
        if not is_valid_collection_id(store_id):
            return False
        exists = self.client.write_option(exists=True)
        try:
            self._call(self._document(store_id).delete, option=exists, missing_is_gone=True)
        except google_exceptions.NotFound:
            return False
        return True

    def retire(self, store_id: str, marker: Retired) -> bool:
        """One atomic batch: the marker document written, the session document deleted if it
        exists (the whole batch fails, writing nothing, when it does not)."""
        if not is_valid_collection_id(store_id + RETIRED_SUFFIX):
            return False
        batch = self.client.batch()
        # The linger measured on the app's clock, counted from now on the real one.
        expires_at = _now() + timedelta(seconds=marker.until - time.time())
        batch.set(
            self._document(store_id + RETIRED_SUFFIX),
            {"expires_at": expires_at, RETIRED_TO: marker.successor, RETIRED_UNTIL: marker.until},
        )
        batch.delete(self._document(store_id), option=self.client.write_option(exists=True))
        try:
            self._call(batch.commit, missing_is_gone=True)
        except google_exceptions.NotFound:
            # Gone before this call, or this very batch committed and its retry (the answer
            # lost on the way) found it gone: the marker tells which.
            if marker.successor is None:
                return False
            snapshot = self._call(self._document(store_id + RETIRED_SUFFIX).get)
            found = (snapshot.to_dict() or {}) if snapshot.exists else {}
            return bool(found.get(RETIRED_TO) == marker.successor)
        return True

    def ping(self) -> dict[str, object]:
        """One cheap read, to prove the database answers (readiness, ``ping``)."""
        self._call(self._document(self.key_prefix + "ping").get)
        return {"database": self.database}

    # -- the user index: the ``user`` field, queried with an equality filter -----------------------

    def _owns(self, store_id: str) -> bool:
        """Whether a document id is one of this service's sessions: the prefix, then a sha256 in
        hex and nothing more (a prefix may begin another one: ``session:`` and ``session:b:``)."""
        return store_id.startswith(self.key_prefix) and bool(
            _HASHED_ID.fullmatch(store_id, len(self.key_prefix))
        )

    def _mark_document(self, user: str) -> firestore.DocumentReference:
        """The user's revocation mark: a document beside the sessions, in the prefix's space
        (``expires_at`` set, so the TTL policy and ``cleanup`` remove it like a session)."""
        digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()
        return self._document(f"{self.key_prefix}revoked-{digest}")

    def revoked_at(self, user: str) -> float | None:
        snapshot = self._call(self._mark_document(user).get)
        return _mark((snapshot.to_dict() or {}) if snapshot.exists else {})

    def mark_revoked(self, user: str, at: float) -> None:
        expires_at = _now() + timedelta(seconds=mark_lifetime(self.absolute_lifetime))
        self._call(self._mark_document(user).set, {MARK_FIELD: at, "expires_at": expires_at})

    def _user_pages(self, user: str) -> Iterator[list[Any]]:
        """The user's session documents, a page at a time, with only what a listing needs
        (never a session's data)."""
        collection = self.client.collection(self.collection)
        query = (
            collection.where(filter=FieldFilter(USER_FIELD, "==", user))
            .select(["expires_at", *_SINCE_PATHS])
            .limit(QUERY_PAGE)
        )
        after = None
        while True:
            page = list(self._call((query if after is None else query.start_after(after)).get))
            # The query also finds documents of other services sharing the collection under
            # another SESSION_KEY_PREFIX: only this prefix's ids are kept.
            mine = [snapshot for snapshot in page if self._owns(snapshot.id)]
            if mine:
                yield mine
            if len(page) < QUERY_PAGE:
                return
            after = page[-1]

    def find_user_sessions(self, user: str, lifetime: timedelta) -> dict[str, UserSession]:
        """The user's live documents that their last revoke did not end; beyond
        SESSION_MAX_PER_USER the oldest are deleted here (Firestore has no login-time hook
        that could count them without a query)."""
        now = _now()
        mark = self.revoked_at(user)
        found: dict[str, UserSession] = {}
        for page in self._user_pages(user):
            for snapshot in page:
                document = snapshot.to_dict() or {}
                expires_at = document.get("expires_at")
                if not isinstance(expires_at, datetime) or expires_at <= now:
                    continue  # expired: the TTL policy or `cleanup` deletes it
                fields = _since_fields(document)
                since = listed_since(fields)
                if since is None or (mark is not None and began_before(fields, mark)):
                    continue  # malformed, or revoked: no session
                left = (expires_at - now).total_seconds()
                found[snapshot.id] = user_session(snapshot.id, since, lifetime, left)
        over = len(found) - self.max_per_user
        if self.max_per_user > 0 and over > 0:
            oldest = sorted(found, key=lambda store_id: found[store_id].created_at)[:over]
            self._delete_all(oldest)
            for store_id in oldest:
                del found[store_id]
        return found

    def revoke(self, user: str, keep: Collection[str], before: float) -> int:
        """Delete, a page at a time, the user's documents that became theirs before the
        revoke (a login landing after it stays), but the kept ones."""
        ended, now = 0, _now()
        for page in self._user_pages(user):
            targets = []
            for snapshot in page:
                document = snapshot.to_dict() or {}
                if snapshot.id not in keep and began_before(_since_fields(document), before):
                    targets.append(snapshot.id)
                    expires_at = document.get("expires_at")
                    ended += isinstance(expires_at, datetime) and expires_at > now
            self._delete_all(targets)  # the expired too: they would wait for the TTL policy
        return ended

    def _delete_all(self, store_ids: list[str]) -> None:
        collection = self.client.collection(self.collection)
        for start in range(0, len(store_ids), DELETE_BATCH_SIZE):
            batch = self.client.batch()
            for store_id in store_ids[start : start + DELETE_BATCH_SIZE]:
                batch.delete(collection.document(store_id))
            self._call(batch.commit)

    # -- operations --------------------------------------------------------------------------------

    def delete_expired(self, batch_size: int = DELETE_BATCH_SIZE) -> int:
        """Delete documents whose ``expires_at`` has passed, in batches; return how many."""
        collection = self.client.collection(self.collection)
        query = collection.where(filter=FieldFilter("expires_at", "<", _now()))
        deleted = 0
        while True:
            snapshots = list(self._call(query.limit(batch_size).get))
            if not snapshots:
                return deleted
            batch = self.client.batch()
            for snapshot in snapshots:
                batch.delete(snapshot.reference)
            self._call(batch.commit)
            deleted += len(snapshots)

    def _answer(self, operation: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """:meth:`_call` where NotFound is an answer (the document is gone), not a missing
        database."""
        return self._call(operation, *args, missing_is_gone=True, **kwargs)

    # -- entries (keyed state) ---------------------------------------------------------------------

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
        self.check_size(entry_size(fields))

    def load(self, key: str, lifetime: timedelta) -> Entry | None:
        reference = self._document(key)
        snapshot = self._answer(reference.get)
        at = _now()
        entry = self._entry(snapshot, at)
        if entry is None or not entry.fields:
            return None
        expires_at = (snapshot.to_dict() or {})[EXPIRES_AT]
        # At most a tenth of a short lifetime stale, so an entry only read never lapses.
        if at + lifetime - expires_at >= min(self.refresh_interval, lifetime / 10):
            slid = {EXPIRES_AT: at + lifetime, UPDATED_AT: at}
            option = self.client.write_option(last_update_time=snapshot.update_time)
            # Written (or deleted) meanwhile: that write set its own expiry.
            with contextlib.suppress(
                google_exceptions.FailedPrecondition, google_exceptions.NotFound
            ):
                self._answer(reference.update, slid, option=option)
        return entry

    def exists(self, key: str) -> bool:
        entry = self._entry(self._answer(self._document(key).get), _now())
        return entry is not None and bool(entry.fields)

    def delete_entry(self, key: str) -> bool:
        """Only a live entry counts: one that expired and waits for its sweep is deleted, and
        answers False, as on Redis."""
        reference = self._document(key)
        snapshot = self._answer(reference.get, field_paths=[EXPIRES_AT])
        if not snapshot.exists:
            return False
        option = self.client.write_option(last_update_time=snapshot.update_time)
        try:
            self._answer(reference.delete, option=option)
        except (google_exceptions.FailedPrecondition, google_exceptions.NotFound):
            # Written meanwhile (so live), or deleted meanwhile: delete what is there now.
            return self.delete(key)
        expires_at = (snapshot.to_dict() or {}).get(EXPIRES_AT)
        return isinstance(expires_at, datetime) and expires_at > _now()

    def merge(
        self,
        key: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
        *,
        loaded: Mapping[str, bytes] | None = None,
    ) -> None:
        if not deleted:
            # Keys only set: one write, and the entry cannot end up empty. A new entry is
            # created (a document that expired and still waits for its sweep, or one created
            # meanwhile, makes that fail: then merged below); a live one is merged field by
            # field by Firestore itself. The size is checked on the entry as the caller loaded
            # it with these changes (a concurrent writer's keys are counted by the next write).
            self._check({**(loaded or {}), **changed})
            at = _now()
            data: dict[str, Any] = {FIELDS: {field_name(k): raw for k, raw in changed.items()}}
            data |= {EXPIRES_AT: at + lifetime, UPDATED_AT: at}
            if loaded is not None:
                self._answer(self._document(key).set, data, merge=True)
                return
            try:
                self._answer(self._document(key).create, data)
                return
            except google_exceptions.AlreadyExists:
                pass
        self._rewrite(key, _merging(self, changed, deleted, fill=False), lambda _: lifetime)

    def fill(self, key: str, fields: Mapping[str, bytes], lifetime: timedelta) -> None:
        self._rewrite(key, _merging(self, fields, (), fill=True), lambda _: lifetime)

    def acquire(
        self, key: str, lease: timedelta, lifetime: timedelta, *, done: str | None = None
    ) -> Lease | Held | Done:
        token = new_token()
        outcome: list[Lease | Held | Done] = []

        def take(entry: Entry | None) -> Entry | Held | None:
            wall = real_time()
            if entry is not None and done is not None and done in entry.fields:
                outcome.append(Done(entry))
                return Held(0)  # nothing to write
            if entry is not None and entry.lease_until > wall:
                held = Held(entry.lease_until - wall)
                outcome.append(held)
                return held
            base = entry or Entry()
            outcome.append(Lease(token, entry if entry is not None and entry.fields else None))
            return Entry(base.fields, token, wall + lease.total_seconds())

        self._rewrite(key, take, lambda _: max(lifetime, lease))
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
            if changed:
                self._check(fields)
            saved.append(True)
            return Entry(fields, entry.fence, 0.0) if fields else None

        self._rewrite(key, apply, lambda _: lifetime)
        return saved[-1]

    def _rewrite(
        self,
        key: str,
        change: Callable[[Entry | None], Entry | Held | None],
        lifetime: Callable[[Entry], timedelta],
    ) -> None:
        """Read the entry, write what ``change`` makes of it (None: delete it; Held: write
        nothing; kept for ``lifetime(entry)``) on condition that nobody wrote it since; read
        again, after a short pause, when somebody did, within the store's timeout."""
        reference = self._document(key)
        deadline = real_monotonic() + self.timeout
        pause = 0.01
        while True:
            snapshot = self._answer(reference.get)
            at = _now()
            result = change(self._entry(snapshot, at))
            if isinstance(result, Held):
                return
            try:
                if not snapshot.exists:
                    if result is not None:
                        data = self._document_data(result, at, lifetime(result))
                        self._answer(reference.create, data)
                    return
                option = self.client.write_option(last_update_time=snapshot.update_time)
                if result is None:
                    self._answer(reference.delete, option=option)
                else:
                    data = self._document_data(result, at, lifetime(result))
                    self._answer(reference.update, data, option=option)
                return
            except (
                google_exceptions.AlreadyExists,
                google_exceptions.FailedPrecondition,
                google_exceptions.NotFound,
            ):
                left = deadline - real_monotonic()
                if left <= 0:
                    # The store answers: busy with this entry, not down (the breaker stays).
                    raise SessionStoreUnavailable(
                        "Firestore record store: the entry kept changing under this write "
                        f"for FIRESTORE_TIMEOUT ({self.timeout:g} s); nothing was written"
                    ) from None
                time.sleep(min(left, pause * random.uniform(0.5, 1.0)))  # noqa: S311
                pause = min(0.2, pause * 2)

    @staticmethod
    def _document_data(entry: Entry, at: datetime, lifetime: timedelta) -> dict[str, Any]:
        return {
            FIELDS: {field_name(k): raw for k, raw in entry.fields.items()},
            FENCE: entry.fence,
            LEASE_UNTIL: entry.lease_until,
            EXPIRES_AT: at + lifetime,
            UPDATED_AT: at,
        }


def _merging(
    store: FirestoreRecords,
    changed: Mapping[str, bytes],
    deleted: Collection[str],
    *,
    fill: bool,
) -> Callable[[Entry | None], Entry | None]:
    """What a merge (or a fill: only keys not held yet) makes of an entry read as it is now."""

    def merged(entry: Entry | None) -> Entry | None:
        base = entry or Entry()
        fields = dict(base.fields)
        for name, raw in changed.items():
            if not fill or name not in fields:
                fields[name] = raw
        for name in deleted:
            fields.pop(name, None)
        if changed:
            store._check(fields)
        if not fields and base.lease_until <= real_time():
            return None
        return Entry(fields, base.fence, base.lease_until)

    return merged


def _mark(document: Mapping[str, Any]) -> float | None:
    """A revocation mark document's time; None when there is none (or it expired)."""
    at, expires_at = document.get(MARK_FIELD), document.get("expires_at")
    if not isinstance(expires_at, datetime) or expires_at <= _now():
        return None
    return float(at) if isinstance(at, int | float) and not isinstance(at, bool) else None


def _not_ours() -> SessionStoreUnavailable:
    return SessionStoreUnavailable(
        "Firestore record store: a document in the collection is not in the keyed-state layout "
        "(another program writes there?); remove it with `flask session-store state delete`"
    )


def create_store(settings: Settings, client: firestore.Client | None = None) -> FirestoreRecords:
    """The app's records: in ``client`` when the app passes one, else a client of
    FIRESTORE_PROJECT's database built on first use in each process."""
    options = settings.store
    assert isinstance(options, Options)
    if client is not None and not isinstance(client, firestore.Client):
        raise TypeError(
            f"client={type(client).__name__} cannot back the firestore session store; pass a "
            "google.cloud.firestore.Client, or no client to connect with FIRESTORE_PROJECT."
        )
    database = options.database
    if client is not None:
        given = client
        # The client's own database, for the log lines that name it.
        database = str(getattr(client, "_database", None) or database)

    def factory() -> firestore.Client:
        if client is not None:
            return given
        # FIRESTORE_EMULATOR_HOST, when set, is honoured by the client library itself.
        return firestore.Client(project=options.project, database=options.database)

    return FirestoreRecords(
        factory,
        database=database,
        collection=options.collection,
        timeout=options.timeout,
        refresh_interval=options.effective_refresh_interval(settings.session_lifetime),
        full_lifetime=settings.session_lifetime,
        **store_options(settings),
    )
