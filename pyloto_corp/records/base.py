"""The record contract: encoded values by key, with expiry, usable without a Flask request or a
cookie, under every user of stored state (cookie sessions, keyed state, idempotency).

A record store knows what a record is, never what it means to a request: the caller hashes the
keys and encodes the values (:mod:`.codec`). A backend is one module here (or one small
package), and every operation is one atomic step on its store: a Lua script on Redis, a
precondition or a batch on Firestore, one lock in memory. Two record layouts share a store:

- *session records* (``read``/``create``/``update``/``retire``): each key's encoded value; a
  retired id leaves a marker for a while; a record may name its user (``user_key``), indexed for
  "log out everywhere", with a per-user revocation mark;
- *entries* (``load``/``merge``/``acquire``/``save``, keyed state): the same values plus a lease
  with a fencing token, so one holder at a time may change them.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..config.settings import MAX_LIFETIME
from ..errors import SessionTooLarge
from . import codec

if TYPE_CHECKING:
    from environs import Env

    from ..config.settings import Settings

T = TypeVar("T")

#: Record key holding the creation time (epoch seconds), for the absolute timeout.
CREATED_AT = "_created_at"
#: Record key holding when the session became its user's (epoch seconds, a float): a revoke of
#: that user ends every session whose time is before the revoke's. Kept when the id rotates.
USER_SINCE = "_user_since"
#: What ``check`` and ``info`` show instead of a URL or project when the app passes its client.
CLIENT_GIVEN = "client given by the app"
#: How long the marker a login or a logout leaves where a session was (see :class:`Retired`)
#: keeps answering for it: longer than any request that may still carry the old id.
RETIRED_LINGER = timedelta(minutes=2)
#: A creation time further than this from now (either way) is no time a session can have: the
#: longest absolute lifetime allowed is 400 days.
CREATION_TIME_RANGE = MAX_LIFETIME.total_seconds()
#: Bytes of framing a stored record takes besides its keys and values: a 2-byte marker, and two
#: 4-byte lengths per key (Redis's layout; every backend counts the same, so one limit means the
#: same everywhere). A keyed-state entry adds its lease (a token's length, the token, the time
#: it runs out), counted whether a lease is held or not: the same keys take the same size.
RECORD_OVERHEAD = 2
FIELD_OVERHEAD = 8
TOKEN_LENGTH = 32
LEASE_OVERHEAD = 4 + TOKEN_LENGTH + 8


class StoreOptions(ABC):
    """A backend's own settings: its variables, their parsing and their rules (pure, no IO).

    Subclasses are frozen dataclasses named ``Options`` in the backend's module; every field has
    a default, so ``Options()`` is the backend with defaults.
    """

    #: The backend's name (``SESSION_STORE_BACKEND``) and its module's name.
    backend: ClassVar[str]
    #: Every environment variable the backend reads.
    VARIABLES: ClassVar[tuple[str, ...]]

    @classmethod
    @abstractmethod
    def from_env(cls, env: Env) -> StoreOptions:
        """Read the backend's variables from a non-eager environs ``Env`` (errors are collected
        by the caller's ``env.seal()``; an unset or unparseable variable keeps its default)."""

    @abstractmethod
    def problems(self, settings: Settings) -> list[str]:
        """Every problem with these options in ``settings``' environment; never a secret."""

    @abstractmethod
    def redacted(self, settings: Settings) -> dict[str, Any]:
        """The effective options keyed by variable name, secrets shown as ``***``."""

    def with_client(self) -> StoreOptions:
        """These options for an app that passes its own client (``client=``, ``SESSION_REDIS``):
        a backend whose settings only build a client then neither requires nor uses them."""
        return self


@dataclass(frozen=True)
class Record:
    """What the store held when a request read a session."""

    #: Each top-level key's encoded value (``codec.pack_value``); None for a record an earlier
    #: release stored whole, as one blob.
    fields: Mapping[str, bytes] | None
    #: That earlier release's blob (``codec.loads`` reads it).
    blob: bytes | None = None
    #: Whatever the backend needs to write the record back (Firestore: its stored expiry).
    version: object = None
    #: The user whose revocation mark the backend fetched with the record (the ``user`` passed
    #: to ``read``), and that mark (None: that user was never revoked).
    mark_user: str | None = None
    mark: float | None = None


