"""Conversation state by id: keyed server-side state for webhooks and workers.

A cookie session is found by the id its cookie carries; a conversation is found by the sender's
id, written by a webhook on one instance and by a worker on another. :class:`KeyedState` keeps
such entries in the app's session store, with the guarantees cookie sessions have:

- ``open(id)``: the entry as a mapping; the keys changed in the block are merged into the
  entry as stored when the block ends, so concurrent blocks that change different keys all land;
- ``turn(id)``: the same, one holder at a time across processes and instances (a lease with a
  fencing token); a holder whose lease ran out and was taken over writes nothing
  (:class:`~pyloto_corp.errors.LeaseLost`);
- a store that is down raises :class:`~pyloto_corp.errors.SessionStoreUnavailable` (a request
  gets a 503), never an empty entry that would read as a new conversation;
- the store key is an HMAC of the namespace and the id under a key derived from ``SECRET_KEY``
  (a phone number has too little entropy for a plain hash to hide it); an entry stored under a
  key in ``SECRET_KEY_FALLBACKS`` is found, and moved under the current key on its next write.
  No id appears in a key, a log line, an exception or a ``repr``.

It needs ``SessionStore`` registered on the current app: inside a request, a CLI command, or
``with app.app_context():`` in a worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import random
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flask import current_app, has_app_context

from .errors import LeaseLost, SessionStoreUnavailable, StateBusy, UnstorableValue
from .records import codec
from .records.base import Entry, Held, Lease, RecordStore
from .session_store.base import StoreInterface
from .session_store.extension import EXTENSION_KEY

#: The longest lifetime or lease accepted (what browsers cap a cookie at, and our sessions).
MAX_DURATION = timedelta(days=400)
#: Ids and namespaces longer than this are refused (a message id, a phone number, a UUID fit).
MAX_ID_LENGTH = 1024
MAX_NAMESPACE_LENGTH = 100
#: What the store keys are derived with: a change of it would orphan every entry.
KEY_CONTEXT = b"pyloto_corp.state/v1"
#: A turn's lease unless given (or the namespace's lifetime, if shorter).
DEFAULT_LEASE = timedelta(seconds=60)
#: Backoff while waiting for a turn: from this, doubling, to at most the second (with jitter).
WAIT_FIRST, WAIT_MAX = 0.02, 1.0

#: Every namespace created in this process, with its lifetime (the longest, if it was created
#: more than once): what `flask session-store check` and `info` list.
_namespaces: dict[str, timedelta] = {}

#: The store keys of the turns this thread (or task) holds: a nested turn() of the same id
#: would wait for itself.
_held_turns: ContextVar[frozenset[str]] = ContextVar("pyloto_corp.state.held", default=frozenset())


def _duration(name: str, value: object, *, zero: bool = False) -> timedelta:
    bound = "0 or more" if zero else "more than 0"
    if not isinstance(value, timedelta) or not (
        timedelta(0) <= value <= MAX_DURATION if zero else timedelta(0) < value <= MAX_DURATION
    ):
        raise ValueError(
            f"{name} must be a datetime.timedelta of {bound} and at most 400 days, e.g. "
            f"{name}=timedelta(minutes=10); got {_kind(value)}"
        )
    return value


def _kind(value: object) -> str:
    """What was given, without its value when that could be an id or a secret."""
    if isinstance(value, timedelta):
        return f"timedelta(seconds={value.total_seconds():g})"
    return f"a {type(value).__name__}"


def _check_id(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        got = f"{len(value)} characters" if isinstance(value, str) else _kind(value)
        raise ValueError(
            f"id must be a non-empty str of at most {MAX_ID_LENGTH} characters (str(number) "
            f"for a numeric id); got {got}"
        )
    return value


class State(MutableMapping[str, Any]):
    """An entry's values inside an ``open()`` or ``turn()`` block. Any value a cookie session
    stores; keys are str. What changed is found by comparing encoded values at the end, so an
    in-place change (``state["history"].append(...)``) is saved too; ``modified`` is there for
    code written against Flask's session."""

    def __init__(self, namespace: str, data: dict[str, Any]) -> None:
        self.namespace = namespace
        self._data = data
        self.modified = False

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise UnstorableValue(
                f"keyed state keys are str; got a {type(key).__name__} key in {self.namespace!r}"
            )
        self._data[key] = value
        self.modified = True

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self.modified = True

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:  # the keys, never the values (they may be personal data)
        return f"<State of {self.namespace!r}: keys {sorted(self._data)!r}>"


@dataclass(frozen=True)
class _Bound:
    """What one call works with: the app's record store, its breaker, the entry's keys (the
    current one first, then those under SECRET_KEY_FALLBACKS)."""

    store: RecordStore
    interface: StoreInterface
    keys: tuple[str, ...]


