"""gunicorn really started with the repo's gunicorn.conf.py, queried over HTTP on loopback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import SECRET
from tests.services import Gunicorn, RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"]


def _env(**environ: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ENV", "SESSION_STORE_BACKEND")}
    env.update(FLASK_SKIP_DOTENV="1", **environ)
    return env


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    started: list[Gunicorn] = []

    def start(**environ: str) -> Gunicorn:
        server = Gunicorn(tmp_path, {"GUNICORN_THREADS": "2", **environ})
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def test_development_serves_sessions(serve: Callable[..., Gunicorn]) -> None:
    served = serve(ENV="development")
    status, headers, body = served.request("POST", "/session/counter")
    assert (status, json.loads(body)) == (200, {"counter": 1})
    cookie = headers["Set-Cookie"].split(";")[0]
    status, _, body = served.request("GET", "/session/counter", {"Cookie": cookie})
    assert json.loads(body) == {"counter": 1}
    assert '"GET /session/counter HTTP/1.1" 200' in served.stop()  # the access log, at INFO


def test_log_level_warning_drops_the_access_log(serve: Callable[..., Gunicorn]) -> None:
    served = serve(ENV="development", LOG_LEVEL="WARNING")
    assert served.request("GET", "/session/counter")[0] == 200
    output = served.stop()
    assert "/session/counter" not in output
    assert "Traceback" not in output


@pytest.mark.parametrize(("level", "built"), [(logging.INFO, True), (logging.WARNING, False)])
def test_access_log_fields_are_built_only_when_written(
    level: int, built: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gunicorn would format every request's access-log fields and drop them at WARNING."""
    import runpy

    from gunicorn.config import Config

    access_log = logging.getLogger("gunicorn.access")
    monkeypatch.setattr(access_log, "handlers", [])
    config = Config()
    config.set("accesslog", "-")
    logger = runpy.run_path(str(ROOT / "gunicorn.conf.py"))["Logger"](config)
    calls: list[object] = []
    monkeypatch.setattr(logger, "atoms", lambda *args: calls.append(args) or {})
    access_log.handlers = [logging.NullHandler()]
    access_log.setLevel(level)
    try:
        logger.access(object(), object(), {}, timedelta(milliseconds=1))
    finally:
        access_log.setLevel(logging.NOTSET)
    assert bool(calls) is built


def test_production_logs_json_with_trace_and_answers_503_when_redis_stops(
    serve: Callable[..., Gunicorn], tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path, password="gunicorn-redis-pass")
    redis.start()
    try:
        served = serve(
            ENV="production",
            SESSION_STORE_BACKEND="redis",
            REDIS_URL=redis.url,
            SECRET_KEY=SECRET,
            GOOGLE_CLOUD_PROJECT="demo-proj",
        )
        status, headers, _ = served.request(
            "POST", "/session/counter", {"X-Forwarded-Proto": "https"}
        )
        assert status == 200
        assert "Secure" in headers["Set-Cookie"]
        assert served.request("GET", "/readyz")[0] == 200
        cookie = headers["Set-Cookie"].split(";")[0]
        redis.stop()
        trace = {"X-Cloud-Trace-Context": "0af7651916cd43dd8448eb211c80319c/1;o=1"}
        status, headers, body = served.request(
            "GET", "/session/counter", {"Cookie": cookie, "Accept": "application/json", **trace}
        )
        assert status == 503
        assert headers["Retry-After"] == "5"
        assert json.loads(body)["error"] == "session_store_unavailable"
        assert served.request("GET", "/readyz")[0] == 503
        redis.start()
        assert served.request("GET", "/readyz")[0] == 200
        output = served.stop()
    finally:
        redis.stop()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines, output
    assert all({"severity", "message"} <= set(line) for line in lines)
    errors = [line for line in lines if line["severity"] == "ERROR"]
    assert len(errors) == 1, errors
    assert errors[0]["logging.googleapis.com/trace"] == (
        "projects/demo-proj/traces/0af7651916cd43dd8448eb211c80319c"
    )
    assert "redis://:***@127.0.0.1" in errors[0]["message"]
    for secret in (SECRET, "gunicorn-redis-pass", cookie.split("=", 1)[1]):
        assert secret not in output


def test_misconfigured_production_exits_1_before_listening() -> None:
    port = free_port()
    started = time.monotonic()
    result = subprocess.run(
        GUNICORN,
        cwd=ROOT,
        env=_env(PORT=str(port), ENV="production", SECRET_KEY=SECRET),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    output = result.stdout + result.stderr
    assert "Error: Invalid configuration for environment 'production'" in output
    assert "Traceback" not in output
    assert "Listening at" not in output
    assert SECRET not in output


def test_config_values_for_cloud_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy

    monkeypatch.setenv("PORT", "9999")
    config = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert config["bind"] == "0.0.0.0:9999"
    assert config["preload_app"] is True
    assert config["graceful_timeout"] < 10
    assert config["worker_class"] == "gthread"
    assert (config["accesslog"], config["errorlog"]) == ("-", "-")
