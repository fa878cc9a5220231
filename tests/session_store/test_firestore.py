"""Firestore backend specifics, against the real emulator."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask, session
from flask.testing import FlaskClient
from google.cloud import firestore

from pyloto_corp.records import codec
from pyloto_corp.records.base import handle_of
from pyloto_corp.records.firestore import FirestoreRecords
from pyloto_corp.session_store import (
    revoke_session,
    revoke_user_sessions,
    user_sessions,
)
from pyloto_corp.session_store.base import hashed_store_id
from tests.conftest import DEPLOYED_COOKIE, MakeApp, cookie_name
from tests.firestore_operations import counting_document_operations
from tests.services import free_port
from tests.session_store.conftest import user_routes


@pytest.fixture
def app(make_app: MakeApp, firestore_env: dict[str, str]) -> Flask:
    # Anonymous sessions too get the full hour here (tests/session_store/test_anonymous.py
    # covers the shorter timeout of sessions without a user).
    return make_app(
        **firestore_env,
        SESSION_LIFETIME="1h",
        SESSION_ANONYMOUS_LIFETIME="1h",
        FIRESTORE_REFRESH_INTERVAL="5m",
    )


@pytest.fixture
def sessions(firestore_client: firestore.Client) -> firestore.CollectionReference:
    return firestore_client.collection("sessions")


def _sid(header: str) -> str:
    assert header.startswith(f"{DEPLOYED_COOKIE}="), header
    return header.split(";", 1)[0].split("=", 1)[1]


def _sid_of(client: FlaskClient) -> str:
    cookie = client.get_cookie(DEPLOYED_COOKIE)
    assert cookie is not None
    return cookie.value


def _doc(sessions: firestore.CollectionReference, sid: str) -> dict[str, Any] | None:
    return sessions.document(hashed_store_id("session:", sid)).get().to_dict()


@pytest.fixture
def operations() -> Iterator[Counter[str]]:
    """Counts document operations; the calls still go to the real emulator."""
    with counting_document_operations() as counts:
        yield counts


def test_client_is_created_on_first_use(app: Flask) -> None:
    interface = app.session_interface
    assert isinstance(interface.records, FirestoreRecords)
    assert interface.records._client is None
    app.test_client().post("/session/counter")
    assert interface.records._client is not None


def test_document_fields(app: Flask, sessions: firestore.CollectionReference) -> None:
    before = datetime.now(UTC)
    sid = _sid(app.test_client().post("/session/counter").headers["Set-Cookie"])
    document = _doc(sessions, sid)
    assert document is not None
    assert set(document) == {"fields", "expires_at", "updated_at"}
    # One map entry per session key, each its encoded value (_host: under a __Host- cookie).
    assert set(document["fields"]) == {"_created_at", "_host", "counter"}
    assert codec.unpack_value(document["fields"]["counter"]) == 1
    expected = before + timedelta(hours=1)
    assert timedelta(0) <= document["expires_at"] - expected < timedelta(seconds=5)
    assert document["updated_at"] >= before - timedelta(seconds=1)


def test_operations_per_request(app: Flask, operations: Counter[str]) -> None:
    client = app.test_client()
    client.get("/session/counter")
    assert operations == Counter()
    client.post("/session/counter")
    assert operations == Counter(create=1)
    operations.clear()
    client.get("/session/counter")
    assert operations == Counter(get=1)  # fresh expiry: no write
    operations.clear()
    client.post("/session/counter")
    assert operations == Counter(get=1, update=1)


def test_stale_expiry_is_refreshed_once(
    app: Flask, sessions: firestore.CollectionReference, operations: Counter[str]
) -> None:
    client = app.test_client()
    sid = _sid(client.post("/session/counter").headers["Set-Cookie"])
    reference = sessions.document(hashed_store_id("session:", sid))
    stale = datetime.now(UTC) + timedelta(minutes=50)  # 10 min old: past the 5 min interval
    reference.update({"expires_at": stale})
    operations.clear()
    client.get("/session/counter")
    assert operations == Counter(get=1, update=1)
    refreshed = reference.get().get("expires_at")
    assert refreshed > datetime.now(UTC) + timedelta(minutes=59)
    operations.clear()
    client.get("/session/counter")
    assert operations == Counter(get=1)


def test_expired_document_is_treated_as_absent(
    app: Flask, sessions: firestore.CollectionReference
) -> None:
    client = app.test_client()
    sid = _sid(client.post("/session/counter").headers["Set-Cookie"])
    past = datetime.now(UTC) - timedelta(seconds=1)
    sessions.document(hashed_store_id("session:", sid)).update({"expires_at": past})
    assert client.get("/session/counter").json == {"counter": 0}
    response = client.post("/session/counter")
    assert response.json == {"counter": 1}
    assert _sid(response.headers["Set-Cookie"]) != sid


def test_permanent_and_browser_sessions(
    app: Flask, sessions: firestore.CollectionReference
) -> None:
    @app.post("/permanent-session")
    def permanent_session() -> dict[str, bool]:
        session.permanent = True
        session["counter"] = 1
        return {"ok": True}

    permanent = app.test_client().post("/permanent-session").headers["Set-Cookie"]
    browser = app.test_client().post("/session/counter").headers["Set-Cookie"]
    assert "Expires=" in permanent
    assert "Expires=" not in browser
    for header in (permanent, browser):
        document = _doc(sessions, _sid(header))
        assert document is not None
        assert document["expires_at"] > datetime.now(UTC)


@pytest.mark.parametrize(
    "fields",
    [
        {"data": "not bytes", "expires_at": datetime(2999, 1, 1, tzinfo=UTC)},
        {"data": b"\x81\xa7counter\x05", "expires_at": "tomorrow"},
        {"something": "else"},
        {"fields": "not a map", "expires_at": datetime(2999, 1, 1, tzinfo=UTC)},
        {"fields": {"counter": "not bytes"}, "expires_at": datetime(2999, 1, 1, tzinfo=UTC)},
    ],
)
def test_malformed_documents_give_a_fresh_session(
    app: Flask, sessions: firestore.CollectionReference, fields: dict[str, Any]
) -> None:
    client = app.test_client()
    sid = _sid(client.post("/session/counter").headers["Set-Cookie"])
    sessions.document(hashed_store_id("session:", sid)).set(fields)
    assert client.get("/session/counter").json == {"counter": 0}


def test_firestore_document_limit_applies_whatever_session_max_bytes(
    make_app: MakeApp, firestore_env: dict[str, str], sessions: firestore.CollectionReference
) -> None:
    app = make_app(**firestore_env, SESSION_MAX_BYTES=str(8 * 1024 * 1024))

    @app.post("/big")
    def big() -> dict[str, bool]:
        session["blob"] = "x" * 1_100_000
        return {"ok": True}

    client = app.test_client()
    sid = _sid(client.post("/session/counter").headers["Set-Cookie"])
    response = client.post("/big", headers={"Accept": "application/json"})
    assert response.status_code == 500
    assert response.json is not None
    assert response.json["error"] == "session_too_large"
    assert "1,044,480" not in response.json["message"]
    assert client.get("/session/counter").json == {"counter": 1}
    assert _doc(sessions, sid) is not None


def test_cleanup_removes_only_expired_documents(
    app: Flask, sessions: firestore.CollectionReference
) -> None:
    now = datetime.now(UTC)
    for index in range(7):
        sessions.document(f"session:old{index}").set(
            {"data": b"\x80", "expires_at": now - timedelta(minutes=index + 1)}
        )
    live = _sid(app.test_client().post("/session/counter").headers["Set-Cookie"])
    interface = app.session_interface
    assert isinstance(interface.records, FirestoreRecords)
    assert interface.records.delete_expired(batch_size=3) == 7
    remaining = [snapshot.id for snapshot in sessions.stream()]
    assert remaining == [hashed_store_id("session:", live)]


def test_a_second_instance_reads_the_session(
    make_app: MakeApp, firestore_env: dict[str, str]
) -> None:
    first, second = make_app(**firestore_env), make_app(**firestore_env)
    client = first.test_client()
    sid = _sid(client.post("/session/counter").headers["Set-Cookie"])
    other = second.test_client()
    other.set_cookie(cookie_name(second), sid)
    assert other.get("/session/counter").json == {"counter": 1}


def test_unreachable_firestore_answers_503_fast_and_logs_once(
    make_app: MakeApp,
    firestore_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    app = make_app(**firestore_env, FIRESTORE_TIMEOUT="1")
    client = app.test_client()
    client.set_cookie(cookie_name(app), "some-session-id")
    started = time.monotonic()
    response = client.get("/session/counter", headers={"Accept": "application/json"})
    assert time.monotonic() - started < 3
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.json == {
        "error": "session_store_unavailable",
        "message": "The session store is unavailable; please retry shortly.",
    }
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert (
        "Firestore session store (database '(default)', collection 'sessions') failed"
        in errors[0].getMessage()
    )
    assert "some-session-id" not in caplog.text
    readiness = app.test_client().get("/readyz")
    assert readiness.status_code == 503
    assert readiness.json is not None
    assert readiness.json["status"] == "unavailable"


def test_a_blob_written_by_the_previous_release_mid_request_never_wipes_the_session(
    app: Flask, sessions: firestore.CollectionReference
) -> None:
    """A rolling deploy: an instance of the previous release writes its whole blob to ``data``
    while a request of this release merges into ``fields``: the merge lands on ``fields``, the
    session keeps every key (the previous release's change is the one lost)."""
    from pyloto_corp.records.firestore import FIELDS

    @app.post("/late")
    def late() -> dict[str, bool]:
        session["late"] = True
        key = hashed_store_id("session:", session.sid)  # type: ignore[attr-defined]
        sessions.document(key).update({"data": b"\x81\xa7counter\x07"})
        return {"ok": True}

    client = app.test_client()
    sid = _sid(client.post("/session/counter").headers["Set-Cookie"])
    assert client.post("/late").status_code == 200
    document = _doc(sessions, sid)
    assert document is not None
    assert set(document[FIELDS]) == {"_created_at", "_host", "counter", "late"}
    assert client.get("/session/counter").json == {"counter": 1}


def test_a_session_key_too_long_for_firestore_is_refused_at_write(
    app: Flask, sessions: firestore.CollectionReference
) -> None:
    @app.post("/long")
    def long_key() -> dict[str, bool]:
        session["k" * 1200] = 1
        return {"ok": True}

    client = app.test_client()
    client.post("/session/counter")
    response = client.post("/long", headers={"Accept": "application/json"})
    assert response.status_code == 500
    assert response.json is not None
    assert response.json["error"] == "session_unstorable"
    assert "firestore" not in response.json["message"]
    assert client.get("/session/counter").json == {"counter": 1}


@pytest.mark.parametrize(
    ("prefix_a", "prefix_b"), [("svc-a:", "svc-b:"), ("session:", "session:b:")]
)
def test_services_sharing_a_collection_list_and_revoke_only_their_own_sessions(
    make_app: MakeApp,
    firestore_env: dict[str, str],
    sessions: firestore.CollectionReference,
    prefix_a: str,
    prefix_b: str,
) -> None:
    """Two services on one collection, the same user signed in on both: B lists and ends only
    B's sessions, including documents the previous release wrote (no field beyond ``user``).
    ``session:`` begins ``session:b:``: a prefix alone does not tell them apart."""
    service_a = user_routes(make_app(**firestore_env, SESSION_KEY_PREFIX=prefix_a))
    service_b = user_routes(make_app(**firestore_env, SESSION_KEY_PREFIX=prefix_b))
    on_a, on_b = service_a.test_client(), [service_b.test_client() for _ in range(2)]
    on_a.post("/as/ana")
    for client in on_b:
        client.post("/as/ana")
    # Documents as the previous release wrote them, one per service.
    old = {"_permanent": True, "_created_at": time.time() - 60, "_user_id": "ana"}
    packed = {key: codec.pack_value(key, value) for key, value in old.items()}
    expires_at = datetime.now(UTC) + timedelta(hours=1)
    for prefix, sid in ((prefix_a, "old-a"), (prefix_b, "old-b")):
        sessions.document(hashed_store_id(prefix, sid)).set(
            {"fields": packed, "expires_at": expires_at, "updated_at": expires_at, "user": "ana"}
        )
    old_a = service_a.test_client()
    old_a.set_cookie(cookie_name(service_a), "old-a")

    def handles(store_ids: list[str]) -> set[str]:
        return {handle_of(store_id) for store_id in store_ids}

    ids_a = [hashed_store_id(prefix_a, sid) for sid in (_sid_of(on_a), "old-a")]
    ids_b = [hashed_store_id(prefix_b, sid) for sid in [*map(_sid_of, on_b), "old-b"]]
    with service_a.app_context():
        assert {item.handle for item in user_sessions("ana")} == handles(ids_a)
    with service_b.app_context():
        assert {item.handle for item in user_sessions("ana")} == handles(ids_b)
        assert not revoke_session("ana", handle_of(ids_a[0]))  # A's session: not B's to end
        assert revoke_user_sessions("ana") == 3
        assert user_sessions("ana") == []
    for client in on_b:
        assert client.get("/whoami").json == {"user": None}
    assert on_a.get("/whoami").json == {"user": "ana"}
    assert old_a.get("/whoami").json == {"user": "ana"}
    with service_a.app_context():
        assert {item.handle for item in user_sessions("ana")} == handles(ids_a)
    assert all(sessions.document(store_id).get().exists for store_id in ids_a)


def test_a_login_marker_of_the_previous_release_is_still_honoured(
    app: Flask, sessions: firestore.CollectionReference
) -> None:
    """The previous release wrote the marker without ``retired_until`` (its ``expires_at`` was
    the only clock): a request carrying that id still gets a 409, not a fresh session."""
    marker = hashed_store_id("session:", "pre-login-id") + "~retired"
    sessions.document(marker).set(
        {"expires_at": datetime.now(UTC) + timedelta(minutes=2), "retired_to": None}
    )
    client = app.test_client()
    client.set_cookie(cookie_name(app), "pre-login-id")
    response = client.post("/session/counter", headers={"Accept": "application/json"})
    assert response.status_code == 409
    assert "Set-Cookie" not in response.headers
    sessions.document(marker).update({"expires_at": datetime.now(UTC) - timedelta(seconds=1)})
    assert client.post("/session/counter").json == {"counter": 1}
