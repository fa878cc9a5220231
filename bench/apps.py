"""The apps the benchmark compares, all serving the same two counter routes.

``gunicorn 'bench.apps:create()'`` builds the one named by ``BENCH_APP``:

- ``cookie``: Flask's signed-cookie sessions (no store at all: the ceiling);
- ``flask_session``: Flask-Session 0.8's Redis interface as documented, with its defaults;
- ``flask_session_norefresh``: the same with SESSION_REFRESH_EACH_REQUEST off (one GET per read,
  no sliding expiry: the one-round-trip limit);
- ``ours``: ``pyloto_corp.create_app()`` configured from the environment;
- ``ours_untraced``: the same without its telemetry wrappers (to price telemetry when off).
"""

from __future__ import annotations

import os

from flask import Flask, session


def _counter_routes(app: Flask) -> Flask:
    @app.get("/session/counter")
    def read_counter() -> dict[str, int]:
        return {"counter": int(session.get("counter", 0))}

    @app.post("/session/counter")
    def increment_counter() -> dict[str, int]:
        session["counter"] = int(session.get("counter", 0)) + 1
        return {"counter": session["counter"]}

    return app


def cookie() -> Flask:
    app = Flask("bench_cookie")
    app.secret_key = os.environ["SECRET_KEY"]
    return _counter_routes(app)


def flask_session(*, refresh: bool = True) -> Flask:
    import redis
    from flask_session import Session

    app = Flask("bench_flask_session")
    app.config.update(
        SECRET_KEY=os.environ["SECRET_KEY"],
        SESSION_TYPE="redis",
        SESSION_REDIS=redis.Redis.from_url(os.environ["REDIS_URL"]),
        SESSION_REFRESH_EACH_REQUEST=refresh,
    )
    Session(app)
    return _counter_routes(app)


def ours() -> Flask:
    from pyloto_corp import create_app

    return create_app()


def ours_untraced() -> Flask:
    """``ours`` with the telemetry wrappers taken off its record store: the read path that the
    one with telemetry off (no SDK configured) is compared with (within 2 %)."""
    from pyloto_corp.session_store import SessionStore
    from pyloto_corp.telemetry import OPERATIONS

    app = ours()
    records = SessionStore.state(app).interface.records
    for name in OPERATIONS:
        vars(records).pop(name, None)
    return app


def create() -> Flask:
    name = os.environ["BENCH_APP"]
    if name == "cookie":
        return cookie()
    if name == "flask_session":
        return flask_session()
    if name == "flask_session_norefresh":
        return flask_session(refresh=False)
    if name == "ours":
        return ours()
    if name == "ours_untraced":
        return ours_untraced()
    raise SystemExit(f"BENCH_APP={name!r} is not one of cookie, flask_session, ours")
