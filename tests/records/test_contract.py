"""The record contract, on every backend's real service: what keyed state (and, above it,
idempotency) relies on."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from pyloto_corp.errors import SessionTooLarge
from pyloto_corp.records.base import Done, Held, Lease
from tests.records.conftest import Stored

LIFETIME = timedelta(minutes=10)
LEASE = timedelta(seconds=30)


def test_a_merge_creates_then_merges_each_key(stored: Stored) -> None:
    store = stored.store
    assert store.load("k1", LIFETIME) is None
    assert not store.exists("k1")
    store.merge("k1", {"a": b"1", "b": b"2"}, (), LIFETIME)
    # Another writer that loaded before the first one wrote: its keys land beside them.
    store.merge("k1", {"c": b"3"}, (), LIFETIME)
    store.merge("k1", {"a": b"9"}, ["b"], LIFETIME)
    entry = store.load("k1", LIFETIME)
    assert entry is not None
    assert entry.fields == {"a": b"9", "c": b"3"}
    assert store.exists("k1")
    assert store.load("k2", LIFETIME) is None  # keys are separate


def test_a_record_emptied_by_a_merge_is_deleted(stored: Stored) -> None:
    store = stored.store
    store.merge("k", {"a": b"1"}, (), LIFETIME)
    store.merge("k", {}, ["a"], LIFETIME)
    assert store.load("k", LIFETIME) is None
    assert not store.exists("k")


def test_delete_says_whether_the_record_was_there(stored: Stored) -> None:
    store = stored.store
    store.merge("k", {"a": b"1"}, (), LIFETIME)
    assert store.delete("k") is True
    assert store.delete("k") is False
    assert store.load("k", LIFETIME) is None


def test_a_record_expires_after_its_lifetime_unless_used(stored: Stored) -> None:
    store = stored.store
    short = timedelta(seconds=1)
    store.merge("idle", {"a": b"1"}, (), short)
    store.merge("used", {"a": b"1"}, (), short)
    time.sleep(0.6)
    assert store.load("used", timedelta(seconds=30)) is not None  # the load slides it
    time.sleep(0.7)
    assert store.load("idle", LIFETIME) is None
    assert not store.exists("idle")
    assert store.load("used", LIFETIME) is not None


def test_a_merge_over_the_size_limit_is_refused_and_changes_nothing(stored: Stored) -> None:
    store = stored.store
    store.merge("k", {"a": b"1"}, (), LIFETIME)
    with pytest.raises(SessionTooLarge, match="SESSION_MAX_BYTES"):
        store.merge("k", {"big": b"x" * store.max_bytes}, (), LIFETIME)
    entry = store.load("k", LIFETIME)
    assert entry is not None
    assert entry.fields == {"a": b"1"}


def test_a_lease_is_taken_with_the_load_and_excludes_others(stored: Stored) -> None:
    store = stored.store
    store.merge("k", {"a": b"1"}, (), LIFETIME)
    taken = store.acquire("k", LEASE, LIFETIME)
    assert isinstance(taken, Lease)
    assert taken.entry is not None
    assert taken.entry.fields == {"a": b"1"}
    other = store.acquire("k", LEASE, LIFETIME)
    assert isinstance(other, Held)
    assert 25 < other.remaining <= 30
    assert store.save("k", taken.token, {"b": b"2"}, ["a"], LIFETIME) is True
    entry = store.load("k", LIFETIME)
    assert entry is not None
    assert entry.fields == {"b": b"2"}
    # Released with the save: the next caller takes it at once.
    assert isinstance(store.acquire("k", LEASE, LIFETIME), Lease)


def test_a_lease_on_no_record_loads_none_and_a_release_leaves_none(stored: Stored) -> None:
    store = stored.store
    taken = store.acquire("new", LEASE, LIFETIME)
    assert isinstance(taken, Lease)
    assert taken.entry is None
    assert store.release("new", taken.token, LIFETIME) is True
    assert not store.exists("new")


def test_a_holder_taken_over_after_its_lease_writes_nothing(stored: Stored) -> None:
    store = stored.store
    store.merge("k", {"n": b"0"}, (), LIFETIME)
    late = store.acquire("k", timedelta(milliseconds=300), LIFETIME)
    assert isinstance(late, Lease)
    time.sleep(0.5)
    current = store.acquire("k", LEASE, LIFETIME)
    assert isinstance(current, Lease)
    assert store.save("k", late.token, {"n": b"late"}, (), LIFETIME) is False
    assert store.release("k", late.token, LIFETIME) is False
    entry = store.load("k", LIFETIME)
    assert entry is not None
    assert entry.fields == {"n": b"0"}
    # The late release did not free the current holder's lease.
    assert isinstance(store.acquire("k", LEASE, LIFETIME), Held)
    assert store.save("k", current.token, {"n": b"1"}, (), LIFETIME) is True


def test_a_slow_holder_nobody_took_over_still_saves(stored: Stored) -> None:
    store = stored.store
    slow = store.acquire("k", timedelta(milliseconds=200), LIFETIME)
    assert isinstance(slow, Lease)
    time.sleep(0.4)
    assert store.save("k", slow.token, {"done": b"1"}, (), LIFETIME) is True
    entry = store.load("k", LIFETIME)
    assert entry is not None
    assert entry.fields == {"done": b"1"}


def test_a_token_of_a_deleted_record_never_matches_a_new_lease(stored: Stored) -> None:
    store = stored.store
    first = store.acquire("k", LEASE, LIFETIME)
    assert isinstance(first, Lease)
    assert store.delete("k") is True
    second = store.acquire("k", LEASE, LIFETIME)
    assert isinstance(second, Lease)
    assert second.token != first.token
    assert store.save("k", first.token, {"x": b"1"}, (), LIFETIME) is False


def test_a_merge_during_a_lease_keeps_the_lease(stored: Stored) -> None:
    store = stored.store
    taken = store.acquire("k", LEASE, LIFETIME)
    assert isinstance(taken, Lease)
    store.merge("k", {"a": b"1"}, (), LIFETIME)
    store.merge("k", {}, ["a"], LIFETIME)  # empty, but leased: kept
    assert isinstance(store.acquire("k", LEASE, LIFETIME), Held)
    assert store.save("k", taken.token, {"b": b"2"}, (), LIFETIME) is True
    entry = store.load("k", LIFETIME)
    assert entry is not None
    assert entry.fields == {"b": b"2"}


def test_a_save_over_the_size_limit_is_refused_and_keeps_the_lease(stored: Stored) -> None:
    store = stored.store
    taken = store.acquire("k", LEASE, LIFETIME)
    assert isinstance(taken, Lease)
    with pytest.raises(SessionTooLarge):
        store.save("k", taken.token, {"big": b"x" * store.max_bytes}, (), LIFETIME)
    assert store.release("k", taken.token, LIFETIME) is True
    assert not store.exists("k")


def test_an_entry_holding_the_done_key_is_returned_and_not_leased(stored: Stored) -> None:
    store = stored.store
    taken = store.acquire("claim", LEASE, LIFETIME, done="result")
    assert isinstance(taken, Lease)
    assert taken.entry is None
    assert store.save("claim", taken.token, {"result": b"42"}, (), LIFETIME) is True
    again = store.acquire("claim", LEASE, LIFETIME, done="result")
    assert isinstance(again, Done)
    assert again.entry.fields == {"result": b"42"}
    # Nothing was taken: another caller (not asking for ``done``) gets the lease at once.
    assert isinstance(store.acquire("claim", LEASE, LIFETIME), Lease)


def test_the_done_key_wins_over_a_running_lease(stored: Stored) -> None:
    store = stored.store
    store.merge("claim", {"result": b"1"}, (), LIFETIME)
    assert isinstance(store.acquire("claim", LEASE, LIFETIME), Lease)
    assert isinstance(store.acquire("claim", LEASE, LIFETIME, done="result"), Done)
    assert isinstance(store.acquire("claim", LEASE, LIFETIME, done="other"), Held)
