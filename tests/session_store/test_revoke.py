"""A revoke is final whatever happened to the user index (deleted, evicted, raced by logins),
and listing or revoking stays cheap however large the index grows."""

from __future__ import annotations

import contextlib
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from flask import Flask, session
from flask.testing import FlaskClient
from redis.connection import Connection

from pyloto_corp.config.settings import Settings
from pyloto_corp.records.redis.scripts import RECORD_MARKER
from pyloto_corp.records.redis.store import RedisRecords
from pyloto_corp.session_store import (
    SessionStore,
    revoke_user_sessions,
    rotate_session_id,
    user_sessions,
)
from pyloto_corp.session_store.base import CREATED_AT
from tests.conftest import MakeApp, cookie_name, redis_production_env
from tests.redis_commands import commands
from tests.services import RedisServer
from tests.session_store.conftest import HARNESSES, Harness, user_routes
from tests.stored import store_session


def _routes(app: Flask) -> Flask:
    user_routes(app)

    @app.post("/revoke-others/<user>")
    def revoke_others(user: str) -> dict[str, int]:
        return {"ended": revoke_user_sessions(user, keep_current=True)}

    @app.post("/revoke-others-and-rotate/<user>")
    def revoke_others_and_rotate(user: str) -> dict[str, int]:
        ended = revoke_user_sessions(user, keep_current=True)
        rotate_session_id()
        return {"ended": ended}

    return app


def _login(app: Flask, user: str) -> FlaskClient:
    client = app.test_client()
    assert client.post(f"/as/{user}").status_code == 200
    return client


def _user(client: FlaskClient) -> object:
    response = client.get("/whoami")
    assert response.status_code == 200
    assert response.json is not None
    return response.json["user"]


@pytest.fixture(params=["redis", "redis_cluster"])
def redis_store(request: pytest.FixtureRequest, make_app: MakeApp) -> Harness:
    return HARNESSES[request.param](make_app, request)


@pytest.fixture(params=["memory", "redis", "redis_cluster", "firestore"])
def any_store(request: pytest.FixtureRequest, make_app: MakeApp) -> Harness:
    return HARNESSES[request.param](make_app, request)


def _interface(app: Flask) -> Any:
    return SessionStore.state(app).interface


# -- final whatever happened to the index ---------------------------------------------------------


def test_a_revoke_ends_every_session_after_the_index_was_deleted(redis_store: Harness) -> None:
    """The index key deleted (or evicted: it is touched only at login, so LRU picks it first):
    the revoke finds nothing to delete, and every session still ends at its next request."""
    app = _routes(redis_store.make())
    clients = [_login(app, "ana") for _ in range(3)]
    bob = _login(app, "bob")
    interface = _interface(app)
    interface.records.client.delete(interface.records.index_key("ana"))
    with app.app_context():
        assert user_sessions("ana") == []
        revoke_user_sessions("ana")
    assert [_user(client) for client in clients] == [None, None, None]
    assert _user(bob) == "bob"
    # Logging in again after the revoke works, and is listed.
    again = _login(app, "ana")
    assert _user(again) == "ana"
    with app.app_context():
        assert len(user_sessions("ana")) == 1


def test_a_revoke_ends_sessions_in_other_processes_and_sessions_no_listing_finds(
    any_store: Harness,
) -> None:
    """Another instance (its own process memory) reads a session of a revoked user: ended.
    On Firestore a document without the ``user`` field (never found by the query), on memory
    and Redis a session missing from the index: ended too."""
    app = _routes(any_store.make())
    client = _login(app, "ana")
    sid = client.get_cookie(cookie_name(app))
    assert sid is not None
    interface = _interface(app)
    hidden_sid = "hidden-" + "h" * 40
    hidden = interface.store_id(hidden_sid)
    # Stored by a release before this one: no USER_SINCE, not in any index.
    store_session(app, hidden, {CREATED_AT: int(time.time()) - 60, "_user_id": "ana"})
    if any_store.name == "firestore":
        interface.records.client.collection("sessions").document(hidden).update({"user": None})
    with app.app_context():
        revoke_user_sessions("ana")
    other = _routes(any_store.make()) if any_store.name != "memory" else app
    for cookie in (sid.value, hidden_sid):
        reader = other.test_client()
        reader.set_cookie(cookie_name(app), cookie)
        assert _user(reader) is None


