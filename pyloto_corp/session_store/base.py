"""The one request path every backend shares: Flask cookie sessions on the app's record store.

A request reads straight through this module: :meth:`StoreInterface.open_session` asks the
record store (``pyloto_corp.records``) to ``read`` the record (one store round trip that also
slides the idle timeout), decodes it and returns a :class:`StoreSession` that carries what the
store said; the view runs; :meth:`StoreInterface.save_session` writes only a modified session
(``update`` an existing record with the keys this request changed, ``create`` a new one) and
sets the cookie. No backend code lives here; no cookie or request reaches a backend.

- Store ids are ``prefix + sha256(session id)``: a store dump, ``SCAN`` or read-only credential
  yields no cookie that logs anyone in, and any cookie value is a harmless key.
- Stored bytes go through ``records.codec`` (tagged msgpack, never pickle); bytes that do not
  decode mean "no session" and a warning.
- Store failures are :class:`~pyloto_corp.errors.SessionStoreUnavailable` (a 503, not a 500).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flask import Flask, Request, Response, after_this_request, jsonify, request
from flask.sessions import SessionMixin
from flask_session.base import ServerSideSession, ServerSideSessionInterface

from ..config.settings import previous_cookie_name
from ..errors import (
    LeaseLost,
    SessionGone,
    SessionStoreUnavailable,
    SessionTooLarge,
    StateBusy,
    UnstorableValue,
)
from ..records import codec
from ..records.base import (
    CREATED_AT,
    USER_SINCE,
    Changes,
    Record,
    RecordStore,
    Retired,
    creation_time,
    record_size,
    user_since,
)
from ..telemetry import Telemetry, count_answer
from .breaker import DEFAULT_COOLDOWN, Breaker

if TYPE_CHECKING:
    from ..config.settings import Settings

logger = logging.getLogger("pyloto_corp.session_store")
T = TypeVar("T")

#: Seconds a client should wait before retrying while the store is down.
RETRY_AFTER_SECONDS = 5
#: Session key holding the Cloud Run service that wrote it (``Settings.session_service``).
SERVICE = "_service"
#: Session key set in every record written while the cookie is a ``__Host-`` one: such a session
#: is never taken from the cookie's previous name (see :meth:`StoreInterface.open_session`).
HOST_COOKIE = "_host"
#: Keys the extension and Flask-Session keep; a session holding only these is empty.
INTERNAL_KEYS = frozenset({"_permanent", CREATED_AT, SERVICE, USER_SINCE, HOST_COOKIE})
#: Store ids whose user this process remembers, so that the read of a logged-in session fetches
#: its user's revocation mark in the same round trip (beyond it the memory is dropped, cheaply).
OWNERS_REMEMBERED = 10_000
#: Another instance's clock may run ahead of ours: a creation time up to this far in the future
#: is accepted; beyond it the session is ignored (not deleted: it may be valid elsewhere).
CLOCK_SKEW_TOLERANCE = 300
#: Starts the id of a session without a user (``.`` is not in an id's base64url alphabet, so no
#: earlier id has it). See :meth:`StoreInterface.idle_lifetime`.
ANONYMOUS_SID_MARK = "a."


def interface_options(settings: Settings) -> dict[str, Any]:
    """The :class:`StoreInterface` keywords every backend takes from the core settings."""
    return {
        "key_prefix": settings.session_key_prefix,
        "permanent": settings.session_permanent,
        "sid_length": settings.session_id_length,
        "anonymous_lifetime": settings.anonymous_lifetime,
        "rotate_on_login": settings.session_rotate_on_login,
        "service": settings.session_service,
        "cooldown": settings.session_store_cooldown,
    }


def payload_size(record: Record) -> int:
    """Bytes of a stored record less its framing: what the previous release held under
    SESSION_MAX_BYTES, so a record it wrote is never refused on reading."""
    if record.fields is None:
        return len(record.blob or b"")
    return sum(
        len(key.encode("utf-8", "surrogatepass")) + len(raw) for key, raw in record.fields.items()
    )


def is_anonymous_sid(sid: str) -> bool:
    """Whether ``sid`` is the id of a session without a user (its idle timeout is short)."""
    return sid.startswith(ANONYMOUS_SID_MARK)


def hashed_store_id(key_prefix: str, sid: str) -> str:
    """The store key for a session id: the id itself never reaches the store."""
    digest = hashlib.sha256(sid.encode("utf-8", "surrogateescape")).hexdigest()
    return key_prefix + digest


class StoreSession(ServerSideSession):
    """Flask-Session's session, plus what the store said about it when this request opened it.

    ``stored`` is the record read (None: a new session, or one moved to a new id);
    ``replaces`` is the store id a login left behind, deleted once the new record is written;
    ``owner`` is the user the stored record belonged to (``SESSION_USER_KEY``) when it was read;
    ``retired`` is the marker found when the cookie's id was retired by a login or a logout;
    ``sent`` is what the browser's cookie already says (id, permanence, creation time), so a
    response never sends the same cookie again; ``moved_from`` is the cookie's previous name
    when the browser sent the session under that one only (it gets the new one instead).
    """

    def __init__(
        self,
        initial: dict[str, Any] | None = None,
        sid: str | None = None,
        permanent: bool | None = None,
        stored: Record | None = None,
        owner: str | None = None,
        retired: Retired | None = None,
    ) -> None:
        super().__init__(initial, sid, permanent)
        self.stored = stored
        self.replaces: str | None = None
        self.owner = owner
        self.retired = retired
        self.sent = self.cookie_state() if stored is not None else None
        self.moved_from: str | None = None

    def cookie_state(self) -> tuple[str, object, object]:
        """What the session cookie says: its value and what its expiry is computed from."""
        return (self.sid, dict.get(self, "_permanent", False), dict.get(self, CREATED_AT))

    def __bool__(self) -> bool:
        # Only the extension's own keys left (a logout key by key) counts as empty, as in Flask.
        return not INTERNAL_KEYS.issuperset(dict.keys(self))


def _refused(name: str) -> Any:
    method = getattr(dict, name)

    def refuse(self: UnavailableSession, *args: Any, **kwargs: Any) -> Any:
        if self.view_returned:
            return method(self, *args, **kwargs)  # an empty session that is never stored
        raise SessionStoreUnavailable("The session store could not be read for this request.")

    return refuse


class UnavailableSession(StoreSession):
    """Stands in when the store could not be read. While the view runs, any use of the data
    raises SessionStoreUnavailable (answered 503), so no view mistakes it for an empty session,
    and a view that never touches the session (a health check) still works. Once the view has
    returned (or its 503 has been made), other extensions' after-request hooks (Flask-Login
    checks ``"_remember" in session`` on every response) see an empty session, so the answer
    stays what it is instead of becoming a 500. It is never stored."""

    view_returned = False

    def after_view(self, response: Response) -> Response:
        """Run by Flask before every after-request hook of the app (``after_this_request``)."""
        self.view_returned = True
        return response

    __getitem__ = _refused("__getitem__")
    __setitem__ = _refused("__setitem__")
    __delitem__ = _refused("__delitem__")
    __contains__ = _refused("__contains__")
    __iter__ = _refused("__iter__")
    __len__ = _refused("__len__")
    get = _refused("get")
    setdefault = _refused("setdefault")
    pop = _refused("pop")
    popitem = _refused("popitem")
    update = _refused("update")
    clear = _refused("clear")
    keys = _refused("keys")
    values = _refused("values")
    items = _refused("items")

    def __bool__(self) -> bool:
        if self.view_returned:
            return False
        raise SessionStoreUnavailable("The session store could not be read for this request.")


def unavailable_response() -> Response:
    """503 with Retry-After: JSON for clients that prefer it, plain text otherwise."""
    message = "The session store is unavailable; please retry shortly."
    response = _error_response("session_store_unavailable", message, 503)
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def answer_store_unavailable(exc: SessionStoreUnavailable) -> Response:
    """Error handler: a view that needed the session while the store was down gets a 503."""
    return unavailable_response()


def answer_state_busy(exc: StateBusy) -> Response:
    """Error handler: a keyed-state turn held elsewhere past the wait is a 503 the sender
    retries after the holder's lease (a webhook's sender does)."""
    message = "This conversation is busy; please retry shortly."
    response = _error_response("state_busy", message, 503)
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


def answer_lease_lost(exc: LeaseLost) -> Response:
    """Error handler: a keyed-state turn that lost its lease saved nothing: 409, retry."""
    return _error_response("lease_lost", "This change was not saved; please retry.", 409)


class StoreInterface(ServerSideSessionInterface):
    """Flask-Session's server-side interface with one straight open → save path.

    - Idle timeout: the store's expiry, slid by every read and write: the full one
      (``app.permanent_session_lifetime``, read per request) for a signed-in session,
      ``anonymous_lifetime`` for one without a user (see :meth:`idle_lifetime`). Absolute
      timeout: ``_created_at`` in the session; past ``absolute_lifetime`` the session ends
      whatever its activity. The cookie expires at that absolute time, so it is set only when
      the session changes, never just to slide it.
    - Only a modified session is written, and only the keys whose encoded value changed (or
      that were deleted), merged atomically into the stored record: two requests of one session
      changing different keys both land; the same key changed by both ends as the last write's
      value, never a mix. A session emptied (``clear()``, or key by key) is deleted with its
      cookie.
    - A write whose record was deleted meanwhile (a logout, a login) is dropped: the session is
      never brought back, the response becomes a 409 and no session cookie is sent.
    """

    session_class = StoreSession
    # Every backend here expires sessions itself (or via `flask session-store cleanup`): this
    # keeps Flask-Session from registering its own cleanup hooks.
    ttl = True

    def __init__(
        self,
        app: Flask,
        records: RecordStore,
        *,
        key_prefix: str,
        permanent: bool = False,
        sid_length: int = 32,
        rotate_on_login: bool = True,
        service: str | None = None,
        cooldown: float = DEFAULT_COOLDOWN,
        anonymous_lifetime: timedelta = timedelta(minutes=30),
    ) -> None:
        super().__init__(app, key_prefix=key_prefix, permanent=permanent, sid_length=sid_length)
        self.anonymous_lifetime = anonymous_lifetime
        self.rotate_on_login = rotate_on_login
        self.service = service
        #: After a store failure, this process answers 503 at once for a cool-down (breaker.py).
        self.breaker = Breaker(cooldown)
        #: The backend's store: this interface's sessions, and keyed state's entries.
        self.records = records
        #: Its spans and metrics (set by SessionStore.init_app).
        self.telemetry: Telemetry | None = None
        self.backend_name = records.backend_name
        #: Store id -> its user, as this process last saw it (see ``read``'s ``user``).
        self._owners: dict[str, str] = {}

    # The values the store and the sessions share are the store's, read there (one source).

    @property
    def max_bytes(self) -> int:
        """The store's limit on a record (Firestore's is lower than SESSION_MAX_BYTES can be)."""
        return self.records.max_bytes

    @property
    def user_key(self) -> str:
        """The session key naming its user (``SESSION_USER_KEY``)."""
        return self.records.user_key

    @property
    def absolute_lifetime(self) -> timedelta:
        """No session outlives it, however active (``SESSION_ABSOLUTE_LIFETIME``)."""
        return self.records.absolute_lifetime

    def end_user_sessions(self, user: str, current: StoreSession | None = None) -> int:
        """End every session of ``user`` (but ``current``, when it is one of them); how many
        records were deleted (sessions the index did not know end at their next request)."""
        at = time.time()
        keep: set[str] = set()
        if current is not None and self.user_of(current) == user:
            keep = self._keep_through(current, at)
        self.records.mark_revoked(user, at)
        return self.records.revoke(user, keep, at)

    def _keep_through(self, session: StoreSession, at: float) -> set[str]:
        """The kept session's USER_SINCE moves to the revoke's time, in the store before the
        mark is set (so no request of it ever reads as revoked) and in this request's copy."""
        dict.__setitem__(session, USER_SINCE, at)
        store_id = self.store_id(session.sid)
        keep = {store_id} if session.replaces is None else {store_id, session.replaces}
        stored = session.stored
        if stored is None:
            return keep  # written at the end of the request, with the new time
        raw = codec.pack_value(USER_SINCE, at)
        changes = Changes(set={USER_SINCE: raw}, delete=(), whole=False)
        lifetime = self.idle_lifetime(self.app, session.sid)
        if not self.records.update(store_id, changes, lifetime, stored):
            return set()  # ended meanwhile: nothing to keep
        if stored.fields is not None:
            session.stored = replace(stored, fields={**stored.fields, USER_SINCE: raw})
        return keep

    def _revoked(self, record: Record, data: dict[str, Any], user: str, store_id: str) -> bool:
        """The session's user was revoked after the session became theirs: it ends now."""
        mark = record.mark if record.mark_user == user else self.records.revoked_at(user)
        if mark is None or user_since(data) >= mark:
            return False
        self.records.delete(store_id)
        self._owners.pop(store_id, None)
        logger.info("Ended session %s: its user's sessions were revoked", store_id)
        return True

    def _remember(self, store_id: str, user: str | None) -> None:
        if user is None:
            self._owners.pop(store_id, None)
            return
        if len(self._owners) >= OWNERS_REMEMBERED:
            self._owners.clear()
        self._owners[store_id] = user

    # -- reading -----------------------------------------------------------------------------------

    def open_session(self, app: Flask, request: Request) -> StoreSession:
        """The session the cookie names. A ``__Host-`` cookie absent, the cookie of its
        previous name is read instead (``session`` for ``__Host-session``), so that the upgrade
        logs no one out: its session is kept and moves to the new cookie. Only a session
        stored before the upgrade moves so (one written since carries :data:`HOST_COOKIE`):
        a sibling subdomain can set the old cookie, which is what the prefix is there to stop."""
        name = self.get_cookie_name(app)
        sid = request.cookies.get(name)
        if not sid:
            previous = previous_cookie_name(name)
            sid = request.cookies.get(previous) if previous is not None else None
            if not sid:
                return self.new_session()
            assert previous is not None
            return self._open(app, sid, moved_from=previous)
        return self._open(app, sid)

    def _open(self, app: Flask, sid: str, moved_from: str | None = None) -> StoreSession:
        store_id = self.store_id(sid)
        try:
            with self.breaker.guard():
                user = self._owners.get(store_id)
                record = self.records.read(store_id, self.idle_lifetime(app, sid), user)
                if isinstance(record, Retired):
                    if record.live:
                        return _moved(self.session_class(sid=sid, retired=record), moved_from)
                    record = None
                data = None if record is None else self.decode(record, store_id)
                if data is not None and not self._is_ours(data, store_id):
                    data = None
                if data is not None and moved_from is not None and data.get(HOST_COOKIE):
                    logger.warning(
                        "Ignored session %s sent under the session cookie's previous name: it "
                        "was written since the cookie took the __Host- prefix",
                        store_id,
                    )
                    data = None
                owner = None if data is None else self.user_of(data)
                if record is not None and data is not None and owner is not None:
                    if self._revoked(record, data, owner, store_id):
                        data = None
                    else:
                        self._remember(store_id, owner)
        except SessionStoreUnavailable:
            stand_in = UnavailableSession(sid=self._generate_sid(self.sid_length))
            after_this_request(stand_in.after_view)
            return stand_in
        if record is None or data is None:
            return self.new_session()
        return _moved(self.session_class(data, sid=sid, stored=record, owner=owner), moved_from)

    def new_session(self) -> StoreSession:
        sid = ANONYMOUS_SID_MARK + self._generate_sid(self.sid_length)  # no user yet
        return self.session_class(sid=sid, permanent=self.permanent)

    def decode(self, record: Record, store_id: str) -> dict[str, Any] | None:
        """The session a record holds; None (and a warning) when it does not decode, or is
        larger than SESSION_MAX_BYTES (planted, or stored under a larger limit): such a record
        would fail every write of its session."""
        size = payload_size(record)
        if size > self.max_bytes:
            logger.warning(
                "Discarded session data at %s: %d bytes, over SESSION_MAX_BYTES (%d); starting "
                "a fresh session",
                store_id,
                size,
                self.max_bytes,
            )
            return None
        try:
            if record.fields is not None:
                return {key: codec.unpack_value(raw) for key, raw in record.fields.items()}
            assert record.blob is not None
            return codec.loads(record.blob)
        except ValueError:
            # Only the hashed key is logged: it identifies the record without granting it.
            logger.warning(
                "Discarded undecodable session data at %s; starting a fresh session", store_id
            )
            return None

    def _is_ours(self, data: dict[str, Any], store_id: str) -> bool:
        """A record another service stamped (one store, one default prefix) is ignored, never
        deleted; then the absolute timeout."""
        owner = data.get(SERVICE)
        if self.service is not None and owner is not None and owner != self.service:
            logger.warning(
                "Ignored session %s of another service sharing this store and key prefix; "
                "give each service its own SESSION_KEY_PREFIX",
                store_id,
            )
            return False
        return self._within_absolute_lifetime(data, store_id)

    def _within_absolute_lifetime(self, data: dict[str, Any], store_id: str) -> bool:
        """Past the absolute timeout: the record is deleted. Created in the future beyond the
        skew tolerance: ignored, not deleted. A creation time that is no time (NaN, infinite,
        not a number, more than 400 days away) makes the record malformed: ignored, with a
        warning, so no value can switch the absolute timeout off."""
        raw = data.get(CREATED_AT)
        if raw is None:
            return True
        created = creation_time(raw)
        if created is None:
            logger.warning("Ignored session %s with a malformed creation time", store_id)
            return False
        age = time.time() - created
        if age > self.absolute_lifetime.total_seconds():
            self.records.delete(store_id)
            return False
        if age < -CLOCK_SKEW_TOLERANCE:
            logger.warning(
                "Ignored session %s created %.0f s in the future (clock skew beyond %d s)",
                store_id,
                -age,
                CLOCK_SKEW_TOLERANCE,
            )
            return False
        return True

    # -- writing -----------------------------------------------------------------------------------

    def save_session(self, app: Flask, session: ServerSideSession, response: Response) -> None:
        if isinstance(session, UnavailableSession):
            return  # the stand-in is never stored
        assert isinstance(session, StoreSession)
        if session.accessed:
            response.vary.add("Cookie")
            _keep_private(response)
        # A write is refused at once while the store is failing (breaker.py); a read-only
        # request's expiry slide is not: its data was read and its answer is made.
        writes = session.replaces is not None or (
            session.modified and (session.stored is not None or bool(session))
        )
        try:
            with self.breaker.guard(admit=writes):
                self._write(app, session, response)
            if session.moved_from is not None:
                self._move_cookie(app, session, response)
        except SessionStoreUnavailable:
            _replace(response, unavailable_response())
        except SessionGone:
            logger.warning(
                "Dropped a session write: the session ended (logout or login) while the request "
                "ran; answered 409 and left the browser's session cookie alone"
            )
            _replace(response, _error_response("session_ended", SESSION_ENDED_MESSAGE, 409))
        except (SessionTooLarge, UnstorableValue) as exc:
            error = (
                "session_too_large" if isinstance(exc, SessionTooLarge) else "session_unstorable"
            )
            _replace(response, _not_saved_response(error, exc))

    def _write(self, app: Flask, session: StoreSession, response: Response) -> None:
        lifetime = self.idle_lifetime(app, session.sid)
        store_id = self.store_id(session.sid)
        if session.retired is not None:
            # The cookie's id was retired by a login or a logout while this request ran (or
            # just before): nothing is stored and no cookie is sent, so the browser keeps
            # whatever the login or logout gave it. Two exceptions, both the user's own acts:
            if not session.modified:
                return
            if self.user_of(session) is not None:
                # A login without rotate_session_id() (a form submitted twice, an answer
                # lost): a fresh session, never on the retired id.
                self.regenerate(session)
                store_id = self.store_id(session.sid)
            elif not session:
                # A logout (emptied, as Flask-Login's logout_user() does): it ends the
                # session the retired id moved to, and the cookie goes.
                self._end(session)
                store_id = self.store_id(session.sid)
            else:
                raise SessionGone
        if not session:
            if session.modified or session.replaces is not None or session.stored is not None:
                # Emptied (clear(), logout, key by key), or stored empty by an older release:
                # delete it and the cookie.
                self._forget(session, store_id)
                self._delete_cookie(app, response)
            return
        if not session.modified:
            if session.stored is not None:
                self.records.touch(store_id, session.stored, lifetime)
            return
        if self.rotate_on_login and session.stored is not None and session.replaces is None:
            user = self.user_of(session)
            if user is not None and user != session.owner:
                # A user signed in (or another took over) without rotate_session_id(): an id
                # planted or seen before login must not become a signed-in session.
                self.regenerate(session)
        if session.stored is not None and not self._id_fits(session):
            # Signed in without rotate_session_id(), and SESSION_ROTATE_ON_LOGIN=false: the
            # session still moves to a signed-in id, whose reads slide the full timeout.
            self.regenerate(session)
        if CREATED_AT not in session:
            dict.__setitem__(session, CREATED_AT, int(time.time()))
        if self.service is not None and SERVICE not in session:
            dict.__setitem__(session, SERVICE, self.service)
        if HOST_COOKIE not in session and previous_cookie_name(self.get_cookie_name(app)):
            dict.__setitem__(session, HOST_COOKIE, True)
        self._stamp_user(session)
        fields = self.encode(session)
        rewritten = session.stored is None
        if session.stored is not None:
            changes = self.changes(fields, session.stored)
            rewritten = changes.whole
            if not changes:
                self.records.touch(store_id, session.stored, lifetime)
            elif not self.records.update(store_id, changes, lifetime, session.stored):
                raise SessionGone
        else:
            self._create(app, session, fields)
            store_id = self.store_id(session.sid)
        if session.replaces is not None:
            self._replace(session, store_id)
        else:
            self._reindex(session, store_id, rewritten)
        if session.cookie_state() != session.sent:
            self._set_cookie(app, session, response)
        else:
            response.vary.add("Cookie")  # the browser already holds exactly this cookie

    def _replace(self, session: StoreSession, store_id: str) -> None:
        """A login's end, once the new record exists (a login that failed before leaves the
        old session intact): the new id indexed, then the old id retired, not just deleted (a
        request still carrying it neither writes nor sends a cookie that would replace this
        one). Once it is retired nothing may fail the answer: the browser needs the new cookie,
        so the old id's index entry is dropped on a best-effort basis (listing prunes it)."""
        assert session.replaces is not None
        user = self.user_of(session)
        if user is not None:
            self.records.index(store_id, user)
        if not self.records.retire(session.replaces, Retired.now(store_id)):
            # Logged out or revoked while this request ran: its copy must not outlive it.
            self.records.delete(store_id)
            raise SessionGone
        self._owners.pop(session.replaces, None)
        self._remember(store_id, user)
        if session.owner is not None:
            try:
                self.records.unindex(session.replaces, session.owner)
            except SessionStoreUnavailable as exc:
                logger.warning("Left a stale user-index entry after a login: %s", exc)
        session.owner = user

    def _stamp_user(self, session: StoreSession) -> None:
        """USER_SINCE: now when the user appears or changes (a login), kept as it is while the
        user stays (an id rotation must not move it past a revoke), gone with the user."""
        user = self.user_of(session)
        if user is None:
            dict.pop(session, USER_SINCE, None)
        elif user != session.owner:
            dict.__setitem__(session, USER_SINCE, time.time())

    def _reindex(self, session: StoreSession, store_id: str, rewritten: bool) -> None:
        """Keep the user index in step when the session's user appears, changes or goes (and
        when a record is written whole: a new session, or one an earlier release stored)."""
        user = self.user_of(session)
        self._remember(store_id, user)
        if user == session.owner and not (rewritten and user is not None):
            return
        if session.owner is not None and session.owner != user:
            self.records.unindex(store_id, session.owner)
        if user is not None:
            self.records.index(store_id, user)
        session.owner = user

    def _forget(self, session: StoreSession, store_id: str) -> None:
        """Retire the session's records (and drop their index entries): a request still
        carrying the id can neither write it back nor start a session in its place."""
        for stale in self._stale_ids(session, store_id):
            self.records.retire(stale, Retired.now(None))
            self._owners.pop(stale, None)
            if session.owner is not None:
                self.records.unindex(stale, session.owner)
        session.owner = None

    def user_of(self, data: dict[str, Any]) -> str | None:
        """The user a session belongs to: its ``SESSION_USER_KEY`` value, as text (read
        without marking the session accessed)."""
        value = dict.get(data, self.user_key)
        return None if value is None else str(value)

    @staticmethod
    def _stale_ids(session: StoreSession, store_id: str) -> Iterable[str]:
        if session.stored is not None:
            yield store_id
        if session.replaces is not None:
            yield session.replaces

    def _create(self, app: Flask, session: StoreSession, fields: Mapping[str, bytes]) -> None:
        """A new record, under an id of the session's kind (its id was never sent yet). A taken
        id is never overwritten: the session gets a fresh id instead (256-bit ids make this
        theoretical)."""
        if is_anonymous_sid(session.sid) != (self.user_of(session) is None):
            session.sid = self._new_sid(session)
        lifetime = self.idle_lifetime(app, session.sid)
        for _ in range(3):
            if self.records.create(self.store_id(session.sid), fields, lifetime):
                return
            session.sid = self._new_sid(session)
        raise SessionStoreUnavailable(f"{self.backend_name} store: could not allocate a session id")

    def encode(self, session: StoreSession) -> dict[str, bytes]:
        """Each key's encoded value; refused (before any write) when a value cannot be stored
        exactly or the whole is over the size limit."""
        items: Iterable[tuple[str, Any]] = dict.items(session)
        fields = {key: codec.pack_value(key, value) for key, value in items}
        self.records.check_size(record_size(fields))
        return fields

    @staticmethod
    def changes(fields: Mapping[str, bytes], stored: Record) -> Changes:
        """The keys whose encoded value differs from what this request read, and the keys it
        deleted; a record stored whole by an earlier release is rewritten whole."""
        if stored.fields is None:
            return Changes(set=fields, delete=(), whole=True)
        loaded = stored.fields
        changed = {key: raw for key, raw in fields.items() if loaded.get(key) != raw}
        deleted = tuple(key for key in loaded if key not in fields)
        return Changes(set=changed, delete=deleted, whole=False)

    def _set_cookie(self, app: Flask, session: StoreSession, response: Response) -> None:
        response.set_cookie(
            self.get_cookie_name(app),
            session.sid,
            expires=self.get_expiration_time(app, session),
            httponly=self.get_cookie_httponly(app),
            domain=self.get_cookie_domain(app),
            path=self.get_cookie_path(app),
            secure=self.get_cookie_secure(app),
            samesite=self.get_cookie_samesite(app),
            partitioned=self.get_cookie_partitioned(app),
        )
        response.vary.add("Cookie")
        _keep_private(response, no_store=True)
        session.sent = session.cookie_state()

    def _move_cookie(self, app: Flask, session: StoreSession, response: Response) -> None:
        """The browser sent this session under the cookie's previous name: it gets the cookie
        of the new name (unless the session ended) and the old one is deleted."""
        assert session.moved_from is not None
        if session and session.retired is None and session.cookie_state() != session.sent:
            self._set_cookie(app, session, response)
        self._delete_cookie(app, response, session.moved_from)

    def _delete_cookie(self, app: Flask, response: Response, name: str | None = None) -> None:
        response.delete_cookie(
            name or self.get_cookie_name(app),
            domain=self.get_cookie_domain(app),
            path=self.get_cookie_path(app),
            secure=self.get_cookie_secure(app),
            samesite=self.get_cookie_samesite(app),
            httponly=self.get_cookie_httponly(app),
            partitioned=self.get_cookie_partitioned(app),
        )
        response.vary.add("Cookie")
        _keep_private(response, no_store=True)

    def get_expiration_time(self, app: Flask, session: SessionMixin) -> datetime | None:
        if not dict.get(cast("dict[str, Any]", session), "_permanent", False):
            return None
        created = dict.get(cast("dict[str, Any]", session), CREATED_AT)
        start = created if isinstance(created, int) else int(time.time())
        return datetime.fromtimestamp(start, UTC) + self.absolute_lifetime

    # -- login and logout (see lifecycle.py) -------------------------------------------------------

    def regenerate(self, session: ServerSideSession) -> None:
        """Move the session to a new id (login, change of privilege). The new record is written
        at the end of the request and the old one deleted only then; the absolute timeout
        starts again."""
        session = _unproxied(session)
        if session.stored is not None and session.replaces is None:
            session.replaces = self.store_id(session.sid)
        # A login on an id a login or logout retired (a form submitted twice) starts afresh.
        session.retired = None
        session.sid = self._generate_sid(self.sid_length)
        session.stored = None
        dict.__setitem__(session, CREATED_AT, int(time.time()))
        session.modified = True

    def end(self, session: ServerSideSession) -> None:
        """Log out now: delete the stored record and move the session to a new, empty id, so
        nothing written later (in this request or one already running) brings the old id back."""
        session = _unproxied(session)
        with self.breaker.guard():  # a view's call: logged, and failing fast, like the others
            self._end(session)

    def _end(self, session: StoreSession) -> None:
        if session.retired is not None and session.retired.successor is not None:
            # The request carried the id a login just retired: the browser may already hold
            # the signed-in session's cookie, which this logout deletes; end that session too.
            self.records.retire(session.retired.successor, Retired.now(None))
        session.retired = None
        self._forget(session, self.store_id(session.sid))
        session.sid = self._generate_sid(self.sid_length)
        session.stored = None
        session.replaces = None
        session.clear()
        dict.pop(session, CREATED_AT, None)
        session.modified = True

    # -- idle timeouts: signed-in and anonymous sessions -----------------------------------------

    def idle_lifetime(self, app: Flask, sid: str) -> timedelta:
        """The idle timeout every read and write of session ``sid`` slides: the full one
        (``app.permanent_session_lifetime``) for a signed-in session, ``anonymous_lifetime``
        (never longer) for a session without ``SESSION_USER_KEY``.

        The kind is in the id (:data:`ANONYMOUS_SID_MARK`), because a read slides the expiry
        before the session is decoded (Redis ``GETEX key EX ttl``, one round trip): the cookie
        alone must say which timeout applies. A new record gets an id of its session's kind; an
        anonymous session that gains its user (a login without ``rotate_session_id()``) moves
        to a signed-in id at the end of that request, as a rotation would. So a request without
        a cookie creates a record that lives the short timeout however often its cookie is sent
        back, a signed-in user's read never shortens theirs, and every read stays one round
        trip. A signed-in id keeps the full timeout when its user goes without
        ``end_session()`` (which gives a new, anonymous id), and an id of an earlier release
        (no mark) is a signed-in one: no deploy shortens anyone's session; neither kind can be
        made by a request without a login. The kind cannot be forged: the store key hashes the
        whole id, mark included.
        """
        full = app.permanent_session_lifetime
        if is_anonymous_sid(sid):
            return min(self.anonymous_lifetime, full)
        return full

    def _id_fits(self, session: StoreSession) -> bool:
        """False for an anonymous id whose session has a user (it must move); a signed-in id
        fits any session (one whose user went keeps its id and its timeout)."""
        return not is_anonymous_sid(session.sid) or self.user_of(session) is None

    def _new_sid(self, session: StoreSession) -> str:
        sid: str = self._generate_sid(self.sid_length)
        return ANONYMOUS_SID_MARK + sid if self.user_of(session) is None else sid

    # -- helpers -----------------------------------------------------------------------------------

    def store_id(self, sid: str) -> str:
        return hashed_store_id(self.key_prefix, sid)

    # Flask-Session's abstract hooks: its open/save/regenerate are replaced above, so nothing in
    # Flask-Session calls these; they answer through the contract all the same.
    def _retrieve_session_data(self, store_id: str) -> dict[str, Any] | None:
        record = self.records.read(store_id, self.app.permanent_session_lifetime)
        return self.decode(record, store_id) if isinstance(record, Record) else None

    def _delete_session(self, store_id: str) -> None:
        self.records.delete(store_id)

    def _upsert_session(
        self, session_lifetime: timedelta, session: ServerSideSession, store_id: str
    ) -> None:
        raise NotImplementedError("sessions are written by save_session()")


