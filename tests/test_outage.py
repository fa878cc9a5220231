"""Store outages at request time: a fast 503, never a 500 or a hang, and recovery by itself."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flask import Flask

from tests.conftest import SECRET, MakeApp
from tests.services import RedisServer


@pytest.fixture
def app(make_app: MakeApp, own_redis: RedisServer) -> Flask:
    return make_app(
        ENV="production",
        SESSION_STORE_BACKEND="redis",
        REDIS_URL=own_redis.url,
        SECRET_KEY=SECRET,
        REDIS_SOCKET_TIMEOUT="1",
        REDIS_CONNECT_TIMEOUT="1",
    )


def test_outage_gives_503_then_recovers(
    app: Flask, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = app.test_client()
    assert client.post("/session/counter").json == {"counter": 1}
    assert app.test_client().get("/readyz").status_code == 200

    own_redis.stop()
    for method in (client.get, client.post, client.delete):
        started = time.monotonic()
        path = "/session" if method == client.delete else "/session/counter"
        response = method(path, headers={"Accept": "application/json"})
        assert response.status_code == 503
        assert time.monotonic() - started < 2
        assert response.headers["Retry-After"] == "5"
        assert response.json is not None
        assert response.json["error"] == "session_store_unavailable"
        assert "Set-Cookie" not in response.headers
    html = client.get("/session/counter", headers={"Accept": "text/html"})
    assert html.status_code == 503
    assert html.mimetype == "text/plain"
    readiness = app.test_client().get("/readyz")
    assert readiness.status_code == 503
    # The public body names the backend only; where the store is goes to the log.
    assert readiness.json == {"status": "unavailable", "session_store": "redis"}
    # A view that does not use the session still answers, even with the session cookie.
    assert client.get("/healthz").status_code == 200

    own_redis.start()  # same port, empty: the session written before is gone (no persistence)
    assert app.test_client().get("/readyz").status_code == 200
    assert client.post("/session/counter").json == {"counter": 1}


def test_write_failure_after_the_view_is_not_reported_as_success(
    app: Flask, own_redis: RedisServer
) -> None:
    @app.post("/stop-store-then-write")
    def stop_then_write() -> dict[str, bool]:
        from flask import session

        own_redis.stop()
        session["written"] = True
        return {"ok": True}

    response = app.test_client().post("/stop-store-then-write")
    assert response.status_code == 503
    assert "Set-Cookie" not in response.headers


def test_redis_password_never_in_outage_logs(
    make_app: MakeApp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path, password="outage-pass-314")
    server.start()
    app = make_app(
        ENV="production",
        SESSION_STORE_BACKEND="redis",
        REDIS_URL=server.url,
        SECRET_KEY=SECRET,
        REDIS_ALLOW_PLAINTEXT_AUTH="true",  # loopback; the password still never leaks
    )
    client = app.test_client()
    client.post("/session/counter")
    server.stop()
    assert client.get("/session/counter").status_code == 503
    readiness = app.test_client().get("/readyz")
    assert "outage-pass-314" not in caplog.text + readiness.get_data(as_text=True)
    assert "redis://***@127.0.0.1" in caplog.text
