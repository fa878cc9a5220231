"""One contract every backend meets, each against its real service."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from flask import Flask, Response, request, session
from werkzeug.test import TestResponse

from pyloto_corp.session_store import SessionStore, rotate_session_id
from pyloto_corp.session_store.base import ANONYMOUS_SID_MARK
from tests.conftest import MakeApp, cookie_name
from tests.session_store.conftest import HARNESSES, Harness, sid_of


def test_round_trip(backend: Harness) -> None:
    client = backend.make().test_client()
    assert client.get("/session/counter").json == {"counter": 0}
    assert client.post("/session/counter").json == {"counter": 1}
    assert client.post("/session/counter").json == {"counter": 2}
    assert client.get("/session/counter").json == {"counter": 2}


def test_request_without_session_sets_no_cookie_and_stores_nothing(backend: Harness) -> None:
    app = backend.make()
    response = app.test_client().get("/session/counter")
    assert "Set-Cookie" not in response.headers


def test_store_key_is_a_hash_of_the_session_id(backend: Harness) -> None:
    app = backend.make()
    client = app.test_client()
    sid = sid_of(client.post("/session/counter"))
    assert backend.read_raw(app, SessionStore.state(app).settings.session_key_prefix + sid) is None
    assert backend.read_raw(app, backend.store_id(app, sid)) is not None


def test_logout_deletes_the_stored_session_and_the_cookie(backend: Harness) -> None:
    app = backend.make()
    client = app.test_client()
    sid = sid_of(client.post("/session/counter"))
    response = client.delete("/session")
    assert f"{cookie_name(app)}=;" in response.headers["Set-Cookie"]
    assert backend.read_raw(app, backend.store_id(app, sid)) is None
    # The old cookie, replayed, opens an empty session.
    replay = app.test_client()
    replay.set_cookie(cookie_name(app), sid)
    assert replay.get("/session/counter").json == {"counter": 0}


def test_regenerate_moves_the_session_to_a_new_id(backend: Harness) -> None:
    app = backend.make()

    @app.post("/login")
    def login() -> dict[str, bool]:
        app.session_interface.regenerate(session)  # type: ignore[attr-defined]
        return {"ok": True}

    client = app.test_client()
    old_sid = sid_of(client.post("/session/counter"))
    new_sid = sid_of(client.post("/login"))
    assert new_sid != old_sid
    assert backend.read_raw(app, backend.store_id(app, old_sid)) is None
    assert client.get("/session/counter").json == {"counter": 1}


@pytest.mark.parametrize("cookie", ["unknown-id", "a" * 4000, "../../etc", "*", "sess?on[x]"])
def test_unknown_cookie_gets_a_fresh_session(backend: Harness, cookie: str) -> None:
    app = backend.make()
    client = app.test_client()
    client.set_cookie(cookie_name(app), cookie)
    assert client.get("/session/counter").json == {"counter": 0}
    response = client.post("/session/counter")
    assert response.json == {"counter": 1}
    assert sid_of(response) != cookie


class _Exploit:
    """A pickle that would create a file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (self.path.write_text, ("pwned",))


