"""Records nobody wrote through the app (planted with store access, or stored under looser
rules): each is no session, with a warning, never a 500, never a disabled timeout, and never a
reason for a listing or a revoke to fail."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from flask import Flask, session

from pyloto_corp.errors import SessionTooLarge
from pyloto_corp.records import codec
from pyloto_corp.records.redis import store as redis_store
from pyloto_corp.records.redis.scripts import RECORD_MARKER
from pyloto_corp.session_store import (
    SessionStore,
    revoke_user_sessions,
    user_sessions,
)
from pyloto_corp.session_store.base import CREATED_AT, Changes, record_size
from tests.conftest import MakeApp, cookie_name
from tests.session_store.conftest import HARNESSES, Harness, user_routes
from tests.stored import store_session

DAY = 86_400.0
PLANTED_SID = "planted-" + "p" * 40


@pytest.fixture(params=["memory", "redis", "firestore"])
def store(request: pytest.FixtureRequest, make_app: MakeApp) -> Harness:
    return HARNESSES[request.param](make_app, request)


def _plant(app: Flask, sid: str, data: dict[str, Any], *, max_bytes: int = 1 << 24) -> str:
    """Store ``data`` under ``sid`` as someone with store access could (no size limit)."""
    interface = SessionStore.state(app).interface
    store_id = interface.store_id(sid)
    limit, interface.records.max_bytes = interface.max_bytes, max_bytes
    try:
        store_session(app, store_id, data)
    finally:
        interface.records.max_bytes = limit
    return store_id


BAD_CREATION_TIMES: dict[str, Callable[[], object]] = {
    "nan": lambda: float("nan"),
    "infinity": lambda: float("inf"),
    "minus infinity": lambda: float("-inf"),
    "500 days ago": lambda: time.time() - 500 * DAY,
    "500 days ahead": lambda: time.time() + 500 * DAY,
    "text": lambda: "yesterday",
    "bool": lambda: True,
}


@pytest.mark.parametrize("case", sorted(BAD_CREATION_TIMES))
def test_a_creation_time_that_is_no_time_is_a_malformed_session(
    store: Harness, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = store.make()
    created = BAD_CREATION_TIMES[case]()
    data = {"_permanent": True, CREATED_AT: created, "counter": 41, "_user_id": "ana"}
    store_id = _plant(app, PLANTED_SID, data)
    client = app.test_client()
    client.set_cookie(cookie_name(app), PLANTED_SID)
    with caplog.at_level(logging.WARNING, logger="pyloto_corp"):
        assert client.get("/session/counter").json == {"counter": 0}
        written = client.post("/session/counter")
    assert written.status_code == 200
    assert written.json == {"counter": 1}
    assert PLANTED_SID not in written.headers["Set-Cookie"]
    assert f"Ignored session {store_id} with a malformed creation time" in caplog.text
    assert PLANTED_SID not in caplog.text


def test_a_creation_time_within_the_range_still_times_out(store: Harness) -> None:
    """The range check does not replace the absolute timeout: 8 days old with a 7-day lifetime
    is past it (deleted), 6 days old is live."""
    app = store.make()
    old = _plant(app, "old-" + "o" * 40, {CREATED_AT: time.time() - 8 * DAY, "counter": 1})
    _plant(app, "recent-" + "r" * 40, {CREATED_AT: time.time() - 6 * DAY, "counter": 2})
    client = app.test_client()
    client.set_cookie(cookie_name(app), "old-" + "o" * 40)
    assert client.get("/session/counter").json == {"counter": 0}
    assert store.read_raw(app, old) is None
    client.set_cookie(cookie_name(app), "recent-" + "r" * 40)
    assert client.get("/session/counter").json == {"counter": 2}


def test_a_record_over_the_size_limit_is_no_session_and_no_500(
    store: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Planted, or stored before SESSION_MAX_BYTES was lowered: every request of that cookie
    gets a fresh session (it used to answer 500 on every write)."""
    app = store.make()
    SessionStore.state(app).interface.records.max_bytes = 4096
    data = {CREATED_AT: int(time.time()), "counter": 7, "blob": "x" * 20_000}
    store_id = _plant(app, PLANTED_SID, data)
    client = app.test_client()
    client.set_cookie(cookie_name(app), PLANTED_SID)
    with caplog.at_level(logging.WARNING, logger="pyloto_corp"):
        assert client.get("/session/counter").json == {"counter": 0}
        for expected in (1, 2):  # the new session's writes succeed, request after request
            written = client.post("/session/counter")
            assert written.status_code == 200
            assert written.json == {"counter": expected}
    assert "over SESSION_MAX_BYTES" in caplog.text
    assert store_id in caplog.text
    assert PLANTED_SID not in caplog.text