class KeyedState:
    """Entries of one namespace (``"conversations"``), by id, expiring ``lifetime`` after their
    last use. Create it once at module level; it does no IO until used."""

    def __init__(self, namespace: str, *, lifetime: timedelta = timedelta(hours=2)) -> None:
        if (
            not isinstance(namespace, str)
            or not namespace
            or len(namespace) > MAX_NAMESPACE_LENGTH
            or not namespace.isprintable()
        ):
            raise ValueError(
                "namespace must be a non-empty str of printable characters, at most "
                f"{MAX_NAMESPACE_LENGTH} long, e.g. KeyedState('conversations'); got "
                f"{_kind(namespace) if not isinstance(namespace, str) else repr(namespace[:40])}"
            )
        self.namespace = namespace
        self.lifetime = _duration("lifetime", lifetime)
        _namespaces[namespace] = max(self.lifetime, _namespaces.get(namespace, self.lifetime))

    def __repr__(self) -> str:
        return f"KeyedState({self.namespace!r}, lifetime={self.lifetime!r})"

    # -- the API -----------------------------------------------------------------------------------

    def get(self, id: str) -> dict[str, Any] | None:
        """The entry's values, or None when there is none (one round trip; slides the expiry)."""
        bound = self._bind(id)
        entry = self._load(bound)
        return None if entry is None else self._decode(entry.fields)

    def exists(self, id: str) -> bool:
        """Whether an entry is stored (its expiry untouched)."""
        bound = self._bind(id)
        with bound.interface.breaker.guard():
            return any(bound.store.exists(key) for key in bound.keys)

    def delete(self, id: str) -> bool:
        """Remove the entry now (a user asks to be forgotten); whether there was one."""
        bound = self._bind(id)
        with bound.interface.breaker.guard():
            found = [bound.store.delete_entry(key) for key in bound.keys]
        return any(found)

    @contextmanager
    def open(self, id: str) -> Iterator[State]:
        """The entry as a mapping (empty when there is none). At the end of the block the keys
        it changed are merged into the entry as stored then; an emptied entry is deleted; an
        exception leaving the block saves nothing."""
        bound = self._bind(id)
        entry = self._load(bound)
        loaded = entry.fields if entry is not None else {}
        state = State(self.namespace, self._decode(loaded))
        yield state
        changed, deleted = _changes(state, loaded)
        if changed or deleted:
            with bound.interface.breaker.guard(admit=False):
                bound.store.merge(
                    bound.keys[0],
                    changed,
                    deleted,
                    self.lifetime,
                    loaded=None if entry is None else loaded,
                )

    @contextmanager
    def turn(
        self,
        id: str,
        *,
        lease: timedelta | None = None,
        wait: timedelta = timedelta(seconds=10),
    ) -> Iterator[State]:
        """Like :meth:`open`, one holder at a time per id across processes: the lease (60 s, or
        the lifetime if shorter; never longer than it) is taken with the load, in one round
        trip. While another holder has it, wait up to ``wait``, then raise
        :class:`~pyloto_corp.errors.StateBusy`. Leaving the block saves the changes and
        releases the lease in one round trip (an exception: releases only); if the lease ran
        out and another caller took the turn, nothing is written and
        :class:`~pyloto_corp.errors.LeaseLost` is raised."""
        lease = min(DEFAULT_LEASE, self.lifetime) if lease is None else _duration("lease", lease)
        if lease > self.lifetime:
            raise ValueError(
                f"lease must not be longer than the lifetime of {self.namespace!r} "
                f"({self.lifetime.total_seconds():g} s): the entry would expire under its holder"
            )
        wait = _duration("wait", wait, zero=True)
        bound = self._bind(id)
        held = _held_turns.get()
        if bound.keys[0] in held:
            raise RuntimeError(
                f"turn() of this id in {self.namespace!r} inside a turn() of the same id: it "
                "would wait for itself; use the state of the outer turn()"
            )
        token, entry = self._acquire(bound, lease, wait)
        reset = _held_turns.set(held | {bound.keys[0]})
        try:
            try:
                if entry is None and len(bound.keys) > 1:
                    with bound.interface.breaker.guard(admit=False):
                        entry = self._move(bound)
                loaded = entry.fields if entry is not None else {}
                state = State(self.namespace, self._decode(loaded))
                yield state
                changed, deleted = _changes(state, loaded)
                with bound.interface.breaker.guard(admit=False):
                    saved = bound.store.save(bound.keys[0], token, changed, deleted, self.lifetime)
            except BaseException:
                # Nothing saved (the block failed, a value was refused, the store failed):
                # give the turn back now rather than when the lease runs out, if the store
                # answers; the block's own error is what the caller needs to see.
                with contextlib.suppress(SessionStoreUnavailable):
                    bound.store.release(bound.keys[0], token, self.lifetime)
                raise
            if not saved:
                raise LeaseLost(
                    f"the turn() lease in {self.namespace!r} ran out ({lease.total_seconds():g} "
                    "s) and another caller took the turn: this turn's changes were not saved; "
                    "use a longer lease= for work this long"
                )
        finally:
            _held_turns.reset(reset)

    # -- the parts ---------------------------------------------------------------------------------

    def _bind(self, id: str) -> _Bound:
        return bind(f"KeyedState({self.namespace!r})", self.namespace, id)

    def _load(self, bound: _Bound) -> Entry | None:
        """The entry (sliding its expiry): under the current key, or else moved there from a
        fallback key's (a rotated SECRET_KEY)."""
        with bound.interface.breaker.guard():
            entry = bound.store.load(bound.keys[0], self.lifetime)
            if entry is not None or len(bound.keys) == 1:
                return entry
            return self._move(bound)

    def _move(self, bound: _Bound) -> Entry | None:
        """An entry found under a fallback key, moved under the current one before any change:
        its keys fill what the current key lacks (a writer that got there first keeps its
        values), then the old key is deleted. A few round trips, once per entry."""
        for old in bound.keys[1:]:
            entry = bound.store.load(old, self.lifetime)
            if entry is not None:
                bound.store.fill(bound.keys[0], entry.fields, self.lifetime)
                bound.store.delete_entry(old)
                return bound.store.load(bound.keys[0], self.lifetime)
        return None

    def _acquire(
        self, bound: _Bound, lease: timedelta, wait: timedelta
    ) -> tuple[str, Entry | None]:
        """Take the lease, retrying with a bounded, jittered backoff until ``wait`` is over."""
        deadline = time.monotonic() + wait.total_seconds()
        pause = WAIT_FIRST
        while True:
            with bound.interface.breaker.guard():
                taken = bound.store.acquire(bound.keys[0], lease, self.lifetime)
            if isinstance(taken, Lease):
                return taken.token, taken.entry
            assert isinstance(taken, Held)  # no ``done`` key asked for
            left = deadline - time.monotonic()
            if left <= 0:
                raise StateBusy(
                    f"another caller holds the turn of this id in {self.namespace!r} (for "
                    f"{taken.remaining:.1f} s more at most); try again later",
                    retry_after=max(1, math.ceil(taken.remaining)),
                )
            time.sleep(min(left, taken.remaining, pause * random.uniform(0.5, 1.0)))  # noqa: S311
            pause = min(WAIT_MAX, pause * 2)

    def _decode(self, fields: Mapping[str, bytes]) -> dict[str, Any]:
        data = {}
        for key, raw in fields.items():
            try:
                data[key] = codec.unpack_value(raw)
            except ValueError:
                raise ValueError(
                    f"a stored value of key {key!r} in {self.namespace!r} cannot be decoded; "
                    "the entry is kept as it is: remove it with `flask session-store state "
                    "delete` if it cannot be repaired"
                ) from None
        return data


