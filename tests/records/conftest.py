"""A record store on each backend's real service: the session harnesses' apps, their store."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from flask import Flask

from pyloto_corp.records.base import RecordStore
from pyloto_corp.session_store import SessionStore
from tests.conftest import MakeApp
from tests.session_store.conftest import HARNESSES

#: The backends the record layer runs on (the TLS cluster is the cluster's transport, tested
#: by the session suite).
BACKENDS = ("firestore", "memory", "redis", "redis_cluster", "valkey")


@dataclass
class Stored:
    name: str
    app: Flask
    store: RecordStore


@pytest.fixture(params=BACKENDS)
def stored(request: pytest.FixtureRequest, make_app: MakeApp) -> Stored:
    harness = HARNESSES[request.param](make_app, request)
    app = harness.make()
    return Stored(request.param, app, SessionStore.state(app).interface.records)