def test_a_malformed_record_is_no_session_and_no_500(
    store: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    app = store.make()
    interface = SessionStore.state(app).interface
    store_id = interface.store_id(PLANTED_SID)
    store.write_raw(app, store_id, RECORD_MARKER + b"\x00\x00\x00\x09ab")  # truncated framing
    client = app.test_client()
    client.set_cookie(cookie_name(app), PLANTED_SID)
    with caplog.at_level(logging.WARNING, logger="pyloto_corp"):
        assert client.get("/session/counter").json == {"counter": 0}
        assert client.post("/session/counter").status_code == 200
    assert "Discarded undecodable session data" in caplog.text


@pytest.mark.parametrize("case", ["nan", "500 days ago", "text"])
def test_one_bad_record_never_aborts_a_listing_or_a_revoke(store: Harness, case: str) -> None:
    app = user_routes(store.make())
    clients = []
    for _ in range(3):
        client = app.test_client()
        assert client.post("/as/ana").status_code == 200
        clients.append(client)
    interface = SessionStore.state(app).interface
    bad = {CREATED_AT: BAD_CREATION_TIMES[case](), "_user_id": "ana"}
    planted = _plant(app, PLANTED_SID, bad)
    # In the index too, as if it had logged in through the app.
    interface.records.index(planted, "ana")
    with app.app_context():
        # Redis lists from the index alone (never a session's data): the planted entry shows
        # there, and goes with the revoke like the others.
        assert len(user_sessions("ana")) == (4 if store.name == "redis" else 3)
        assert revoke_user_sessions("ana") >= 3
        assert user_sessions("ana") == []
    for client in clients:
        assert client.get("/whoami").json == {"user": None}


# -- the size limit counts what the record takes stored; the write script checks it first --------


def _framed_over_payload_under(limit: int) -> dict[str, bytes]:
    """Fields whose keys and values fit ``limit`` but whose stored record does not."""
    fields: dict[str, bytes] = {}
    n = 0
    while True:
        key = f"k{n:04d}"
        candidate = {**fields, key: codec.pack_value(key, n)}
        payload = sum(len(k) + len(v) for k, v in candidate.items())
        if payload > limit:
            return fields
        fields = candidate
        n += 1


def test_the_framing_counts_toward_the_limit(store: Harness) -> None:
    app = store.make()
    interface = SessionStore.state(app).interface
    interface.records.max_bytes = 4096
    fields = _framed_over_payload_under(4096)
    assert record_size(fields) > 4096
    keys = list(fields)

    @app.post("/fill")
    def fill() -> dict[str, bool]:
        for key in keys:
            session[key] = int(key[1:])
        return {"ok": True}

    client = app.test_client()
    client.post("/session/counter")
    response = client.post("/fill", headers={"Accept": "application/json"})
    assert response.status_code == 500
    assert response.json is not None
    assert response.json["error"] == "session_too_large"


def test_a_record_of_the_previous_release_at_the_old_limit_is_still_read(
    store: Harness,
) -> None:
    """The previous release counted keys and values only: a record it stored at its limit is
    over the new count by its framing, and is read all the same (a deploy logs no one out)."""
    app = store.make()
    interface = SessionStore.state(app).interface
    interface.records.max_bytes = 4096
    fields = _framed_over_payload_under(4096 - 40)
    data = {key: int(key[1:]) for key in fields}
    data[CREATED_AT] = int(time.time())
    data["counter"] = 5
    assert sum(len(k) + len(codec.pack_value(k, v)) for k, v in data.items()) <= 4096
    _plant(app, PLANTED_SID, data)
    client = app.test_client()
    client.set_cookie(cookie_name(app), PLANTED_SID)
    assert client.get("/session/counter").json == {"counter": 5}


@pytest.mark.parametrize("name", ["redis", "redis_cluster"])
def test_the_write_script_refuses_an_oversized_record_before_parsing_it(
    name: str, make_app: MakeApp, request: pytest.FixtureRequest
) -> None:
    """A 24 MB record planted between a request's read and its write: the merge is refused by
    the record's length, without Redis parsing it (which blocked the server 1.3-2.5 s)."""
    harness = HARNESSES[name](make_app, request)
    app = harness.make()
    interface = SessionStore.state(app).interface
    assert isinstance(interface.records, redis_store.RedisRecords)
    client: Any = interface.records.client
    store_id = _plant(app, PLANTED_SID, {CREATED_AT: int(time.time()), "counter": 1})
    stored = interface.records.read(store_id, timedelta(hours=1))
    assert stored is not None
    # 24 MB of many small fields: the most expensive shape for the script to take apart.
    field = struct_field("k", b"\xa1x")
    client.set(store_id, RECORD_MARKER + field * (24_000_000 // len(field)), ex=600)
    changes = Changes(set={"counter": codec.pack_value("counter", 2)}, delete=(), whole=False)
    started = time.perf_counter()
    with pytest.raises(SessionTooLarge, match="accepts at most"):
        interface.records.update(store_id, changes, timedelta(hours=1), stored)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.25, f"the write script took {elapsed:.2f} s on a 24 MB record"
    assert client.strlen(store_id) > 23_000_000  # left as it was


def struct_field(name: str, value: bytes) -> bytes:
    encoded = name.encode()
    return len(encoded).to_bytes(4, "big") + encoded + len(value).to_bytes(4, "big") + value


def test_the_write_script_counts_the_framing(
    redis_client: redis.Redis, make_app: MakeApp, redis_env: dict[str, str]
) -> None:
    """What the script stores is at most SESSION_MAX_BYTES long, byte for byte."""
    app = make_app(**redis_env, SESSION_MAX_BYTES="1024")
    interface = SessionStore.state(app).interface
    fields: dict[str, bytes] = {}
    n = 0
    while record_size({**fields, f"k{n:03d}": codec.pack_value("k", n)}) <= 1024:
        fields[f"k{n:03d}"] = codec.pack_value("k", n)
        n += 1
    assert interface.records.create("session:exact", fields, timedelta(minutes=1))
    assert redis_client.strlen("session:exact") == record_size(fields) <= 1024
    more = Changes(set={f"k{n:03d}": codec.pack_value("k", n)}, delete=(), whole=False)
    stored = interface.records.read("session:exact", timedelta(minutes=1))
    assert stored is not None
    with pytest.raises(SessionTooLarge, match="accepts at most 1,024"):
        interface.records.update("session:exact", more, timedelta(minutes=1), stored)