@dataclass(frozen=True)
class Retired:
    """What a login or a logout leaves where a session was, for :data:`RETIRED_LINGER`.

    A request still carrying the old id (an XHR in flight while the user signed in) reads this
    instead of "no session": it starts no new anonymous session whose cookie would replace the
    login's, and its changes are refused (409). A logout that still carries the pre-login id
    ends ``successor`` too, so the signed-in session does not outlive the browser's cookie.
    """

    #: The store id the session moved to at login; None after a logout.
    successor: str | None
    #: Epoch seconds after which the marker means nothing (a read may outlive it in the store).
    until: float

    @classmethod
    def now(cls, successor: str | None) -> Retired:
        return cls(successor, time.time() + RETIRED_LINGER.total_seconds())

    @property
    def live(self) -> bool:
        return self.until > time.time()


@dataclass(frozen=True)
class UserSession:
    """One session of a user, as ``user_sessions()`` lists it: nothing that would let the
    caller act as the user (no session id, no store key)."""

    #: Opaque, stable for the session's life: pass it to ``revoke_session()``.
    handle: str
    created_at: datetime
    #: When a request last used the session (Firestore: to within its refresh interval).
    last_seen: datetime


@dataclass(frozen=True)
class Changes:
    """What a request's save does to the stored record: only the keys it changed."""

    #: Keys set or replaced, with their encoded values.
    set: Mapping[str, bytes]
    #: Keys deleted.
    delete: tuple[str, ...]
    #: True: write ``set`` as the whole record (a new session, or one stored whole by an earlier
    #: release, rewritten in the current format); False: merge into what is stored now.
    whole: bool

    def __bool__(self) -> bool:
        return self.whole or bool(self.set) or bool(self.delete)


def handle_of(store_id: str) -> str:
    """A session's public handle: derived from the store key, and no way back to it."""
    return hashlib.sha256(b"pyloto-session-handle:" + store_id.encode()).hexdigest()[:32]


def creation_time(value: object) -> float | None:
    """A stored creation time that can be one: a finite number of epoch seconds within
    ``CREATION_TIME_RANGE`` of now; None for anything else (NaN, a bool, a string, year 3000)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if not math.isfinite(value) or abs(time.time() - value) > CREATION_TIME_RANGE:
        return None
    return float(value)


def _stored_times(fields: Mapping[str, bytes]) -> dict[str, Any] | None:
    """A stored session's USER_SINCE and CREATED_AT, decoded (None: they do not decode)."""
    try:
        return {
            key: codec.unpack_value(fields[key])
            for key in (USER_SINCE, CREATED_AT)
            if key in fields
        }
    except ValueError:
        return None


def listed_since(fields: Mapping[str, bytes]) -> float | None:
    """When a stored session became its user's, for a listing (USER_SINCE, else its creation
    time, else now, as records of an early release); None when the record is malformed."""
    data = _stored_times(fields)
    if data is None or (CREATED_AT in data and creation_time(data[CREATED_AT]) is None):
        return None
    since = user_since(data)
    return since if since > 0 else time.time()


def began_before(fields: Mapping[str, bytes], at: float) -> bool:
    """Whether a stored session became its user's before ``at``: what a revoke at ``at`` ends
    (a malformed record, or one with no time at all, too)."""
    data = _stored_times(fields)
    return data is None or user_since(data) < at


def mark_lifetime(absolute_lifetime: timedelta) -> float:
    """Seconds a revocation mark is kept: the absolute lifetime (no session it ends can outlive
    that) and a day's margin for a request that rotated such a session while the revoke ran."""
    return absolute_lifetime.total_seconds() + 86_400


