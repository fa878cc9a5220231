"""An app on redis-server or on the 3-primary Redis Cluster, with a client of each node: what
the round-trip counting tests (keyed state, idempotency) run on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from flask import Flask

from tests.conftest import MakeApp
from tests.session_store.conftest import HARNESSES


def app_and_nodes(
    request: pytest.FixtureRequest, make_app: MakeApp
) -> Iterator[tuple[Flask, list[redis.Redis]]]:
    """For a fixture parametrized over ``("redis", "redis_cluster")``."""
    app = HARNESSES[request.param](make_app, request).make()
    if request.param == "redis":
        yield app, [request.getfixturevalue("redis_client")]
        return
    ports = request.getfixturevalue("redis_cluster").ports
    nodes = [redis.Redis(port=port, socket_timeout=5) for port in ports]
    yield app, nodes
    for node in nodes:
        node.close()
