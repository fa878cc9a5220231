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
from flask import Flask, Response
from flask_session.base import ServerSideSession, ServerSideSessionInterface

logger = logging.getLogger("pyloto_corp.session_store")

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


class StoreInterfaceMixin(ServerSideSessionInterface):
    """Mixed in before a Flask-Session interface class; see the module docstring."""

    backend_name = "store"

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