@pytest.mark.parametrize("payload", ["garbage", "pickle_dict", "pickle_exploit", "msgpack_list"])
def test_corrupt_or_hostile_stored_data_gives_a_fresh_session(
    backend: Harness, payload: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    raw = {
        "garbage": b"\xc1\xff not a session",
        "pickle_dict": pickle.dumps({"counter": 99}),
        "pickle_exploit": pickle.dumps(_Exploit(marker)),
        "msgpack_list": b"\x92\x01\x02",
    }[payload]
    app = backend.make()
    client = app.test_client()
    sid = sid_of(client.post("/session/counter"))
    backend.write_raw(app, backend.store_id(app, sid), raw)

    with caplog.at_level(logging.WARNING, logger="pyloto_corp"):
        assert client.get("/session/counter").json == {"counter": 0}
    assert not marker.exists()
    assert "Discarded undecodable session data" in caplog.text
    assert sid not in caplog.text


def test_oversized_session_is_refused_and_the_stored_one_kept(
    backend: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    app = backend.make()
    SessionStore.state(app).interface.records.max_bytes = 4096

    @app.post("/big")
    def big() -> dict[str, bool]:
        session["blob"] = "x" * 5000
        return {"ok": True}

    client = app.test_client()
    sid = sid_of(client.post("/session/counter"))
    before = backend.read_raw(app, backend.store_id(app, sid))
    response = client.post("/big", headers={"Accept": "application/json"})
    assert response.status_code == 500
    assert response.json is not None
    assert response.json["error"] == "session_too_large"
    # The detail (limit, backend) is in the log line named by the body's correlation id.
    assert "4,096" not in response.json["message"]
    assert response.json["correlation_id"] in response.json["message"]
    assert "Set-Cookie" not in response.headers
    assert backend.read_raw(app, backend.store_id(app, sid)) == before
    assert client.get("/session/counter").json == {"counter": 1}
    assert "session_too_large" not in caplog.text
    assert "accepts at most 4,096" in caplog.text


def test_sessions_are_not_permanent_unless_asked_as_in_flask(backend: Harness) -> None:
    """Flask's promise (and what Flask-Login's "strong" protection needs): the cookie lasts
    until the browser closes, unless the app makes the session permanent."""
    app = backend.make()
    header = app.test_client().post("/session/counter").headers["Set-Cookie"]
    assert "Expires=" not in header
    assert "Max-Age" not in header


def test_cookie_of_a_permanent_session_expires_at_the_absolute_lifetime(backend: Harness) -> None:
    app = backend.make()

    @app.post("/remember")
    def remember() -> dict[str, bool]:
        session.permanent = True
        session["counter"] = 1
        return {"ok": True}

    before = time.time()
    header = app.test_client().post("/remember").headers["Set-Cookie"]
    (expires,) = [p.split("=", 1)[1] for p in header.split("; ") if p.startswith("Expires=")]
    absolute = SessionStore.state(app).settings.session_absolute_lifetime.total_seconds()
    assert abs(parsedate_to_datetime(expires).timestamp() - (before + absolute)) < 5


def test_absolute_lifetime_ends_an_active_session(backend: Harness) -> None:
    app = backend.make()

    @app.post("/age")
    def age() -> dict[str, bool]:
        session["_created_at"] = int(time.time()) - 8 * 24 * 3600  # older than the 7 day default
        return {"ok": True}

    client = app.test_client()
    sid = sid_of(client.post("/session/counter"))
    client.post("/age")
    assert backend.read_raw(app, backend.store_id(app, sid)) is not None
    assert client.get("/session/counter").json == {"counter": 0}
    assert backend.read_raw(app, backend.store_id(app, sid)) is None


class _Gate:
    """Holds a view until the test has done something meanwhile (a logout)."""

    def __init__(self) -> None:
        self.reached, self.opened = threading.Event(), threading.Event()

    def hold(self) -> None:
        self.reached.set()
        self.opened.wait(10)


def _logged_out_meanwhile(app: Flask, gate: _Gate, sid: str, path: str) -> TestResponse:
    """POST ``path`` as session ``sid``; while its view is held at the gate, log the session
    out from another client; the held request's response."""
    results: dict[str, TestResponse] = {}

    def held() -> None:
        other = app.test_client()
        other.set_cookie(cookie_name(app), sid)
        results["response"] = other.post(path, headers={"Accept": "application/json"})

    thread = threading.Thread(target=held)
    thread.start()
    assert gate.reached.wait(10)
    logout = app.test_client()
    logout.set_cookie(cookie_name(app), sid)
    logout.delete("/session")
    gate.opened.set()
    thread.join(10)
    return results["response"]


@pytest.mark.parametrize("slow_request_writes", [True, False], ids=["modifies", "reads"])
def test_logout_is_final_for_a_request_that_started_before_it(
    backend: Harness, slow_request_writes: bool
) -> None:
    app, gate = backend.make(), _Gate()

    @app.post("/slow")
    def slow() -> dict[str, bool]:
        if slow_request_writes:
            session["late"] = True
        else:
            session.get("counter")
        gate.hold()
        return {"ok": True}

    sid = sid_of(app.test_client().post("/session/counter"))
    response = _logged_out_meanwhile(app, gate, sid, "/slow")
    # The losing write is dropped and says so (409); it sends no session cookie at all, so it
    # cannot overwrite one a concurrent login set. A read-only request is not affected.
    assert response.status_code == (409 if slow_request_writes else 200)
    assert "Set-Cookie" not in response.headers
    assert backend.read_raw(app, backend.store_id(app, sid)) is None


def _overlapping_routes(app: Flask) -> None:
    """``/put/<key>?value=v``: load the session, wait for the others, write one key."""

    @app.post("/put/<key>")
    def put(key: str) -> dict[str, bool]:
        session.get("counter")
        time.sleep(0.02)
        session[key] = request.args.get("value", "1")
        return {"ok": True}

    @app.get("/all")
    def everything() -> dict[str, object]:
        return {k: v for k, v in session.items() if not k.startswith("_")}


def _in_threads(count: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def test_concurrent_changes_to_different_keys_all_land(backend: Harness) -> None:
    """Requests of one session that overlap and change different keys: every change lands
    (merged, not last-write-wins), none is refused, and keys nobody changed stay."""
    app = backend.make()
    _overlapping_routes(app)
    client = app.test_client()
    sid = sid_of(client.post("/session/counter"))
    statuses: list[int] = []

    def writer(n: int) -> None:
        worker = app.test_client()
        worker.set_cookie(cookie_name(app), sid)
        statuses.extend(worker.post(f"/put/k{n}_{i}").status_code for i in range(5))

    _in_threads(6, writer)
    assert statuses == [200] * 30
    stored = client.get("/all").json
    assert stored == {"counter": 1, **{f"k{n}_{i}": "1" for n in range(6) for i in range(5)}}


def test_the_same_key_changed_at_once_ends_as_one_of_the_written_values(
    backend: Harness,
) -> None:
    app = backend.make()
    _overlapping_routes(app)
    client = app.test_client()
    sid = sid_of(client.post("/session/counter"))
    values = [f"value-{n}-" + "x" * (n * 50) for n in range(6)]

    def writer(n: int) -> None:
        worker = app.test_client()
        worker.set_cookie(cookie_name(app), sid)
        assert worker.post(f"/put/shared?value={values[n]}").status_code == 200

    _in_threads(6, writer)
    assert client.get("/all").json["shared"] in values  # type: ignore[index]


def test_logout_racing_slow_writers_never_resurrects(backend: Harness) -> None:
    app = backend.make()
    _overlapping_routes(app)
    for _ in range(5):
        client = app.test_client()
        sid = sid_of(client.post("/session/counter"))
        statuses: list[int] = []

        def writer(n: int, sid: str = sid, statuses: list[int] = statuses) -> None:
            worker = app.test_client()
            worker.set_cookie(cookie_name(app), sid)
            if n == 0:
                time.sleep(0.01)
                statuses.append(worker.delete("/session").status_code)
            else:
                statuses.append(worker.post(f"/put/late{n}").status_code)

        _in_threads(4, writer)
        assert set(statuses) <= {200, 409}
        assert backend.read_raw(app, backend.store_id(app, sid)) is None
        replay = app.test_client()
        replay.set_cookie(cookie_name(app), sid)
        assert replay.get("/all").json == {}


def test_rotation_racing_a_write_never_brings_the_old_id_back(backend: Harness) -> None:
    app = backend.make()
    _overlapping_routes(app)
    client = app.test_client()
    old = sid_of(client.post("/session/counter"))
    results: dict[str, object] = {}

    def request(n: int) -> None:
        worker = app.test_client()
        worker.set_cookie(cookie_name(app), old)
        if n == 0:
            time.sleep(0.005)
            response = worker.post("/session/login", json={"user": "ana"})
            results["new"] = sid_of(response)
        else:
            results["write"] = worker.post("/put/late").status_code

    _in_threads(2, request)
    new = results["new"]
    assert isinstance(new, str)
    assert results["write"] in (200, 409)
    assert backend.read_raw(app, backend.store_id(app, old)) is None
    after = app.test_client()
    after.set_cookie(cookie_name(app), new)
    data = after.get("/all").json
    assert data is not None
    assert data["user"] == "ana"
    # The write landed before the login copied the session, or went to the old id (deleted
    # with it), or was refused: never a second live copy.
    assert data.get("late") in (None, "1")


def test_login_rotates_the_id_and_deletes_the_old_one(backend: Harness) -> None:
    app = backend.make()
    client = app.test_client()
    old_sid = sid_of(client.post("/session/counter"))
    response = client.post("/session/login", json={"user": "ana"})
    assert response.json == {"user": "ana"}
    new_sid = sid_of(response)
    assert new_sid != old_sid
    assert backend.read_raw(app, backend.store_id(app, old_sid)) is None
    assert backend.read_raw(app, backend.store_id(app, new_sid)) is not None
    assert client.get("/session/counter").json == {"counter": 1}


def test_login_on_an_empty_session_still_issues_a_new_id(backend: Harness) -> None:
    app = backend.make()
    client = app.test_client()
    client.set_cookie(cookie_name(app), "planted-by-an-attacker")
    sid = sid_of(client.post("/session/login", json={"user": "ana"}))
    assert sid != "planted-by-an-attacker"
    assert backend.read_raw(app, backend.store_id(app, sid)) is not None


def test_login_rejects_a_bad_payload(backend: Harness) -> None:
    response = backend.make().test_client().post("/session/login", json={"user": ""})
    assert response.status_code == 400


def test_session_ids_are_256_bits_from_secrets(
    backend: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    import secrets

    issued: dict[str, int] = {}
    original = secrets.token_urlsafe

    def spy(nbytes: int) -> str:
        value = original(nbytes)
        issued[value] = nbytes
        return value

    monkeypatch.setattr(secrets, "token_urlsafe", spy)
    sid = sid_of(backend.make().test_client().post("/session/counter"))
    token = sid.removeprefix(ANONYMOUS_SID_MARK)  # no user yet: the id says so
    assert sid != token
    assert issued[token] == 32
    assert len(token) == 43  # 32 bytes, base64url without padding


def test_a_session_stored_by_the_previous_release_keeps_working(
    shared_backend: Harness,
) -> None:
    """A deploy must not log anyone out: the previous release stored plain msgpack maps
    (tuples as lists); such a record is read, and rewritten in the new format on its next
    change."""
    import msgspec

    from pyloto_corp.records import codec

    backend = shared_backend
    app = backend.make()
    client = app.test_client()
    sid = sid_of(client.post("/session/counter"))
    old = {"counter": 41, "_permanent": True, "_created_at": int(time.time()) - 60}
    old["_flashes"] = [["message", "Saved"]]  # type: ignore[assignment]
    backend.write_raw(app, backend.store_id(app, sid), msgspec.msgpack.encode(old))
    assert client.get("/session/counter").json == {"counter": 41}
    assert backend.read_raw(app, backend.store_id(app, sid)) == msgspec.msgpack.encode(old)
    assert client.post("/session/counter").json == {"counter": 42}
    upgraded = backend.read_raw(app, backend.store_id(app, sid))
    assert isinstance(upgraded, dict)  # one field per key now
    assert codec.unpack_value(upgraded["counter"]) == 42
    assert codec.unpack_value(upgraded["_flashes"]) == [["message", "Saved"]]
    assert client.get("/session/counter").json == {"counter": 42}


def test_keys_of_any_spelling_round_trip_and_merge(backend: Harness) -> None:
    """Keys that are no identifier (dots, backticks, spaces, empty, reserved-looking names,
    non-ASCII) are stored and merged like any other."""
    keys = ["a.b", "`tick`", "with space", "", "__name__", "~x", "ключ", "data", "x" * 300]
    app = backend.make()

    @app.post("/odd")
    def odd() -> dict[str, bool]:
        for key in keys:
            session[key] = key
        return {"ok": True}

    @app.post("/drop")
    def drop() -> dict[str, bool]:
        del session["a.b"]
        session["~x"] = "changed"
        return {"ok": True}

    @app.get("/odd")
    def read_odd() -> dict[str, object]:
        return {key: session.get(key) for key in keys}

    client = app.test_client()
    client.post("/odd")
    assert client.get("/odd").json == {key: key for key in keys}
    client.post("/drop")
    assert client.get("/odd").json == {
        **{key: key for key in keys},
        "a.b": None,
        "~x": "changed",
    }


@pytest.mark.parametrize("store", ["memory", "redis", "redis_cluster"])
def test_the_size_limit_holds_for_the_merged_record(
    store: str, make_app: MakeApp, request: pytest.FixtureRequest
) -> None:
    """Two requests that each stay under SESSION_MAX_BYTES but together exceed it: the second
    write is refused (500, nothing written), the first one's change is kept."""
    backend = HARNESSES[store](make_app, request)
    app = backend.make()
    SessionStore.state(app).interface.records.max_bytes = 4096
    _overlapping_routes(app)
    client = app.test_client()
    sid = sid_of(client.post("/session/counter"))
    statuses: list[int] = []

    def writer(n: int) -> None:
        worker = app.test_client()
        worker.set_cookie(cookie_name(app), sid)
        time.sleep(0.01 * n)  # the second loads before the first writes, writes after it
        statuses.append(worker.post(f"/put/big{n}?value={'x' * 2500}").status_code)

    _in_threads(2, writer)
    assert sorted(statuses) == [200, 500]
    stored = client.get("/all").json
    assert stored is not None
    assert len([key for key in stored if key.startswith("big")]) == 1
    assert stored["counter"] == 1


def test_a_login_finishing_after_a_logout_does_not_bring_the_session_back(
    backend: Harness,
) -> None:
    """Request A (a login: it rotates the id) loaded the session before request B logged it
    out: A's copy under the new id must not outlive the logout."""
    app, gate = backend.make(), _Gate()

    @app.post("/slow-login")
    def slow_login() -> dict[str, bool]:
        session.get("counter")
        gate.hold()
        rotate_session_id()
        session["user"] = "ana"
        return {"ok": True}

    sid = sid_of(app.test_client().post("/session/counter"))
    response = _logged_out_meanwhile(app, gate, sid, "/slow-login")
    assert response.status_code == 409
    assert "Set-Cookie" not in response.headers
    assert backend.read_raw(app, backend.store_id(app, sid)) is None


def test_a_dropped_write_answers_with_nothing_of_the_views_response(backend: Harness) -> None:
    """The 409 replaces the view's answer whole: no ETag, Location or cacheable headers of a
    body it no longer has; the view's other cookies stay."""
    app, gate = backend.make(), _Gate()

    @app.post("/slow-write")
    def slow_write() -> Response:
        session.get("counter")
        gate.hold()
        session["late"] = True
        response = Response("ok", status=201, headers={"ETag": '"v1"', "Location": "/x"})
        response.headers["Cache-Control"] = "public, max-age=600"
        response.set_cookie("lang", "fr")
        return response

    sid = sid_of(app.test_client().post("/session/counter"))
    response = _logged_out_meanwhile(app, gate, sid, "/slow-write")
    assert response.status_code == 409
    assert response.json is not None
    assert response.json["error"] == "session_ended"
    assert "ETag" not in response.headers
    assert "Location" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"
    assert [c.split(";")[0] for c in response.headers.getlist("Set-Cookie")] == ["lang=fr"]