def test_keep_current_survives_its_own_revoke_everywhere(any_store: Harness) -> None:
    """The kept session is re-stamped before the mark is set: its next requests, here and in
    another instance, are still logged in, with or without an id rotation after the revoke."""
    for route in ("/revoke-others/ana", "/revoke-others-and-rotate/ana"):
        app = _routes(any_store.make())
        here = _login(app, "ana")
        there = _login(app, "ana")
        response = here.post(route)
        assert response.status_code == 200, response.data
        assert response.json == {"ended": 1}
        assert _user(here) == "ana"
        assert _user(there) is None
        sid = here.get_cookie(cookie_name(app))
        assert sid is not None
        elsewhere = (_routes(any_store.make()) if any_store.name != "memory" else app).test_client()
        elsewhere.set_cookie(cookie_name(app), sid.value)
        assert _user(elsewhere) == "ana"
        with app.app_context():
            assert len(user_sessions("ana")) == 1
            assert revoke_user_sessions("ana") == 1  # a later revoke ends it like any other
        assert _user(here) is None


def test_a_login_after_a_revoke_is_not_ended_by_it(any_store: Harness) -> None:
    app = _routes(any_store.make())
    before = _login(app, "ana")
    with app.app_context():
        assert revoke_user_sessions("ana") == 1
    after = _login(app, "ana")
    assert _user(before) is None
    assert _user(after) == "ana"


@pytest.mark.parametrize("store", ["redis", "redis_cluster"])
def test_no_session_escapes_a_revoke_racing_logins(
    store: str, make_app: MakeApp, request: pytest.FixtureRequest
) -> None:
    """3 threads log in again and again while another revokes 15 times: every session whose
    login had finished when a revoke began is ended, and every session still alive at the end
    is listed (the old revoke deleted the index after reading it, and a login landing in
    between escaped every later revoke, unlisted: 57 in such a run)."""
    harness = HARNESSES[store](make_app, request)
    app = _routes(harness.make())
    logins: list[tuple[float, FlaskClient]] = []  # (when the login finished, its client)
    revokes: list[float] = []  # when each revoke began
    stop = threading.Event()
    errors: list[BaseException] = []

    def log_in_again_and_again() -> None:
        try:
            for _ in range(200):  # bounded, stopped earlier by the revoker
                if stop.is_set():
                    return
                client = _login(app, "ana")
                logins.append((time.time(), client))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=log_in_again_and_again) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        with app.app_context():
            for _ in range(15):
                time.sleep(0.02)
                revokes.append(time.time())
                revoke_user_sessions("ana")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    last_revoke = revokes[-1]
    ended_logins = [client for finished, client in logins if finished < last_revoke]
    assert len(ended_logins) >= 15
    escaped = [client for client in ended_logins if _user(client) is not None]
    assert escaped == [], f"{len(escaped)} of {len(ended_logins)} sessions escaped the revokes"
    alive = [client for finished, client in logins if _user(client) == "ana"]
    with app.app_context():
        listed = user_sessions("ana")
        assert len(listed) == len(alive)
        assert revoke_user_sessions("ana") == len(alive)
    assert [client for client in alive if _user(client) is not None] == []


# -- cost ---------------------------------------------------------------------------------------


@contextmanager
def _counting_round_trips() -> Iterator[list[int]]:
    """Counts the writes redis-py makes to a socket: one per command sent alone, one per
    pipeline (per node on a cluster), each followed by reading its replies."""
    count = [0]
    original = Connection.send_packed_command

    def counted(self: Connection, *args: Any, **kwargs: Any) -> None:
        count[0] += 1
        original(self, *args, **kwargs)

    Connection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield count
    finally:
        Connection.send_packed_command = original  # type: ignore[method-assign]