SESSION_ENDED_MESSAGE = (
    "The session ended (signed out or signed in elsewhere) while this request ran; "
    "its changes were not saved."
)


def _moved(session: StoreSession, moved_from: str | None) -> StoreSession:
    """A session the browser sent under the cookie's previous name, if ``moved_from`` is one:
    its cookie is set under the new name (the browser holds none yet) and the old one deleted
    (see ``save_session``). A retired id stays retired: no cookie is set for it."""
    if moved_from is not None:
        session.moved_from = moved_from
        session.sent = None
    return session


def _unproxied(session: object) -> StoreSession:
    """The session object itself, also when given Flask's ``session`` proxy."""
    unwrap = getattr(session, "_get_current_object", None)
    current = unwrap() if unwrap is not None else session
    if not isinstance(current, StoreSession):
        raise TypeError("expected a session opened by SessionStore's interface")
    return current


def _error_response(error: str, message: str, status: int, **extra: str) -> Response:
    """JSON for clients that prefer it, plain text otherwise; never stored by a cache (it
    answers one request of one session) nor sniffed as another content type. A 503 or 409 is
    counted (``pyloto.session_store.answers``)."""
    if status in (409, 503):
        count_answer(status, error)
    if request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json":
        response = jsonify(error=error, message=message, **extra)
    else:
        response = Response(message + "\n", mimetype="text/plain")
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _not_saved_response(error: str, exc: Exception) -> Response:
    """500 for a session that could not be written. The body is generic: the detail names the
    size limit, the backend and the session's own key names (user input, for nested dicts),
    so it goes to the log line only, with the correlation id the body shows."""
    correlation_id = secrets.token_hex(8)
    logger.error(
        "%s [correlation id %s]", exc, correlation_id, extra={"correlation_id": correlation_id}
    )
    message = f"The session could not be saved (correlation id {correlation_id})."
    return _error_response(error, message, 500, correlation_id=correlation_id)