def user_since(data: Mapping[str, Any]) -> float:
    """When a session became its user's: USER_SINCE, or for a session stored before it existed
    its creation time; 0 when neither is a time (any revoke ends it)."""
    since = creation_time(data.get(USER_SINCE))
    if since is None:
        since = creation_time(data.get(CREATED_AT))
    return 0.0 if since is None else since


def user_session(
    store_id: str,
    created: float,
    lifetime: timedelta,
    seconds_left: float,
    now: float | None = None,
) -> UserSession:
    """What ``user_sessions()`` shows of a session: when it began, and when it was last used
    (its idle expiry, slid by every use, minus the lifetime)."""
    now = time.time() if now is None else now
    last_seen = now - max(0.0, lifetime.total_seconds() - seconds_left)
    return UserSession(
        handle=handle_of(store_id),
        created_at=datetime.fromtimestamp(created, UTC),
        last_seen=datetime.fromtimestamp(max(created, last_seen), UTC),
    )


def record_size(fields: Mapping[str, bytes]) -> int:
    """Bytes a record takes stored: its keys, their encoded values and the framing around
    them (what SESSION_MAX_BYTES limits)."""
    size = RECORD_OVERHEAD
    for key, raw in fields.items():
        size += FIELD_OVERHEAD + len(key.encode("utf-8", "surrogatepass")) + len(raw)
    return size


def store_options(settings: Settings) -> dict[str, Any]:
    """The :class:`RecordStore` keywords every backend takes from the core settings."""
    return {
        "key_prefix": settings.session_key_prefix,
        "max_bytes": settings.session_max_bytes,
        "user_key": settings.session_user_key,
        "absolute_lifetime": settings.session_absolute_lifetime,
        "max_per_user": settings.session_max_per_user,
    }


def too_large(size: int, limit: int, backend: str) -> SessionTooLarge:
    """The error for a write of ``size`` bytes over ``limit``: nothing was written."""
    return SessionTooLarge(
        f"The session is {size:,} bytes encoded; the {backend} store accepts at most "
        f"{limit:,} (SESSION_MAX_BYTES). The stored session was left unchanged."
    )


def entry_size(fields: Mapping[str, bytes]) -> int:
    """Bytes a keyed-state entry takes stored: a record's, and its lease."""
    return record_size(fields) + LEASE_OVERHEAD


#: The fencing token of a record that was never leased.
NO_FENCE = ""