def test_a_logged_in_read_costs_one_round_trip_with_the_mark(
    make_app: MakeApp, redis_env: dict[str, str], redis_client: redis.Redis
) -> None:
    """GETEX and the GET of the user's mark go in one pipeline once this process knows the
    session's user (from its login here, or its first read); a session without a user is one
    GETEX, as before."""
    app = _routes(make_app(**redis_env))
    client = _login(app, "ana")
    anonymous = app.test_client()
    anonymous.post("/session/counter")
    for who, expected in ((client, {"getex": 1, "get": 1}), (anonymous, {"getex": 1})):
        redis_client.config_resetstat()
        with _counting_round_trips() as sent:
            who.get("/whoami")
        assert commands(redis_client) == expected
        assert sent == [1]
    # Another process (a fresh app: nothing remembered): the first read learns the user.
    sid = client.get_cookie(cookie_name(app))
    assert sid is not None
    other_app = _routes(make_app(**redis_env))
    _interface(other_app).records.client.ping()  # its connection opened (and its handshake sent)
    other = other_app.test_client()
    other.set_cookie(cookie_name(app), sid.value)
    for expected_trips in (2, 1, 1):
        with _counting_round_trips() as sent:
            assert _user(other) == "ana"
        assert sent == [expected_trips]


def test_a_logged_in_read_on_a_cluster_sends_to_both_nodes_before_reading(
    make_app: MakeApp, request: pytest.FixtureRequest
) -> None:
    harness = HARNESSES["redis_cluster"](make_app, request)
    app = _routes(harness.make())
    interface = _interface(app)
    cluster = interface.records.client
    nodes = set()
    for _ in range(20):  # logins until one session and the mark sit on different nodes
        client = _login(app, "ana")
        sid = client.get_cookie(cookie_name(app))
        assert sid is not None
        nodes = {
            cluster.get_node_from_key(interface.store_id(sid.value)).name,
            cluster.get_node_from_key(interface.records.mark_key("ana")).name,
        }
        if len(nodes) == 2:
            break
    assert len(nodes) == 2
    client.get("/whoami")
    with _counting_round_trips() as sent:
        assert _user(client) == "ana"
    # One write to each node, in one pipeline.
    assert sent == [2]


def _populate(client: redis.Redis, index: str, count: int, value: bytes) -> list[str]:
    keys = [f"session:{n:064x}" for n in range(count)]
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for n, key in enumerate(keys):
        pipe.set(key, value, px=600_000)
        pipe.zadd(index, {key: now - n / 1000})
        if n % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    return keys


def test_listing_and_revoking_100k_sessions_stay_cheap(
    make_app: MakeApp, redis_env: dict[str, str], redis_client: redis.Redis
) -> None:
    """100k index entries, each a live 200-byte session. The old listing read every session
    whole (GET + PTTL each, one pipeline): 2.5 s of the worker's CPU and 11.8 s of wall time
    for 100k empty records on this (shared, loaded) machine. Now a page of 5,000 entries per
    step, their PTTLs from one script call; a revoke pops pages and unlinks them. Bounded by
    the worker's CPU time (what the listing costs the worker, whatever else the machine runs),
    plus a generous wall-clock bound."""
    app = make_app(**redis_env, SESSION_MAX_PER_USER="0")
    interface = _interface(app)
    assert isinstance(interface.records, RedisRecords)
    index = interface.records.index_key("bulk")
    keys = _populate(redis_client, index, 100_000, RECORD_MARKER + b"s" * 198)
    with app.app_context():
        cpu, wall = time.process_time(), time.perf_counter()
        listed = user_sessions("bulk")
        listing = (time.process_time() - cpu, time.perf_counter() - wall)
        cpu, wall = time.process_time(), time.perf_counter()
        ended = revoke_user_sessions("bulk")
        revoking = (time.process_time() - cpu, time.perf_counter() - wall)
    print(
        f"100k entries: listed in {listing[0]:.2f} s CPU ({listing[1]:.2f} s wall), "
        f"revoked in {revoking[0]:.2f} s CPU ({revoking[1]:.2f} s wall)"
    )
    assert len(listed) == 100_000
    assert ended == 100_000
    assert redis_client.exists(*keys[:1000]) == 0
    assert redis_client.zcard(index) == 0
    assert listing[0] < 1.5, f"listing 100k entries took {listing[0]:.2f} s of CPU"
    assert revoking[0] < 0.5, f"revoking 100k entries took {revoking[0]:.2f} s of CPU"
    assert listing[1] < 10
    assert revoking[1] < 10


def test_listing_and_revoking_never_read_a_sessions_data(
    make_app: MakeApp, redis_env: dict[str, str], redis_client: redis.Redis
) -> None:
    """300 sessions of 500 KB: the old listing pulled all 150 MB into the worker."""
    app = make_app(**redis_env)
    interface = _interface(app)
    index = interface.records.index_key("heavy")
    _populate(redis_client, index, 300, RECORD_MARKER + b"x" * 500_000)
    with app.app_context():
        tracemalloc.start()
        try:
            assert len(user_sessions("heavy")) == 300
            assert revoke_user_sessions("heavy") == 300
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    print(f"300 sessions of 500 KB: listing and revoking peaked at {peak / 1e6:.2f} MB")
    assert peak < 2_000_000, f"listing and revoking took {peak / 1e6:.1f} MB"


