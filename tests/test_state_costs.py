"""What KeyedState costs per operation, pinned on the real services: the numbers the README
and `make bench` state. Redis round trips as tests/redis_commands.py counts them (one per
command the client sends; the commands KeyedState's scripts run inside Redis are not round
trips); Firestore document operations as tests/firestore_operations.py counts them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from flask import Flask

from tests.conftest import MakeApp
from tests.firestore_operations import counting_document_operations
from tests.redis_nodes import app_and_nodes
from tests.session_store.conftest import HARNESSES
from tests.state_operations import ID, costs, firestore_operations, redis_round_trips, total


@pytest.fixture(params=("redis", "redis_cluster"))
def on_redis(
    request: pytest.FixtureRequest, make_app: MakeApp
) -> Iterator[tuple[Flask, list[redis.Redis]]]:
    yield from app_and_nodes(request, make_app)


def test_round_trips_per_operation_on_redis(on_redis: tuple[Flask, list[redis.Redis]]) -> None:
    """A load is one GETEX (it slides the expiry), a change one script call; a turn takes its
    lease with the load and saves with the release: two round trips, changed or not."""
    app, nodes = on_redis
    sent = redis_round_trips(app, nodes)
    assert sent == {
        "open, new entry": {"getex": 1, "evalsha": 1},
        "open, a key changed": {"getex": 1, "evalsha": 1},
        "open, a key deleted": {"getex": 1, "evalsha": 1},
        "open, nothing changed": {"getex": 1},
        "get": {"getex": 1},
        "exists": {"evalsha": 1},
        "turn, a key changed": {"evalsha": 2},
        "turn, nothing changed": {"evalsha": 2},
        "delete": {"unlink": 1},
    }
    assert total(sent) == {
        "open, new entry": 2,
        "open, a key changed": 2,
        "open, a key deleted": 2,
        "open, nothing changed": 1,
        "get": 1,
        "exists": 1,
        "turn, a key changed": 2,
        "turn, nothing changed": 2,
        "delete": 1,
    }


def test_document_operations_per_operation_on_firestore(
    make_app: MakeApp, request: pytest.FixtureRequest
) -> None:
    """A load is one read; setting keys one write (Firestore merges the fields itself);
    deleting one reads again and writes on condition (it may empty the entry); a turn reads and
    writes on condition twice (take the lease, save and release)."""
    app = HARNESSES["firestore"](make_app, request).make()
    assert firestore_operations(app) == {
        "open, new entry": {"get": 1, "create": 1},
        "open, a key changed": {"get": 1, "set": 1},
        "open, a key deleted": {"get": 2, "update": 1},
        "open, nothing changed": {"get": 1},
        "get": {"get": 1},
        "exists": {"get": 1},
        "turn, a key changed": {"get": 2, "update": 2},
        "turn, nothing changed": {"get": 2, "update": 2},
        "delete": {"get": 1, "delete": 1},
    }


def test_a_firestore_load_writes_the_expiry_once_per_refresh_interval(
    make_app: MakeApp, firestore_env: dict[str, str]
) -> None:
    """A write per read would double the cost: a load slides the stored expiry only when it
    is a refresh interval stale."""
    app = make_app(**firestore_env, FIRESTORE_REFRESH_INTERVAL="1s")
    with app.app_context():
        with costs.open(ID) as state:
            state["step"] = "ask_cpf"
        time.sleep(1.1)
        with counting_document_operations() as operations:
            loads = [costs.get(ID) for _ in range(5)]
        assert loads == [{"step": "ask_cpf"}] * 5
        assert dict(operations) == {"get": 5, "update": 1}
