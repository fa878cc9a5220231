"""Log out everywhere: list and revoke every session of a user, on every backend."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from flask import Flask, request, session

from pyloto_corp.cli import session_store_cli
from pyloto_corp.session_store import (
    SessionStore,
    revoke_session,
    revoke_user_sessions,
    user_sessions,
)
from tests.session_store.conftest import Harness, sid_of, user_routes


def _routes(app: Flask) -> Flask:
    user_routes(app)

    @app.post("/revoke/<user>")
    def revoke(user: str) -> dict[str, int]:
        return {"ended": revoke_user_sessions(user, keep_current=request.args.get("keep") == "1")}

    @app.post("/forget-me")
    def forget_me() -> dict[str, bool]:
        session.pop("_user_id")
        session["note"] = "still here"
        return {"ok": True}

    return app


def _login(app: Flask, user: str) -> tuple[object, str]:
    client = app.test_client()
    response = client.post(f"/as/{user}")
    assert response.status_code == 200
    return client, sid_of(response)


def test_three_sessions_of_one_user_are_listed_and_revoked_the_fourth_kept(
    backend: Harness,
) -> None:
    app = _routes(backend.make())
    before = datetime.now(UTC) - timedelta(seconds=2)
    anas = [_login(app, "ana") for _ in range(3)]
    bob, _ = _login(app, "bob")
    with app.app_context():
        listed = user_sessions("ana")
        assert len(listed) == 3
        assert len({item.handle for item in listed}) == 3
        for item in listed:
            assert before <= item.created_at <= item.last_seen <= datetime.now(UTC)
        secrets = {sid for _, sid in anas} | {backend.store_id(app, sid) for _, sid in anas}
        shown = repr(listed)
        assert not any(secret in shown for secret in secrets)
        assert revoke_user_sessions("ana") == 3
        assert user_sessions("ana") == []
        assert len(user_sessions("bob")) == 1
    for client, sid in anas:
        assert client.get("/whoami").json == {"user": None}  # type: ignore[attr-defined]
        assert backend.read_raw(app, backend.store_id(app, sid)) is None
    assert bob.get("/whoami").json == {"user": "bob"}  # type: ignore[attr-defined]


def test_a_request_running_during_the_revoke_cannot_bring_its_session_back(
    backend: Harness,
) -> None:
    app = _routes(backend.make())
    loaded, release = threading.Event(), threading.Event()

    @app.post("/slow")
    def slow() -> dict[str, bool]:
        session.get("_user_id")
        loaded.set()
        release.wait(10)
        session["late"] = True
        return {"ok": True}

    client, sid = _login(app, "ana")
    statuses: list[int] = []
    thread = threading.Thread(target=lambda: statuses.append(client.post("/slow").status_code))  # type: ignore[attr-defined]
    thread.start()
    assert loaded.wait(10)
    with app.app_context():
        assert revoke_user_sessions("ana") == 1
    release.set()
    thread.join(10)
    assert statuses == [409]
    assert backend.read_raw(app, backend.store_id(app, sid)) is None
    with app.app_context():
        assert user_sessions("ana") == []


def test_keep_current_ends_the_others_only(backend: Harness) -> None:
    app = _routes(backend.make())
    here, _ = _login(app, "ana")
    there, _ = _login(app, "ana")
    assert here.post("/revoke/ana?keep=1").json == {"ended": 1}  # type: ignore[attr-defined]
    assert here.get("/whoami").json == {"user": "ana"}  # type: ignore[attr-defined]
    assert there.get("/whoami").json == {"user": None}  # type: ignore[attr-defined]


def test_one_session_ends_by_its_handle(backend: Harness) -> None:
    app = _routes(backend.make())
    first, _ = _login(app, "ana")
    second, _ = _login(app, "ana")
    with app.app_context():
        target = user_sessions("ana")[0].handle
        assert not revoke_session("bob", target)  # not bob's session: nothing ends
        assert revoke_session("ana", target)
        assert len(user_sessions("ana")) == 1
        assert not revoke_session("ana", target)
    alive = [c.get("/whoami").json["user"] for c in (first, second)]  # type: ignore[attr-defined]
    assert sorted(alive, key=str) == sorted(["ana", None], key=str)


def test_logout_and_user_changes_leave_the_index(backend: Harness) -> None:
    app = _routes(backend.make())
    client, _ = _login(app, "ana")
    client.delete("/session")  # type: ignore[attr-defined]
    other, _ = _login(app, "ana")
    other.post("/forget-me")  # type: ignore[attr-defined]
    with app.app_context():
        assert user_sessions("ana") == []
    assert other.get("/whoami").json == {"user": None}  # type: ignore[attr-defined]


def test_an_expired_session_is_not_listed(backend: Harness) -> None:
    app = _routes(backend.make())
    app.permanent_session_lifetime = timedelta(seconds=1)
    _login(app, "ana")
    with app.app_context():
        assert len(user_sessions("ana")) == 1
        time.sleep(1.6)
        assert user_sessions("ana") == []
        assert revoke_user_sessions("ana") == 0


@pytest.mark.parametrize("store", ["redis", "redis_cluster"])
def test_the_redis_index_stays_bounded(
    store: str, request: pytest.FixtureRequest, make_app: object
) -> None:
    """Expired members leave the index when it is read, and members older than the absolute
    lifetime when a user logs in again; the index key itself expires with its last session."""
    from tests.session_store.conftest import HARNESSES

    backend = HARNESSES[store](make_app, request)  # type: ignore[arg-type]
    app = _routes(backend.make())
    interface = SessionStore.state(app).interface
    client = interface.records.client  # type: ignore[attr-defined]
    index = interface.records.index_key("ana")  # type: ignore[attr-defined]
    interface.records.absolute_lifetime = timedelta(seconds=2)
    for _ in range(4):
        _login(app, "ana")
    assert client.zcard(index) == 4
    assert 0 < client.ttl(index) <= 62
    time.sleep(2.2)
    _login(app, "ana")
    assert client.zcard(index) == 1  # the four older than the absolute lifetime were dropped
    app.permanent_session_lifetime = timedelta(seconds=1)
    _login(app, "ana")
    time.sleep(1.5)
    with app.app_context():
        listed = user_sessions("ana")
    assert [item for item in listed if item.created_at > datetime.now(UTC)] == []
    assert client.zcard(index) == len(listed)


def test_the_cli_lists_and_revokes(
    make_app: object, redis_env: dict[str, str], redis_client: object
) -> None:
    app = _routes(make_app(**redis_env))  # type: ignore[operator]
    clients = [_login(app, "ana")[0] for _ in range(2)]
    runner = CliRunner()
    listed = runner.invoke(session_store_cli, ["sessions", "--user", "ana"], env=redis_env)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.strip().splitlines()
    assert lines[-1] == "2 live session(s)."
    assert all("created" in line and "last seen" in line for line in lines[:-1])
    revoked = runner.invoke(session_store_cli, ["revoke", "--user", "ana"], env=redis_env)
    assert revoked.exit_code == 0, revoked.output
    assert revoked.output.strip() == "Ended 2 session(s)."
    assert all(c.get("/whoami").json == {"user": None} for c in clients)  # type: ignore[attr-defined]
    again = runner.invoke(session_store_cli, ["revoke", "--user", "ana"], env=redis_env)
    assert again.output.strip() == "Ended 0 session(s)."
