"""Apps for the lost-update tests, served by real gunicorn: each request loads the session,
waits (so requests of one session overlap), then writes its own key.

``tests.merge_app:ours()`` is this package's app from the environment;
``tests.merge_app:flask_session_defaults()`` is Flask-Session 0.8 on Redis as documented.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time

from flask import Flask, request, session

from pyloto_corp import create_app

#: The load: THREADS clients of one session, each sending REQUESTS writes of its own keys.
THREADS, REQUESTS = 8, 25


def _routes(app: Flask) -> Flask:
    @app.post("/seed")
    def seed() -> dict[str, bool]:
        session["seed"] = True
        return {"ok": True}

    @app.post("/keys/<name>")
    def put(name: str) -> dict[str, bool]:
        session.get("seed")  # the session as this request loaded it
        time.sleep(float(request.args.get("delay", "0.02")))
        session[name] = request.args.get("value", "1")
        return {"ok": True}

    @app.get("/whoami")
    def whoami() -> dict[str, object]:
        return {"user": session.get("user")}

    @app.get("/keys")
    def keys() -> dict[str, dict[str, str]]:
        return {"keys": {k: v for k, v in session.items() if k.startswith("k")}}

    return app


def ours() -> Flask:
    return _routes(create_app())  # it serves /healthz already


def flask_session_defaults() -> Flask:
    import redis
    from flask_session import Session

    app = Flask("flask_session_defaults")
    app.config.update(
        SECRET_KEY=os.environ["SECRET_KEY"],
        SESSION_TYPE="redis",
        SESSION_REDIS=redis.Redis.from_url(os.environ["REDIS_URL"]),
    )
    Session(app)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return _routes(app)


def _request(
    port: int, method: str, path: str, cookie: str | None = None
) -> tuple[int, str | None, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, headers={"Cookie": cookie} if cookie else {})
        response = connection.getresponse()
        body = response.read()
        set_cookie = response.getheader("Set-Cookie")
        return response.status, set_cookie.split(";", 1)[0] if set_cookie else None, body
    finally:
        connection.close()


def concurrent_writers(port: int) -> tuple[list[int], int]:
    """THREADS x REQUESTS requests, each writing its own key into one session; the statuses
    and how many of the keys the session holds afterwards."""
    status, cookie, _ = _request(port, "POST", "/seed")
    assert status == 200
    assert cookie is not None
    statuses: list[int] = []
    lock = threading.Lock()

    def writer(thread: int) -> None:
        for index in range(REQUESTS):
            result = _request(port, "POST", f"/keys/k{thread}_{index}", cookie)[0]
            with lock:
                statuses.append(result)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    _, _, body = _request(port, "GET", "/keys", cookie)
    return statuses, len(json.loads(body)["keys"])
