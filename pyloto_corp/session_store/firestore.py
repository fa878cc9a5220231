"""Firestore store: one document per session, written with preconditions, refreshed lazily.

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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

from environs import Env
from flask import Flask
from google.api_core import exceptions as google_exceptions
from google.api_core.retry import Retry, if_transient_error
from google.auth.exceptions import GoogleAuthError
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.field_path import FieldPath

from ..config.settings import DEPLOYED_ENVIRONMENTS, FIRESTORE, INVALID, Settings, Var
from ..errors import SessionStoreNotAnswering, SessionStoreUnavailable
from ..records.firestore import (
    FirestoreRecords,
    check_key_length,
    field_name,
    key_of_field,
    real_monotonic,
    real_time,
)
from ..records.firestore import (
    now as _now,
)
from . import codec
from .base import (
    CLIENT_GIVEN,
    CREATED_AT,
    USER_SINCE,
    Changes,
    Record,
    Retired,
    StoreInterface,
    StoreOptions,
    UserSession,
    began_before,
    interface_options,
    listed_since,
    mark_lifetime,
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


class FirestoreSessionInterface(StoreInterface):
    backend_name = FIRESTORE

    def __init__(
        self,
        app: Flask,
        client_factory: Callable[[], firestore.Client],
        *,
        database: str,
        collection: str,
        timeout: float,
        refresh_interval: timedelta,
        **options: Any,
    ) -> None:
        options["max_bytes"] = min(options["max_bytes"], MAX_DATA_BYTES)
        super().__init__(app, **options)
        self.database = database
        self.collection = collection
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self._client_factory = client_factory
        self.records = FirestoreRecords(
            lambda: self.client,
            functools.partial(self._call, missing_is_gone=True),
            collection=collection,
            max_bytes=self.max_bytes,
            refresh_interval=refresh_interval,
            timeout=timeout,
        )

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
        interval, full = self.refresh_interval, self.app.permanent_session_lifetime
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

    def delete_expired_sessions(self, batch_size: int = DELETE_BATCH_SIZE) -> int:
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


def _mark(document: Mapping[str, Any]) -> float | None:
    """A revocation mark document's time; None when there is none (or it expired)."""
    at, expires_at = document.get(MARK_FIELD), document.get("expires_at")
    if not isinstance(expires_at, datetime) or expires_at <= _now():
        return None
    return float(at) if isinstance(at, int | float) and not isinstance(at, bool) else None


def create_interface(
    app: Flask, settings: Settings, client: firestore.Client | None = None
) -> FirestoreSessionInterface:
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

    return FirestoreSessionInterface(
        app,
        factory,
        database=database,
        collection=options.collection,
        timeout=options.timeout,
        refresh_interval=options.effective_refresh_interval(settings.session_lifetime),
        **interface_options(settings),
    )
