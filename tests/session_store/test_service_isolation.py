"""Two Cloud Run services on one store with the default key prefix do not share sessions.

Each record carries the service that wrote it (``_service``, only while the prefix is the shared
default) and another service's record reads as no session: service A's cookie does not sign in
to service B. Records stored before the stamp existed still work for whoever holds them (a
deploy logs nobody out), and a chosen prefix is the operator's decision to share or not.
"""

from __future__ import annotations

import pytest
from flask import Flask, session
from flask.testing import FlaskClient

from pyloto_corp.session_store import SessionStore
from pyloto_corp.session_store.base import SERVICE
from tests.conftest import DEPLOYED_COOKIE, MakeApp
from tests.stored import store_session, stored_session

HTTPS = "https://localhost"


@pytest.fixture(params=["redis_env", "firestore_env"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    env: dict[str, str] = request.getfixturevalue(request.param)
    return env


def _service(make_app: MakeApp, env: dict[str, str], name: str, **extra: str) -> Flask:
    app = make_app(**env, K_SERVICE=name, **extra)

    @app.post("/as/<user>")
    def sign_in(user: str) -> dict[str, bool]:
        session["_user_id"] = user
        return {"ok": True}

    @app.get("/whoami")
    def whoami() -> dict[str, object]:
        return {"user": session.get("_user_id")}

    return app


def _client(app: Flask) -> FlaskClient:
    return app.test_client(use_cookies=False)


def _sid(header: str) -> str:
    assert header.startswith(f"{DEPLOYED_COOKIE}="), header
    return header.split(";", 1)[0].split("=", 1)[1]


def _as(sid: str) -> dict[str, str]:
    return {"Cookie": f"{DEPLOYED_COOKIE}={sid}"}


def test_one_services_cookie_does_not_sign_in_to_another(
    make_app: MakeApp, store_env: dict[str, str]
) -> None:
    a = _service(make_app, store_env, "billing")
    b = _service(make_app, store_env, "admin")
    signed_in = _client(a).post("/as/ana", base_url=HTTPS)
    sid = _sid(signed_in.headers["Set-Cookie"])
    key = SessionStore.state(a).interface.store_id(sid)
    stored = stored_session(a, key)
    assert stored is not None
    assert stored[SERVICE] == "billing"

    assert _client(b).get("/whoami", headers=_as(sid), base_url=HTTPS).json == {"user": None}
    written = _client(b).post("/as/eve", headers=_as(sid), base_url=HTTPS)
    assert _sid(written.headers["Set-Cookie"]) != sid  # a new session of B's own
    # A's session is untouched, and still A's.
    assert _client(a).get("/whoami", headers=_as(sid), base_url=HTTPS).json == {"user": "ana"}
    assert stored_session(a, key) == stored


def test_a_session_stored_before_the_stamp_keeps_working_and_is_stamped(
    make_app: MakeApp, store_env: dict[str, str]
) -> None:
    app = _service(make_app, store_env, "billing")
    interface = SessionStore.state(app).interface
    sid = "stored-by-the-previous-release-" + "x" * 20
    store_session(app, interface.store_id(sid), {"_user_id": "ana", "counter": 1})
    assert _client(app).get("/whoami", headers=_as(sid), base_url=HTTPS).json == {"user": "ana"}
    _client(app).post("/session/counter", headers=_as(sid), base_url=HTTPS)
    stored = stored_session(app, interface.store_id(sid))
    assert stored is not None
    assert stored[SERVICE] == "billing"
    assert stored["counter"] == 2


def test_a_chosen_prefix_is_not_stamped(make_app: MakeApp, store_env: dict[str, str]) -> None:
    app = _service(make_app, store_env, "billing", SESSION_KEY_PREFIX="session:shared:")
    sid = _sid(_client(app).post("/as/ana", base_url=HTTPS).headers["Set-Cookie"])
    stored = stored_session(app, SessionStore.state(app).interface.store_id(sid))
    assert stored is not None
    assert SERVICE not in stored
    # _host: written under the __Host- cookie (see test_host_cookie.py), not a service stamp.
    assert set(stored) == {"_user_id", "_created_at", "_user_since", "_host"}