def new_token() -> str:
    """A lease's fencing token: random, so a record deleted and leased again never hands out a
    token a late holder still has (a counter would restart)."""
    return secrets.token_hex(TOKEN_LENGTH // 2)


@dataclass(frozen=True)
class Entry:
    """A stored record: each key's encoded value, and its lease's state."""

    fields: dict[str, bytes] = field(default_factory=dict)
    #: The fencing token of the latest lease taken on this record.
    fence: str = NO_FENCE
    #: When that lease runs out (epoch seconds); 0 once released.
    lease_until: float = 0.0


@dataclass(frozen=True)
class Lease:
    """A lease taken: its fencing token and the record as it stood (None: there was none)."""

    token: str
    entry: Entry | None


@dataclass(frozen=True)
class Done:
    """No lease taken: the entry holds the ``done`` key :meth:`RecordStore.acquire` was given
    (a completed idempotency record), as it stands."""

    entry: Entry


@dataclass(frozen=True)
class Held:
    """The lease is someone else's for this long still (seconds)."""

    remaining: float


class RecordStore(ABC):
    """One backend's records. ``lifetime`` is the idle expiry that every write and every load
    slides; ``max_bytes`` bounds a record's encoded size (a write beyond it raises
    :class:`~pyloto_corp.errors.SessionTooLarge` and changes nothing). Store failures raise
    :class:`~pyloto_corp.errors.SessionStoreUnavailable` (its subclass
    :class:`~pyloto_corp.errors.SessionStoreNotAnswering` when the store did not answer in time).
    """

    #: The backend's name (``SESSION_STORE_BACKEND``).
    backend_name: ClassVar[str]

    def __init__(
        self,
        *,
        key_prefix: str,
        max_bytes: int,
        user_key: str = "_user_id",
        absolute_lifetime: timedelta = timedelta(days=7),
        max_per_user: int = 1000,
    ) -> None:
        #: Every key this store writes for sessions, their users and keyed state starts with it.
        self.key_prefix = key_prefix
        self.max_bytes = max_bytes
        #: The record key naming a session's user (``SESSION_USER_KEY``).
        self.user_key = user_key
        #: No session outlives it: a revocation mark is kept that long (and a margin).
        self.absolute_lifetime = absolute_lifetime
        #: Beyond this many sessions of one user, the oldest are ended at login (0: no cap).
        self.max_per_user = max_per_user
        self._client: tuple[int, Any] | None = None
        self._client_lock = threading.Lock()

    def process_client(self, build: Callable[[], T]) -> T:
        """The backend's client, built on first use and again in a forked child: building may do
        IO (a cluster's slot map) or open channels that do not survive a fork (gRPC), which
        must happen neither at app init nor before gunicorn forks its workers."""
        current = self._client
        if current is None or current[0] != os.getpid():
            with self._client_lock:
                current = self._client
                if current is None or current[0] != os.getpid():
                    current = (os.getpid(), build())
                    self._client = current
        client: T = current[1]
        return client

    def server_address(self) -> str | None:
        """The store's host for telemetry (``server.address``): never a URL, user or password."""
        return None

    def check_size(self, size: int) -> None:
        """Raise SessionTooLarge when a record of ``size`` bytes exceeds the limit."""
        if size > self.max_bytes:
            raise too_large(size, self.max_bytes, self.backend_name)

    # -- session records ---------------------------------------------------------------------------

    @abstractmethod
    def read(
        self, store_id: str, lifetime: timedelta, user: str | None = None
    ) -> Record | Retired | None:
        """The stored record, its idle expiry slid to ``lifetime`` from now; the marker a login
        or a logout left (:meth:`retire`); None when absent. One round trip when a record is
        there: this runs on every request that carries a session cookie. ``user``: the user
        the caller last saw the record hold; a backend that can fetch that user's revocation
        mark in the same round trip returns it in the record (``mark_user``)."""

    @abstractmethod
    def create(self, store_id: str, fields: Mapping[str, bytes], lifetime: timedelta) -> bool:
        """Store a new record unless ``store_id`` is taken; False when it is (never overwrite).
        Raises SessionTooLarge over ``max_bytes``."""

    @abstractmethod
    def update(self, store_id: str, changes: Changes, lifetime: timedelta, stored: Record) -> bool:
        """Apply ``changes`` to the record in one atomic step if it still exists, and slide its
        expiry; False when it does not (a logout is final). Keys the caller did not change are
        left as the store has them now, so concurrent changes to other keys survive. Raises
        SessionTooLarge, leaving the record unchanged, when the merged record would exceed
        ``max_bytes``."""

    @abstractmethod
    def delete(self, store_id: str) -> bool:
        """Delete the record (of either layout); whether it was there."""

    @abstractmethod
    def retire(self, store_id: str, marker: Retired) -> bool:
        """Replace the live record at ``store_id`` by ``marker`` (kept about
        :data:`RETIRED_LINGER`), in one atomic step; whether a live record was there. Absent
        or already retired: nothing is written and the answer is False. Afterwards ``read``
        returns the marker, and ``update`` refuses the id as gone."""

    @abstractmethod
    def ping(self) -> dict[str, object]:
        """Prove the store answers, within the configured timeout; what it learnt of the
        store's topology (nothing secret: ``/readyz`` shows it, less any address)."""

    def touch(self, store_id: str, stored: Record, lifetime: timedelta) -> None:
        """A read-only use ends: slide the expiry if ``read`` did not (Firestore does it
        lazily). A record gone meanwhile is left gone."""
        return None

    def delete_expired(self, batch_size: int) -> int:
        """Delete the records whose expiry passed, ``batch_size`` per step; how many. Only for
        a store that does not expire them by itself (Firestore without its TTL policy)."""
        return 0

    # -- the user index ("log out everywhere") ---------------------------------------------------
    #
    # Two parts. The revocation mark (one value per user: the time of the user's last revoke) is
    # what makes a revoke final: every read of a session that has a user compares the session's
    # USER_SINCE with it, so a session the index lost, or one a racing login put there a moment
    # after the listing, still ends. The index only lists: a page at a time, never read whole,
    # never deleted whole.

    @abstractmethod
    def revoked_at(self, user: str) -> float | None:
        """The time of ``user``'s last revoke (None: none live); one store operation."""

    @abstractmethod
    def mark_revoked(self, user: str, at: float) -> None:
        """From now on, every session of ``user`` whose USER_SINCE is before ``at`` is ended.
        The mark lasts the absolute lifetime (and a margin): no such session can outlive it."""

    @abstractmethod
    def find_user_sessions(self, user: str, lifetime: timedelta) -> dict[str, UserSession]:
        """The live sessions the index holds for ``user`` now, by store id, without reading any
        session's data. Expired ones are left out (and dropped from the index on the way)."""

    def index(self, store_id: str, user: str) -> None:
        """``store_id`` now belongs to ``user``: one store operation at most. Stores that keep
        the user in the record itself (and query it) do nothing here."""
        return None

    def unindex(self, store_id: str, user: str) -> None:
        """``store_id`` no longer belongs to ``user`` (logout, or the record was deleted)."""
        return None

    def revoke(self, user: str, keep: Collection[str], before: float) -> int:
        """Delete the sessions the index holds for ``user`` that began before ``before``, but
        those in ``keep`` (store ids); how many were deleted. The mark is already set: this only
        frees the records."""
        ended = 0
        for store_id, found in self.find_user_sessions(user, timedelta(0)).items():
            if store_id not in keep and found.created_at.timestamp() < before:
                if self.delete(store_id):
                    ended += 1
                self.unindex(store_id, user)
        return ended

    # -- entries (keyed state) ---------------------------------------------------------------------

    @abstractmethod
    def load(self, key: str, lifetime: timedelta) -> Entry | None:
        """The entry, its expiry slid by ``lifetime``; None when absent, expired, or holding no
        key (only a lease)."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a live entry holding a key is stored (expiry untouched)."""

    @abstractmethod
    def merge(
        self,
        key: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
        *,
        loaded: Mapping[str, bytes] | None = None,
    ) -> None:
        """Apply the changed and deleted keys to the entry as stored now (creating it if
        absent); an entry left with no key and no running lease is deleted. ``loaded``: the
        keys the caller loaded (None: it found no entry), for a store that cannot check the
        merged size, or tell a live entry from an expired one, without reading it again."""

    @abstractmethod
    def fill(self, key: str, fields: Mapping[str, bytes], lifetime: timedelta) -> None:
        """Set each of ``fields`` the entry does not hold yet (creating it if absent), keeping
        the keys it holds and its lease: an entry moved from another key (a rotated secret's)
        never overwrites what a concurrent writer already put under the new key."""

    def delete_entry(self, key: str) -> bool:
        """Delete the entry; whether a live one was there (an expired one is not)."""
        return self.delete(key)

    @abstractmethod
    def acquire(
        self, key: str, lease: timedelta, lifetime: timedelta, *, done: str | None = None
    ) -> Lease | Held | Done:
        """Take the entry's lease for ``lease`` and load it, in one step, unless another
        holder's lease is still running (:class:`Held`), or the entry holds the key ``done``
        (:class:`Done`, nothing written). A lease that ran out is taken over: the entry gets a
        new fencing token, so the late holder's :meth:`save` is refused."""

    @abstractmethod
    def save(
        self,
        key: str,
        token: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
    ) -> bool:
        """Merge the changes and release the lease, only while ``token`` is the entry's
        latest fence (even if the lease ran out, as long as nobody took it since); False
        otherwise, with nothing written. Empty changes only release."""

    def release(self, key: str, token: str, lifetime: timedelta) -> bool:
        """Give the lease back without writing; False when it was taken over meanwhile."""
        return self.save(key, token, {}, (), lifetime)
