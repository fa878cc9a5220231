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
from typing import Any

import msgspec
from flask import Flask, Request, Response, jsonify, request
from flask_session.base import ServerSideSession, ServerSideSessionInterface

from ..errors import SessionStoreUnavailable

logger = logging.getLogger("pyloto_corp.session_store")

#: Seconds a client should wait before retrying while the store is down.
RETRY_AFTER_SECONDS = 5

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


def refuse_when_store_unavailable() -> Response | None:
    """A ``before_request`` hook: answer 503 before any view sees a stand-in session."""
    from flask import session

    if getattr(session, "store_unavailable", False):
        return unavailable_response()
    return None


class StoreInterfaceMixin(ServerSideSessionInterface):
    """Mixed in before a Flask-Session interface class; see the module docstring.

    Backends put their write logic in :meth:`write_session`; :meth:`save_session` turns a store
    failure into a 503 so a request never reports success for a write that failed.
    """

    backend_name = "store"

    def open_session(self, app: Flask, request: Request) -> ServerSideSession:
        try:
            session: ServerSideSession = super().open_session(app, request)
        except SessionStoreUnavailable as exc:
            logger.error("%s", exc)
            session = self.session_class(sid=self._generate_sid(self.sid_length))
            session.store_unavailable = True
        return session

    def save_session(self, app: Flask, session: ServerSideSession, response: Response) -> None:
        if getattr(session, "store_unavailable", False):
            return  # already answered 503; the stand-in session must not be stored
        try:
            self.write_session(app, session, response)
        except SessionStoreUnavailable as exc:
            logger.error("%s", exc)
            replacement = unavailable_response()
            response.status_code = replacement.status_code
            response.set_data(replacement.get_data())
            response.content_type = replacement.content_type
            response.headers["Retry-After"] = replacement.headers["Retry-After"]
            response.headers.remove("Set-Cookie")

    def write_session(self, app: Flask, session: ServerSideSession, response: Response) -> None:
        """Flask-Session's own save logic; backends override it."""
        ServerSideSessionInterface.save_session(self, app, session, response)

    def ping(self) -> None:
        """Prove the store answers; raise SessionStoreUnavailable when it does not."""

    def _get_store_id(self, sid: str) -> str:
        return hashed_store_id(self.key_prefix, sid)

    def set_session_cookie(
        self, app: Flask, session: ServerSideSession, response: Response
    ) -> None:
        """Set the cookie exactly as Flask-Session does, without touching the store."""
        response.set_cookie(
            key=self.get_cookie_name(app),
            value=session.sid,
            expires=self.get_expiration_time(app, session),
            httponly=self.get_cookie_httponly(app),
            domain=self.get_cookie_domain(app),
            path=self.get_cookie_path(app),
            secure=self.get_cookie_secure(app),
            samesite=self.get_cookie_samesite(app),
        )
        response.vary.add("Cookie")
