"""Apps freeze the clock in their own test suites (freezegun): sessions keep working on every
backend, and on Firestore the stored expiry stays on the real clock (the one a TTL policy and
every other process use), as Redis's server-side expiry does."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from flask import Flask, session
from freezegun import freeze_time
from google.cloud import firestore
from werkzeug.test import TestResponse

from pyloto_corp.session_store.base import hashed_store_id
from tests.conftest import MakeApp, cookie_name
from tests.services import free_port

PAST = "2020-01-01 12:00:00"
FUTURE = "2040-06-01 12:00:00"
JSON = {"Accept": "application/json"}


def _with_stamp(app: Flask) -> Flask:
    """A view storing a datetime taken under the frozen clock (freezegun's FakeDatetime)."""

    @app.post("/stamp")
    def stamp() -> dict[str, str]:
        session["stamp"] = datetime.now(UTC)
        return {"stamp": session["stamp"].isoformat()}

    @app.get("/stamp")
    def read_stamp() -> dict[str, str | None]:
        value = session.get("stamp")
        return {"stamp": value.isoformat() if isinstance(value, datetime) else None}

    return app


@pytest.fixture(params=["memory", "redis", "firestore"])
def any_app(request: pytest.FixtureRequest, make_app: MakeApp) -> Flask:
    if request.param == "memory":
        return _with_stamp(make_app(ENV="test"))
    environ = request.getfixturevalue(f"{request.param}_env")
    return _with_stamp(make_app(**environ))


@pytest.fixture(params=["redis", "firestore"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("tick", [False, True], ids=["frozen", "ticking"])
@pytest.mark.parametrize("when", [PAST, "now"])
def test_a_session_is_written_and_read_under_a_frozen_clock(
    any_app: Flask, when: str, tick: bool
) -> None:
    moment = datetime.now(UTC) if when == "now" else when
    with freeze_time(moment, tick=tick):
        client = any_app.test_client()
        assert client.post("/session/counter", headers=JSON).json == {"counter": 1}
        assert client.post("/session/counter", headers=JSON).json == {"counter": 2}
        stamped = client.post("/stamp", headers=JSON)
        assert stamped.status_code == 200, stamped.get_data(as_text=True)
        assert client.get("/session/counter").json == {"counter": 2}
        assert client.get("/stamp").json == stamped.json


@pytest.mark.parametrize("when", [PAST, FUTURE])
def test_the_id_a_login_left_behind_still_refuses_changes_under_a_frozen_clock(
    any_app: Flask, when: str
) -> None:
    """A request still carrying the pre-login id (an XHR in flight) gets a 409, not a fresh
    session: the marker the login left lives for its linger on every backend."""
    with freeze_time(when):
        client = any_app.test_client()
        client.post("/session/counter")
        cookie = client.get_cookie(cookie_name(any_app))
        assert cookie is not None
        assert client.post("/session/login", json={"user": "ana"}).status_code == 200
        late = any_app.test_client()
        late.set_cookie(cookie_name(any_app), cookie.value)
        response = late.post("/session/counter", headers=JSON)
        assert response.status_code == 409, response.get_data(as_text=True)
        assert client.get("/session/counter").json == {"counter": 1}


@pytest.fixture
def warm_env(firestore_env: dict[str, str], firestore_client: firestore.Client) -> dict[str, str]:
    """The emulator's first answers can take over a second: one read first, for the tests that
    run on a short FIRESTORE_TIMEOUT."""
    firestore_client.collection("sessions").document("warm-up").get()
    return firestore_env


def test_a_frozen_clock_outlasting_the_store_timeout(
    make_app: MakeApp, warm_env: dict[str, str]
) -> None:
    """A test that freezes "now" and runs longer than FIRESTORE_TIMEOUT: the frozen clock falls
    behind the real one (gRPC computes its deadlines from ``time.time()``)."""
    app = make_app(**warm_env, FIRESTORE_TIMEOUT="2")
    with freeze_time(datetime.now(UTC)):
        client = app.test_client()
        assert client.post("/session/counter", headers=JSON).json == {"counter": 1}
        time.sleep(2.5)
        response = client.post("/session/counter", headers=JSON)
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.json == {"counter": 2}


@pytest.mark.parametrize("when", [PAST, FUTURE])
def test_idle_expiry_follows_the_store_clock_and_the_absolute_timeout_the_app_clock(
    make_app: MakeApp, request: pytest.FixtureRequest, backend: str, when: str
) -> None:
    """Moving a frozen clock past SESSION_LIFETIME does not expire a session on Redis or
    Firestore (idle expiry runs on the store's real clock, as a TTL); moving it past
    SESSION_ABSOLUTE_LIFETIME does (that timeout is measured with the app's clock)."""
    environ = request.getfixturevalue(f"{backend}_env")
    app = make_app(**environ, SESSION_LIFETIME="1h", SESSION_ABSOLUTE_LIFETIME="3h")
    with freeze_time(when) as frozen:
        client = app.test_client()
        client.post("/session/counter")
        frozen.tick(timedelta(hours=2))
        assert client.post("/session/counter").json == {"counter": 2}
        frozen.tick(timedelta(hours=2))
        assert client.get("/session/counter").json == {"counter": 0}


@pytest.mark.parametrize("when", [PAST, FUTURE])
def test_firestore_stores_the_real_expiry_under_a_frozen_clock(
    make_app: MakeApp, firestore_env: dict[str, str], firestore_client: firestore.Client, when: str
) -> None:
    """``expires_at`` is what Firestore's TTL policy deletes on: a 2020 expiry written by a
    frozen test would be deleted at once, a 2040 one never."""
    app = make_app(**firestore_env, SESSION_LIFETIME="1h", SESSION_ANONYMOUS_LIFETIME="1h")
    with freeze_time(when):
        header = app.test_client().post("/session/counter").headers["Set-Cookie"]
    sid = header.split(";", 1)[0].split("=", 1)[1]
    document = (
        firestore_client.collection("sessions")
        .document(hashed_store_id("session:", sid))
        .get()
        .to_dict()
    )
    assert document is not None
    expected = datetime.now(UTC) + timedelta(hours=1)
    assert abs(document["expires_at"] - expected) < timedelta(seconds=30)
    assert abs(document["updated_at"] - datetime.now(UTC)) < timedelta(seconds=30)


@pytest.mark.parametrize("when", [PAST, FUTURE, "now"])
def test_unreachable_firestore_under_a_frozen_clock_answers_503_within_the_timeout(
    make_app: MakeApp,
    firestore_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    """Retries of transient errors stop at FIRESTORE_TIMEOUT of real time (the retry budget of
    google-api-core, measured with a frozen ``time.monotonic()``, would never run out)."""
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    app = make_app(**firestore_env, FIRESTORE_TIMEOUT="1")
    client = app.test_client()
    client.set_cookie(cookie_name(app), "some-session-id")
    moment = datetime.now(UTC) if when == "now" else when
    responses: list[TestResponse] = []

    def get() -> None:
        with freeze_time(moment):
            responses.append(client.get("/session/counter", headers=JSON))

    # In a thread, so that a retry loop that never ends fails this test instead of hanging it.
    worker = threading.Thread(target=get, daemon=True)
    started = time.perf_counter()
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the request was still retrying after 10 s"
    assert time.perf_counter() - started < 3
    assert [response.status_code for response in responses] == [503]


@pytest.mark.parametrize("when", [PAST, FUTURE])
def test_an_app_that_makes_freezegun_ignore_the_google_modules_still_works(
    make_app: MakeApp, warm_env: dict[str, str], when: str
) -> None:
    """Some apps already exclude the Google client from freezegun: gRPC then sees the real
    clock while this package sees the frozen one."""
    app = make_app(**warm_env, FIRESTORE_TIMEOUT="2")
    with freeze_time(when, ignore=["grpc", "google"]):
        client = app.test_client()
        assert client.post("/session/counter", headers=JSON).json == {"counter": 1}
        assert client.post("/session/counter", headers=JSON).json == {"counter": 2}