def namespaces() -> dict[str, timedelta]:
    """The namespaces of the KeyedState objects this process created (the app's modules that
    create them at module level are imported by then), with their lifetimes."""
    return dict(sorted(_namespaces.items()))


def _changes(state: State, loaded: Mapping[str, bytes]) -> tuple[dict[str, bytes], list[str]]:
    """The keys whose encoded value differs from what was loaded, and the keys removed. Every
    value is encoded first, so one that cannot be stored fails here, before any write."""
    encoded = {key: codec.pack_value(key, value) for key, value in state.items()}
    changed = {key: raw for key, raw in encoded.items() if loaded.get(key) != raw}
    deleted = [key for key in loaded if key not in encoded]
    return changed, deleted


def bind(user: str, namespace: str, id: str, *, kind: str = "state") -> _Bound:
    """The current app's record store, its breaker, and the store keys of ``id`` in
    ``namespace`` (under SECRET_KEY, then each of SECRET_KEY_FALLBACKS). ``user`` names the
    caller in the errors (``KeyedState('conversations')``)."""
    _check_id(id)
    if not has_app_context():
        raise RuntimeError(
            f"{user} is used outside an app context: use it in a request, a CLI command, or "
            "inside `with app.app_context():` in a worker."
        )
    registration = current_app.extensions.get(EXTENSION_KEY)
    if registration is None:
        raise RuntimeError(
            f"{user} needs SessionStore registered on this app (SessionStore(app) or "
            "SessionStore().init_app(app)): it keeps its entries in the app's session store."
        )
    interface: StoreInterface = registration.interface
    secrets = [current_app.config.get("SECRET_KEY")]
    secrets += current_app.config.get("SECRET_KEY_FALLBACKS") or []
    keys = tuple(
        dict.fromkeys(
            store_key(interface.key_prefix, secret, namespace, id, kind=kind)
            for secret in secrets
            if secret
        )
    )
    if not keys:
        raise RuntimeError(f"{user} needs SECRET_KEY: its store keys are derived from it.")
    return _Bound(interface.records, interface, keys)


def store_key(
    prefix: str, secret: str | bytes, namespace: str, id: str, *, kind: str = "state"
) -> str:
    """``<SESSION_KEY_PREFIX><kind>:`` and an HMAC-SHA256 of the namespace and the id, keyed by
    a key derived from ``secret`` (so the keys say nothing of SECRET_KEY either)."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    derived = hmac.new(raw, KEY_CONTEXT, hashlib.sha256).digest()
    message = namespace.encode("utf-8") + b"\x00" + id.encode("utf-8", "surrogatepass")
    return f"{prefix}{kind}:{hmac.new(derived, message, hashlib.sha256).hexdigest()}"
