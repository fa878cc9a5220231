"""The record contract: encoded values by key, with expiry, an atomic per-key merge and a lease
with a fencing token, usable without a Flask request or a cookie.

A record store knows nothing of what its keys mean: the caller hashes them (keyed state, the
idempotency keys) and encodes the values (``session_store.codec``). Every operation is one
atomic step on the store: a Lua script on Redis, a precondition or a batch on Firestore, one
lock in memory.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

#: The fencing token of a record that was never leased.
NO_FENCE = ""


def new_token() -> str:
    """A lease's fencing token: random, so a record deleted and leased again never hands out a
    token a late holder still has (a counter would restart)."""
    return secrets.token_hex(16)


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
class Held:
    """The lease is someone else's for this long still (seconds)."""

    remaining: float


class RecordStore(ABC):
    """One backend's records. ``lifetime`` is the idle expiry that every write and every load
    slides; ``max_bytes`` bounds a record's encoded size (a write beyond it raises
    :class:`~pyloto_corp.errors.SessionTooLarge` and changes nothing)."""

    backend_name: str
    max_bytes: int

    @abstractmethod
    def load(self, key: str, lifetime: timedelta) -> Entry | None:
        """The record, its expiry slid by ``lifetime``; None when absent or expired."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether a live record is stored (expiry untouched)."""

    @abstractmethod
    def merge(
        self,
        key: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
        *,
        fresh: bool = False,
    ) -> None:
        """Apply the changed and deleted keys to the record as stored now (creating it if
        absent); a record left with no key and no live lease is deleted. ``fresh``: the caller
        loaded no record (a store that keeps expired records until a sweep then creates it,
        rather than merging into what expired)."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the record, lease and all; whether it was there."""

    @abstractmethod
    def acquire(self, key: str, lease: timedelta, lifetime: timedelta) -> Lease | Held:
        """Take the record's lease for ``lease`` and load it, in one step, unless another
        holder's lease is still running (:class:`Held`). A lease that ran out is taken over:
        the record gets a new fencing token, so the late holder's :meth:`save` is refused."""

    @abstractmethod
    def save(
        self,
        key: str,
        token: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
    ) -> bool:
        """Merge the changes and release the lease, only while ``token`` is the record's
        latest fence (even if the lease ran out, as long as nobody took it since); False
        otherwise, with nothing written. Empty changes only release."""

    def release(self, key: str, token: str, lifetime: timedelta) -> bool:
        """Give the lease back without writing; False when it was taken over meanwhile."""
        return self.save(key, token, {}, (), lifetime)

    @abstractmethod
    def ping(self) -> dict[str, object]:
        """One cheap round trip; raises SessionStoreUnavailable when the store does not answer."""
