"""Behaviour every pyloto_corp backend adds to Flask-Session's server-side interface.

- Store ids are ``prefix + sha256(session id)``: a store dump, ``SCAN`` or read-only credential
  yields no cookie that logs anyone in, and any cookie value is a harmless key.
- Stored bytes are decoded as msgpack only. Flask-Session falls back to ``pickle.loads``; a store
  written by someone else must never run code here, so corrupt data means "no session".
- Store failures become :class:`~pyloto_corp.errors.SessionStoreUnavailable` (a 503, not a 500).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import msgspec
from flask import Flask, Request, Response, jsonify, request
from flask.sessions import SessionMixin
from flask_session.base import ServerSideSession, ServerSideSessionInterface

from ..errors import SessionStoreUnavailable, SessionTooLarge

logger = logging.getLogger("pyloto_corp.session_store")

#: Seconds a client should wait before retrying while the store is down.
RETRY_AFTER_SECONDS = 5
#: Session key holding the creation time (epoch seconds), for the absolute timeout.
CREATED_AT = "_created_at"

_decoder = msgspec.msgpack.Decoder(dict[str, Any])
_encoder = msgspec.msgpack.Encoder()


def hashed_store_id(key_prefix: str, sid: str) -> str:
    """The store key for a session id: the id itself never reaches the store."""
    digest = hashlib.sha256(sid.encode("utf-8", "surrogateescape")).hexdigest()
    return key_prefix + digest


def encode_session(session: ServerSideSession) -> bytes:
    return _encoder.encode(dict(session))


def decode_session(data: bytes, store_id: str) -> dict[str, Any] | None:
    """The stored session, or None (and a warning) when the bytes are not a msgpack map."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, TypeError):
        # Only the hashed key is logged: it identifies the record without granting the session.
        logger.warning(
            "Discarded undecodable session data at %s; starting a fresh session", store_id
        )
        return None


def unavailable_response() -> Response:
    """503 with Retry-After: JSON for clients that prefer it, plain text otherwise."""
    message = "The session store is unavailable; please retry shortly."
    if request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json":
        response = jsonify(error="session_store_unavailable", message=message)
    else:
        response = Response(message + "\n", mimetype="text/plain")
    response.status_code = 503
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def answer_store_unavailable(exc: SessionStoreUnavailable) -> Response:
    """Error handler: a view that needed the session while the store was down gets a 503."""
    return unavailable_response()