def _keep_private(response: Response, *, no_store: bool = False) -> None:
    """Keep an answer that depends on the session out of shared caches.

    ``public`` (and ``s-maxage``, which only shared caches read) becomes ``private``: a view
    may mark a page public, but once it read the session the page is this user's, and once it
    sets or deletes the session cookie a shared cache would hand that cookie to the next
    visitor. With ``no_store`` (the session cookie is set or deleted) nothing keeps the answer
    at all, not even the browser. Stronger directives the view set (``no-store``,
    ``no-cache``, a ``max-age`` for the browser) stay as they are.
    """
    if "Cache-Control" not in response.headers:  # the usual case: no parsing, no rewriting
        response.headers["Cache-Control"] = "private, no-store" if no_store else "private"
        return
    cache_control = response.cache_control
    cache_control.public = False
    cache_control.s_maxage = None
    cache_control.private = True
    if no_store:
        cache_control.no_store = True


def _replace(response: Response, replacement: Response) -> None:
    """Turn ``response`` (already built by the view, and through the after-request hooks) into
    ``replacement``: its status, body and headers, plus the view's other cookies (never a
    session cookie: none is set on this path). Nothing of the view's answer is left to describe
    a body it no longer has (Content-Encoding, ETag, Location) or to let a cache keep it."""
    cookies = response.headers.getlist("Set-Cookie")
    response.status_code = replacement.status_code
    response.headers.clear()
    response.headers.extend(replacement.headers)
    for cookie in cookies:
        response.headers.add("Set-Cookie", cookie)
    response.headers["Cache-Control"] = "no-store"
    response.vary.add("Cookie")
    response.set_data(replacement.get_data())