def test_sessions_beyond_the_cap_per_user_end_oldest_first(any_store: Harness) -> None:
    app = _routes(any_store.make())
    _interface(app).records.max_per_user = 3
    clients = [_login(app, "ana") for _ in range(5)]
    with app.app_context():
        listed = user_sessions("ana")
    assert len(listed) == 3
    assert [_user(client) for client in clients] == [None, None, "ana", "ana", "ana"]


def test_the_index_never_holds_more_than_the_cap(redis_store: Harness) -> None:
    app = _routes(redis_store.make())
    interface = _interface(app)
    interface.records.max_per_user = 2
    for _ in range(4):
        _login(app, "ana")
    assert interface.records.client.zcard(interface.records.index_key("ana")) == 2


def test_the_revocation_mark_expires_after_the_absolute_lifetime(redis_store: Harness) -> None:
    app = _routes(redis_store.make())
    interface = _interface(app)
    with app.app_context():
        revoke_user_sessions("ana")
    ttl = interface.records.client.ttl(interface.records.mark_key("ana"))
    absolute = interface.absolute_lifetime.total_seconds()
    assert absolute < ttl <= absolute + 86_400


@pytest.mark.parametrize(
    ("value", "problem"),
    [("0", False), ("1", False), ("1000000", False), ("-1", True), ("1000001", True)],
)
def test_session_max_per_user_is_validated(value: str, problem: bool) -> None:
    settings = Settings.from_env({"SESSION_MAX_PER_USER": value})
    problems = [p for p in settings.validate_session_store_config() if "MAX_PER_USER" in p]
    assert bool(problems) == problem
    if problem:
        assert problems == [
            "SESSION_MAX_PER_USER must be 0 (no cap) to 1000000 sessions per user (default 1000)."
        ]
        assert value not in problems[0]


def test_session_max_per_user_that_is_no_number_is_a_problem() -> None:
    settings = Settings.from_env({"SESSION_MAX_PER_USER": "lots"})
    assert any("SESSION_MAX_PER_USER" in p for p in settings.parse_problems)


def test_a_revoke_ends_every_session_after_redis_evicted_the_index(
    make_app: MakeApp, own_redis: RedisServer
) -> None:
    """Under maxmemory with volatile-lru, the index (touched only at login) is the first key
    evicted; the revoke then finds nothing to delete, and every session still ends."""
    app = _routes(make_app(**redis_production_env(own_redis.url)))

    @app.post("/pad")
    def pad() -> dict[str, bool]:
        session["pad"] = "x" * 20_000  # each session outweighs Redis's own memory noise
        return {"ok": True}

    clients = [_login(app, "ana") for _ in range(3)]
    for client in clients:
        assert client.post("/pad").status_code == 200
    store = own_redis.client()
    index = _interface(app).records.index_key("ana")
    store.set("filler", b"f" * 200_000)  # no expiry: never a candidate under volatile-lru
    time.sleep(2.1)  # Redis's LRU clock counts in seconds
    for client in clients:  # the sessions are used after the index was last written
        assert _user(client) == "ana"
    store.config_set("maxmemory-samples", 10)
    store.config_set("maxmemory-policy", "volatile-lru")
    limit = int(store.info("memory")["used_memory"])
    for _ in range(200):  # bounded: lower the limit until Redis has evicted the index
        limit -= 32
        store.config_set("maxmemory", limit)
        with contextlib.suppress(redis.OutOfMemoryError):
            store.set("probe", b"p")  # a write makes Redis evict down to the limit
        if not store.exists(index):
            break
    assert not store.exists(index), "Redis evicted other keys but never the index"
    store.config_set("maxmemory", 0)
    survivors = [client for client in clients if _user(client) == "ana"]
    assert survivors, "eviction took every session too: nothing left to revoke"
    with app.app_context():
        assert revoke_user_sessions("ana") == 0  # nothing the index could name
    assert [_user(client) for client in survivors] == [None] * len(survivors)
    store.close()