class UnavailableSession(ServerSideSession):
    """Stands in when the store could not be read: any use of the data raises
    SessionStoreUnavailable (answered 503), so no view mistakes it for an empty session, and a
    view that never touches the session (a health check) still works."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise SessionStoreUnavailable("The session store could not be read for this request.")

    __getitem__ = __setitem__ = __delitem__ = __contains__ = __iter__ = __len__ = _refuse
    get = setdefault = pop = popitem = update = clear = keys = values = items = _refuse

    def __bool__(self) -> bool:
        self._refuse()
        return False


class SessionGone(Exception):
    """The stored session was deleted (a logout) while this request ran: do not recreate it."""


class StoreInterfaceMixin(ServerSideSessionInterface):
    """Mixed in before a Flask-Session interface class; see the module docstring.

    - Idle timeout: the store's expiry (``PERMANENT_SESSION_LIFETIME``), slid by reads.
      Absolute timeout: ``_created_at`` in the session; past ``absolute_lifetime`` the session
      ends whatever its activity. The cookie expires at that absolute time, so it is set only
      when the session changes, never just to slide it.
    - Backends put their write logic in :meth:`write_session`; :meth:`save_session` turns a
      store failure into a 503 (a request never reports success for a write that failed), a
      session deleted meanwhile into a removed cookie, and an oversized one into a clear 500.
    """

    backend_name = "store"
    absolute_lifetime = timedelta(days=7)
    max_bytes = 512 * 1024
    # Hands what load() learnt from the store to open_session(), within one call on one thread.
    _loading = threading.local()

    _absolute_seconds = absolute_lifetime.total_seconds()

    def set_limits(self, *, absolute_lifetime: timedelta, max_bytes: int) -> None:
        self.absolute_lifetime = absolute_lifetime
        self._absolute_seconds = absolute_lifetime.total_seconds()
        self.max_bytes = max_bytes

    # -- reading ---------------------------------------------------------------------------------

    def open_session(self, app: Flask, request: Request) -> ServerSideSession:
        self._loading.found = None
        try:
            session: ServerSideSession = super().open_session(app, request)
            # What the store said about this session (exists; Firestore: its expiry) travels
            # with the session object to save_session().
            session.loaded_from_store = self._loading.found
            created = _created_at(session)
            if created is not None and not self._within_absolute_lifetime(created):
                self._delete_session(self._get_store_id(session.sid))
                session = self.session_class(sid=self._generate_sid(self.sid_length))
        except SessionStoreUnavailable as exc:
            logger.error("%s", exc)
            session = UnavailableSession(sid=self._generate_sid(self.sid_length))
        return session

    def _within_absolute_lifetime(self, created: object) -> bool:
        if not isinstance(created, int) or isinstance(created, bool):
            return False
        return 0 <= time.time() - created <= self._absolute_seconds

    def load(
        self, data: bytes | None, store_id: str, loaded: object = True
    ) -> dict[str, Any] | None:
        """Decode what the store returned and note that the session exists (and ``loaded``)."""
        session = None if data is None else decode_session(data, store_id)
        if session is not None:
            self._loading.found = (store_id, loaded)
        return session

    @staticmethod
    def stored(session: ServerSideSession, store_id: str) -> object | None:
        """What the store said when ``store_id`` was read for this session; None if it was not
        (a new session, or one whose id was rotated since)."""
        found = getattr(session, "loaded_from_store", None)
        return found[1] if found is not None and found[0] == store_id else None

    # -- writing ---------------------------------------------------------------------------------

    def save_session(self, app: Flask, session: ServerSideSession, response: Response) -> None:
        if isinstance(session, UnavailableSession):
            return  # the stand-in is never stored
        if session.modified and session and CREATED_AT not in session:
            dict.__setitem__(session, CREATED_AT, int(time.time()))
        try:
            self.write_session(app, session, response)
        except SessionStoreUnavailable as exc:
            logger.error("%s", exc)
            _replace(response, unavailable_response())
        except SessionGone:
            # Logged out by another request meanwhile: do not bring the session back.
            response.headers.remove("Set-Cookie")
            response.delete_cookie(
                self.get_cookie_name(app),
                domain=self.get_cookie_domain(app),
                path=self.get_cookie_path(app),
            )
            response.vary.add("Cookie")
        except SessionTooLarge as exc:
            logger.error("%s", exc)
            _replace(response, jsonify(error="session_too_large", message=str(exc)), status=500)

    def _upsert_session(
        self, session_lifetime: timedelta, session: ServerSideSession, store_id: str
    ) -> None:
        data = self.encode(session)
        if self.stored(session, store_id) is not None:
            # Only if it still exists: a request finishing after a logout cannot revive it.
            if not self.replace_existing(store_id, data, session_lifetime):
                raise SessionGone
        else:
            self.create_new(session, lambda key: self.create_absent(key, data, session_lifetime))

    def replace_existing(self, store_id: str, data: bytes, lifetime: timedelta) -> bool:
        """Overwrite the stored session if it still exists; False when it does not."""
        raise NotImplementedError

    def create_absent(self, store_id: str, data: bytes, lifetime: timedelta) -> bool:
        """Store a new session unless the id is taken; False when it is."""
        raise NotImplementedError

    def write_session(self, app: Flask, session: ServerSideSession, response: Response) -> None:
        """Flask-Session's own save logic; backends override it."""
        ServerSideSessionInterface.save_session(self, app, session, response)

    def should_set_cookie(self, app: Flask, session: SessionMixin) -> bool:
        return bool(session.modified)

    def get_expiration_time(self, app: Flask, session: SessionMixin) -> datetime | None:
        if not session.permanent:
            return None
        created = _created_at(session)
        start = created if isinstance(created, int) else int(time.time())
        return datetime.fromtimestamp(start, UTC) + self.absolute_lifetime

    def encode(self, session: ServerSideSession) -> bytes:
        """The session as msgpack, refused (before any write) when over the size limit."""
        data = encode_session(session)
        limit = self.max_bytes
        if len(data) > limit:
            raise SessionTooLarge(
                f"The session is {len(data):,} bytes encoded; the {self.backend_name} store "
                f"accepts at most {limit:,} (SESSION_MAX_BYTES). The stored session was left "
                "unchanged."
            )
        return data

    def create_new(self, session: ServerSideSession, create: Callable[[str], bool]) -> None:
        """Store a new session with ``create(store_id) -> created``; a taken id is never
        overwritten: the session gets a fresh id instead (256-bit ids make this theoretical)."""
        for _ in range(3):
            if create(self._get_store_id(session.sid)):
                return
            session.sid = self._generate_sid(self.sid_length)
        raise SessionStoreUnavailable(f"{self.backend_name} store: could not allocate a session id")

    # -- misc ------------------------------------------------------------------------------------

    def ping(self) -> None:
        """Prove the store answers; raise SessionStoreUnavailable when it does not."""

    def _get_store_id(self, sid: str) -> str:
        return hashed_store_id(self.key_prefix, sid)


def _created_at(session: SessionMixin) -> object:
    """The creation time, read without marking the session accessed (no ``Vary: Cookie``)."""
    return dict.get(cast("dict[str, object]", session), CREATED_AT)


def _replace(response: Response, replacement: Response, status: int | None = None) -> None:
    """Turn ``response`` (already built by the view) into ``replacement``."""
    response.status_code = status or replacement.status_code
    response.set_data(replacement.get_data())
    response.content_type = replacement.content_type
    response.headers.remove("Set-Cookie")
    if "Retry-After" in replacement.headers:
        response.headers["Retry-After"] = replacement.headers["Retry-After"]
