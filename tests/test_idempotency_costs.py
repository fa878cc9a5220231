"""What idempotency costs per step, pinned on the real services: the numbers the README and
`make bench` state. Redis round trips as tests/redis_commands.py counts them (the commands our
scripts run inside Redis are not round trips); Firestore document operations as
tests/firestore_operations.py counts them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from flask import Flask

from tests.conftest import MakeApp
from tests.idempotency_operations import firestore_operations, redis_round_trips, total
from tests.redis_nodes import app_and_nodes
from tests.session_store.conftest import HARNESSES


@pytest.fixture(params=("redis", "redis_cluster"))
def on_redis(
    request: pytest.FixtureRequest, make_app: MakeApp
) -> Iterator[tuple[Flask, list[redis.Redis]]]:
    yield from app_and_nodes(request, make_app)


def test_round_trips_per_step_on_redis(on_redis: tuple[Flask, list[redis.Redis]]) -> None:
    """A claim takes its lease with the load (or finds the completed record, leasing nothing)
    in one script call; a completion stores the result and releases in one more; a release is
    one. An @idempotent view's first request is a claim and a completion, a repeat one read."""
    app, nodes = on_redis
    sent = redis_round_trips(app, nodes)
    assert sent == {
        "claim": {"evalsha": 1},
        "complete": {"evalsha": 1},
        "replay": {"evalsha": 1},
        "claim, held elsewhere": {"evalsha": 1},
        "claim, left without complete": {"evalsha": 2},
        "view, first request": {"evalsha": 2},
        "view, replay": {"evalsha": 1},
    }
    assert total(sent) == {
        "claim": 1,
        "complete": 1,
        "replay": 1,
        "claim, held elsewhere": 1,
        "claim, left without complete": 2,
        "view, first request": 2,
        "view, replay": 1,
    }


def test_document_operations_per_step_on_firestore(
    make_app: MakeApp, request: pytest.FixtureRequest
) -> None:
    """A claim of a new id reads the document and creates it on condition it is absent; a
    completion reads it and writes on condition nobody wrote it since; a replay, and a claim
    held elsewhere, read it only."""
    app = HARNESSES["firestore"](make_app, request).make()
    assert firestore_operations(app) == {
        "claim": {"get": 1, "create": 1},
        "complete": {"get": 1, "update": 1},
        "replay": {"get": 1},
        "claim, held elsewhere": {"get": 1},
        "claim, left without complete": {"get": 2, "create": 1, "delete": 1},
        "view, first request": {"get": 2, "create": 1, "update": 1},
        "view, replay": {"get": 1},
    }
