"""Firestore store: one document per session, written with preconditions, refreshed lazily.

Document ``{collection}/{prefix}{sha256(session id)}`` holds ``data`` (msgpack bytes),
``expires_at`` (a timestamp a Firestore TTL policy can delete on) and ``updated_at``.

- A read is one document get. TTL deletion is eventual, so a document whose ``expires_at`` has
  passed is treated as absent.
- A read-only request rewrites ``expires_at`` only when it is more than the refresh interval
  stale, keeping each session far below Firestore's one write per second per document.
- A new session is ``create()``d (an id collision fails instead of overwriting), an existing one
  ``update()``d, so a slow request finishing after a logout cannot bring the session back: its
  ``NotFound`` clears the cookie. No transactions on the hot path.
- The client is created on first use in the serving process: gRPC must not be initialised before
  gunicorn forks its workers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Flask, Response
from flask_session.base import ServerSideSession, ServerSideSessionInterface
from google.api_core import exceptions as google_exceptions
from google.api_core.retry import Retry, if_transient_error
from google.auth.exceptions import GoogleAuthError
from google.cloud import firestore
from google.cloud.firestore_v1.base_query import FieldFilter

from ..config.settings import Settings, is_valid_collection_id
from ..errors import SessionStoreUnavailable
from .base import SessionGone, StoreInterfaceMixin

logger = logging.getLogger("pyloto_corp.session_store")

#: Firestore's document limit is 1 MiB including field names and the document name.
MAX_DATA_BYTES = 1_048_576 - 4_096
DELETE_BATCH_SIZE = 500


def _now() -> datetime:
    return datetime.now(UTC)


class FirestoreSessionInterface(StoreInterfaceMixin, ServerSideSessionInterface):
    backend_name = "firestore"
    # Firestore deletes expired documents itself once a TTL policy exists; without one, operators
    # run `flask session-store cleanup`. This also stops Flask-Session adding its own command.
    ttl = True

    def __init__(
        self,
        app: Flask,
        client_factory: Callable[[], firestore.Client],
        *,
        collection: str,
        key_prefix: str,
        timeout: float,
        refresh_interval: timedelta,
    ) -> None:
        super().__init__(app, key_prefix=key_prefix)
        self.collection = collection
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        # Transient errors only (unavailable, internal, too many requests), within the deadline.
        self.retry = Retry(predicate=if_transient_error, initial=0.05, maximum=0.5, timeout=timeout)
        self._client_factory = client_factory
        self._client: tuple[int, firestore.Client] | None = None
        self._lock = threading.Lock()

    # -- client ------------------------------------------------------------------------------------

    @property
    def client(self) -> firestore.Client:
        """Created on first use, and again in a forked child (a gRPC channel does not survive)."""
        current = self._client
        if current is None or current[0] != os.getpid():
            with self._lock:
                current = self._client
                if current is None or current[0] != os.getpid():
                    try:
                        current = (os.getpid(), self._client_factory())
                    except GoogleAuthError as exc:
                        raise SessionStoreUnavailable(
                            "Firestore session store: no usable Google credentials "
                            f"({type(exc).__name__}); on Cloud Run grant the service account "
                            "roles/datastore.user"
                        ) from None
                    self._client = current
        return current[1]

    def _document(self, store_id: str) -> firestore.DocumentReference:
        return self.client.collection(self.collection).document(store_id)

    def _unavailable(self, exc: Exception) -> SessionStoreUnavailable:
        return SessionStoreUnavailable(
            f"Firestore session store (collection {self.collection!r}) failed: {type(exc).__name__}"
        )

    def _call(self, operation: Callable[..., Any], *args: Any) -> Any:
        try:
            return operation(*args, retry=self.retry, timeout=self.timeout)
        except (google_exceptions.NotFound, google_exceptions.AlreadyExists):
            raise
        except (google_exceptions.GoogleAPIError, GoogleAuthError) as exc:
            raise self._unavailable(exc) from exc

    # -- Flask-Session hooks -----------------------------------------------------------------------

    def _retrieve_session_data(self, store_id: str) -> dict[str, Any] | None:
        if not is_valid_collection_id(store_id):
            return None
        snapshot = self._call(self._document(store_id).get)
        if not snapshot.exists:
            return None
        fields = snapshot.to_dict() or {}
        data, expires_at = fields.get("data"), fields.get("expires_at")
        if not isinstance(data, bytes) or not isinstance(expires_at, datetime):
            logger.warning(
                "Discarded malformed session document %s; starting a fresh session", store_id
            )
            return None
        if expires_at <= _now():
            return None  # expired; the TTL policy or the cleanup command deletes it later
        return self.load(data, store_id, loaded=expires_at)

    def set_limits(self, *, absolute_lifetime: timedelta, max_bytes: int) -> None:
        # Firestore's own document limit wins over a larger SESSION_MAX_BYTES.
        super().set_limits(
            absolute_lifetime=absolute_lifetime, max_bytes=min(max_bytes, MAX_DATA_BYTES)
        )

    def _fields(self, data: bytes, lifetime: timedelta) -> dict[str, Any]:
        now = _now()
        return {"data": data, "expires_at": now + lifetime, "updated_at": now}

    def replace_existing(self, store_id: str, data: bytes, lifetime: timedelta) -> bool:
        try:
            self._call(self._document(store_id).update, self._fields(data, lifetime))
        except google_exceptions.NotFound:
            return False
        return True

    def create_absent(self, store_id: str, data: bytes, lifetime: timedelta) -> bool:
        try:
            self._call(self._document(store_id).create, self._fields(data, lifetime))
        except google_exceptions.AlreadyExists:
            return False
        return True

    def _delete_session(self, store_id: str) -> None:
        if is_valid_collection_id(store_id):
            self._call(self._document(store_id).delete)

    def write_session(self, app: Flask, session: ServerSideSession, response: Response) -> None:
        if not session.modified and session:
            if session.accessed:
                response.vary.add("Cookie")
            self._refresh_expiry(session, app.permanent_session_lifetime)
            return
        super().write_session(app, session, response)

    def _refresh_expiry(self, session: ServerSideSession, lifetime: timedelta) -> None:
        """Slide the stored expiry when it is more than the refresh interval stale."""
        store_id = self._get_store_id(session.sid)
        loaded = self.stored(session, store_id)
        now = _now()
        if not isinstance(loaded, datetime) or now + lifetime - loaded < self.refresh_interval:
            return
        try:
            fields = {"expires_at": now + lifetime, "updated_at": now}
            self._call(self._document(store_id).update, fields)
        except google_exceptions.NotFound:
            raise SessionGone from None

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

    def ping(self) -> None:
        """One cheap read, to prove the database answers (readiness, ``ping``)."""
        self._call(self._document(self.key_prefix + "ping").get)


def create_interface(
    app: Flask, settings: Settings, client: firestore.Client | None = None
) -> FirestoreSessionInterface:
    def factory() -> firestore.Client:
        if client is not None:
            return client
        # FIRESTORE_EMULATOR_HOST, when set, is honoured by the client library itself.
        return firestore.Client(
            project=settings.firestore_project, database=settings.firestore_database
        )

    interface = FirestoreSessionInterface(
        app,
        factory,
        collection=settings.firestore_collection,
        key_prefix=settings.session_key_prefix,
        timeout=settings.firestore_timeout,
        refresh_interval=settings.refresh_interval,
    )
    interface.set_limits(
        absolute_lifetime=settings.session_absolute_lifetime, max_bytes=settings.session_max_bytes
    )
    return interface
