"""gunicorn really started with the repo's gunicorn.conf.py, queried over HTTP on loopback."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from pyloto_corp.config.server import FALSE_WORDS, LOG_LEVELS, TRUE_WORDS, ServerSettings
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


@pytest.mark.parametrize(
    ("accesslog", "level", "built"),
    [("-", logging.INFO, True), ("-", logging.WARNING, False), (None, logging.INFO, False)],
)
def test_access_log_fields_are_built_only_when_written(
    accesslog: str | None, level: int, built: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gunicorn would format every request's access-log fields, and drop them at WARNING or
    with the access log off, because a logging config is given."""
    import runpy

    from gunicorn.config import Config

    access_log = logging.getLogger("gunicorn.access")
    monkeypatch.setattr(access_log, "handlers", [])
    config = Config()
    config.set("accesslog", accesslog)
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


DEFAULT_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
FIXED_ATOMS = " ".join(f"%({atom})s" for atom in "hlutrsmUqHbBfaTDMLp")


class _Response:
    def __init__(self, sent: int | None) -> None:
        self.status = "200 OK"
        self.sent = sent
        self.headers = [("Content-Type", "application/json"), ("Set-Cookie", "session=x")]


class _Request:
    headers = (("HOST", "127.0.0.1:8080"), ("USER-AGENT", 'curl "8"'), ("X-PROBE", "p-1"))


def _environ(**extra: str) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "wsgi.input": io.BytesIO(),
        "wsgi.url_scheme": "http",
        "gunicorn.socket": object(),
        "SERVER_SOFTWARE": "gunicorn",
        "REQUEST_METHOD": "GET",
        "RAW_URI": "/session/counter?a=1",
        "PATH_INFO": "/session/counter",
        "QUERY_STRING": "a=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1:8080",
        "HTTP_USER_AGENT": 'curl "8"',
        "HTTP_X_PROBE": "p-1",
        "REMOTE_ADDR": "169.254.1.1",
        "REMOTE_PORT": "41234",
        "SERVER_NAME": "0.0.0.0",
        "SERVER_PORT": "8080",
        "SCRIPT_NAME": "",
    }
    environ.update(extra)
    return environ


@pytest.mark.parametrize(
    "access_format", [DEFAULT_FORMAT, FIXED_ATOMS, DEFAULT_FORMAT + " %({x-probe}i)s %({host}e)s"]
)
@pytest.mark.parametrize(
    ("extra", "sent"),
    [
        ({}, 15),
        ({}, None),
        ({"HTTP_AUTHORIZATION": "Basic YW5hOnB3", "HTTP_REFERER": "https://x.test/"}, 0),
        ({"HTTP_AUTHORIZATION": "Bearer t"}, 1),
    ],
)
def test_access_line_is_gunicorns_own(
    access_format: str, extra: dict[str, str], sent: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixed atoms alone (no request/response header or environ atom built, escaped and
    dropped on every line, unless the format names one) give gunicorn's own line."""
    import runpy

    from gunicorn.config import Config
    from gunicorn.glogging import Logger as StockLogger
    from gunicorn.glogging import SafeAtoms

    monkeypatch.setattr(logging.getLogger("gunicorn.access"), "handlers", [])
    config = Config()
    config.set("accesslog", "-")
    config.set("access_log_format", access_format)
    ours = runpy.run_path(str(ROOT / "gunicorn.conf.py"))["Logger"](config)
    stock = StockLogger(config)
    lines = []
    for logger in (ours, stock):
        monkeypatch.setattr(logger, "now", lambda: "[01/Dec/2026:00:00:00 +0000]")
        atoms = logger.atoms(_Response(sent), _Request(), _environ(**extra), timedelta(0, 1, 2))
        lines.append(access_format % SafeAtoms(atoms))
    assert lines[0] == lines[1]
    assert ("p-1" in lines[0]) is ("x-probe" in access_format)
    if access_format == DEFAULT_FORMAT:
        assert lines[0].startswith("169.254.1.1 - ")
        assert '"GET /session/counter?a=1 HTTP/1.1" 200' in lines[0]
        assert lines[0].endswith('"curl \\"8\\""')


REQUEST_LINE = "GET /session/counter HTTP/1.1"


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path)
    server.start()
    yield server.url
    server.stop()


@pytest.mark.parametrize(
    ("access_log", "written"), [(None, False), ("true", True), (" On ", True), ("false", False)]
)
def test_access_log_on_cloud_run_is_off_unless_asked_for(
    access_log: str | None,
    written: bool,
    serve: Callable[..., Gunicorn],
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cloud Run's own request log has every request: a line of ours would be billed twice."""
    monkeypatch.delenv("GUNICORN_ACCESS_LOG", raising=False)
    environ = {"K_SERVICE": "pyloto", "SESSION_STORE_BACKEND": "redis", "REDIS_URL": redis_url}
    if access_log is not None:
        environ["GUNICORN_ACCESS_LOG"] = access_log
    served = serve(SECRET_KEY=SECRET, **environ)
    status, headers, _ = served.request("POST", "/session/counter")
    assert status == 200
    cookie = headers["Set-Cookie"].split(";")[0]
    for _ in range(3):
        assert served.request("GET", "/session/counter", {"Cookie": cookie})[0] == 200
    output = served.stop()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    messages = [line["message"] for line in lines]
    assert any(m.startswith("Listening at: http://0.0.0.0:") for m in messages), output
    requests = [m for m in messages if REQUEST_LINE in m]
    assert len(requests) == (3 if written else 0), output
    assert "Traceback" not in output


@pytest.mark.parametrize(("access_log", "written"), [(None, True), ("0", False), ("YES", True)])
def test_access_log_locally_is_on_unless_turned_off(
    access_log: str | None,
    written: bool,
    serve: Callable[..., Gunicorn],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without K_SERVICE nothing else logs the requests: a developer sees them by default."""
    monkeypatch.delenv("K_SERVICE", raising=False)
    monkeypatch.delenv("GUNICORN_ACCESS_LOG", raising=False)
    environ = {} if access_log is None else {"GUNICORN_ACCESS_LOG": access_log}
    served = serve(ENV="development", **environ)
    assert served.request("GET", "/session/counter")[0] == 200
    output = served.stop()
    assert "Listening at: http://0.0.0.0:" in output
    assert output.count(f'"{REQUEST_LINE}" 200') == (1 if written else 0), output


def test_no_control_socket(serve: Callable[..., Gunicorn], tmp_path: Path) -> None:
    """gunicorn 25.1+ would open a control socket (gunicornc) under XDG_RUNTIME_DIR or HOME:
    a way into the running server that nothing on Cloud Run needs."""
    from gunicorn.config import Config

    assert "control_socket_disable" in Config().settings  # the installed gunicorn knows it
    runtime, home = tmp_path / "run", tmp_path / "home"
    runtime.mkdir()
    home.mkdir()
    served = serve(ENV="development", XDG_RUNTIME_DIR=str(runtime), HOME=str(home))
    assert served.request("GET", "/healthz")[0] == 200
    time.sleep(0.5)  # gunicorn opens the socket just after it starts serving
    sockets = [*runtime.rglob("*"), *home.rglob("*")]
    output = served.stop()
    assert sockets == [], output
    assert "control socket" not in output, output


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
            REDIS_ALLOW_PLAINTEXT_AUTH="true",  # a loopback server with a password
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
    # One line for the failed request, one for the failed readiness check.
    assert [e["message"].startswith("Readiness check failed") for e in errors] == [False, True]
    assert errors[0]["logging.googleapis.com/trace"] == (
        "projects/demo-proj/traces/0af7651916cd43dd8448eb211c80319c"
    )
    assert "redis://***@127.0.0.1" in errors[0]["message"]
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
    # gunicorn trusts no peer's X-Forwarded-*: ProxyFix (TRUSTED_PROXY_HOPS) alone decides.
    assert config["forwarded_allow_ips"] == ""
    assert config["control_socket_disable"] is True


@pytest.mark.parametrize(
    ("environ", "accesslog"),
    [
        ({}, "-"),
        ({"K_SERVICE": "pyloto"}, None),
        ({"K_SERVICE": "pyloto", "GUNICORN_ACCESS_LOG": "true"}, "-"),
        ({"GUNICORN_ACCESS_LOG": "false"}, None),
    ],
)
def test_config_access_log(
    environ: dict[str, str], accesslog: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runpy

    for name in ("K_SERVICE", "GUNICORN_ACCESS_LOG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert runpy.run_path(str(ROOT / "gunicorn.conf.py"))["accesslog"] == accesslog


# -- the variables gunicorn.conf.py reads ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GUNICORN_WORKERS", "abc"),
        ("GUNICORN_THREADS", ""),
        ("PORT", "70000"),
        ("PORT", "0"),
        ("GUNICORN_TIMEOUT", "-1"),
        ("LOG_LEVEL", "loud"),
        ("GUNICORN_ACCESS_LOG", "maybe"),
        ("GUNICORN_ACCESS_LOG", " "),
    ],
)
def test_bad_server_variable_exits_1_naming_it(name: str, value: str) -> None:
    environ = {"PORT": str(free_port()), "ENV": "development", name: value}
    result = subprocess.run(
        GUNICORN,
        cwd=ROOT,
        env=_env(**environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Error: invalid gunicorn configuration:" in result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1, result.stderr
    assert problems[0].startswith(f"  - {name} must be "), result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "Listening at" not in output
    if len(value) > 1:
        assert value not in output  # the message names the variable, never the value given


def test_lower_case_log_level_starts(serve: Callable[..., Gunicorn]) -> None:
    served = serve(ENV="development", LOG_LEVEL=" debug ")
    assert served.request("GET", "/healthz")[0] == 200
    output = served.stop()
    assert " DEBUG gunicorn.error: " in output  # gunicorn's debug lines, so the level applied
    assert "Traceback" not in output


def test_server_settings_defaults() -> None:
    assert ServerSettings.from_env({}) == (
        ServerSettings(
            port=8080, workers=2, threads=4, timeout=310, graceful_timeout=8, log_level="INFO"
        ),
        [],
    )


def test_server_settings_read_os_environ_when_given_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUNICORN_WORKERS", "3")
    assert ServerSettings.from_env()[0].workers == 3


BOUNDS = [
    ("PORT", "port", 1, 65535),
    ("GUNICORN_WORKERS", "workers", 1, 64),
    ("GUNICORN_THREADS", "threads", 1, 256),
    ("GUNICORN_TIMEOUT", "timeout", 1, 3600),
    ("GUNICORN_GRACEFUL_TIMEOUT", "graceful_timeout", 0, 3600),
]


@pytest.mark.parametrize(("name", "field", "low", "high"), BOUNDS)
def test_server_settings_whole_number_bounds(name: str, field: str, low: int, high: int) -> None:
    for good in (low, high, f" {low} ", f"+{high}"):
        settings, problems = ServerSettings.from_env({name: str(good)})
        assert (getattr(settings, field), problems) == (int(good), [])
    expected = f"{name} must be a whole number from {low} to {high}"
    default = getattr(ServerSettings(), field)
    for bad in (low - 1, high + 1, "9" * 5000):
        settings, problems = ServerSettings.from_env({name: str(bad)})
        assert problems == [f"{expected} (got a number out of range)."]
        assert getattr(settings, field) == default
    for bad in ("abc", "1.5", "1_0", "\u0661", "0x10", "1e3", "- 1"):
        assert ServerSettings.from_env({name: bad})[1] == [f"{expected} (got a non-number)."]
    for empty in ("", "  "):
        assert ServerSettings.from_env({name: empty})[1] == [f"{expected} (got an empty value)."]


@pytest.mark.parametrize("level", LOG_LEVELS)
def test_server_settings_log_level_any_case_trimmed(level: str) -> None:
    for given in (level, level.lower(), f"  {level.capitalize()}\t"):
        assert ServerSettings.from_env({"LOG_LEVEL": given}) == (
            ServerSettings(log_level=level),
            [],
        )


@pytest.mark.parametrize(("value", "got"), [("loud", "an unknown level"), ("", "an empty value")])
def test_server_settings_bad_log_level(value: str, got: str) -> None:
    settings, problems = ServerSettings.from_env({"LOG_LEVEL": value})
    assert settings.log_level == "INFO"
    assert problems == [
        f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (any case; got {got})."
    ]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, True),
        ({"K_SERVICE": "pyloto"}, False),
        ({"K_SERVICE": ""}, True),  # an empty K_SERVICE is not Cloud Run (as Settings reads it)
        *[({"K_SERVICE": "pyloto", "GUNICORN_ACCESS_LOG": w}, True) for w in TRUE_WORDS],
        *[({"GUNICORN_ACCESS_LOG": w}, False) for w in FALSE_WORDS],
        ({"GUNICORN_ACCESS_LOG": " TRUE\t"}, True),
        ({"GUNICORN_ACCESS_LOG": "Off"}, False),
    ],
)
def test_server_settings_access_log(environ: dict[str, str], expected: bool) -> None:
    assert ServerSettings.from_env(environ) == (ServerSettings(access_log=expected), [])


@pytest.mark.parametrize(
    ("value", "got"), [("maybe", "something else"), ("", "an empty value"), ("2", "something else")]
)
def test_server_settings_bad_access_log(value: str, got: str) -> None:
    settings, problems = ServerSettings.from_env(
        {"K_SERVICE": "pyloto", "GUNICORN_ACCESS_LOG": value}
    )
    assert settings.access_log is False  # Cloud Run's default, but the start stops anyway
    assert problems == [
        "GUNICORN_ACCESS_LOG must be true or false (also 1/0, yes/no, on/off, any case; "
        f"got {got})."
    ]


def test_server_settings_report_every_problem_without_values() -> None:
    environ = {
        "PORT": "70000",
        "GUNICORN_WORKERS": "many-workers",
        "GUNICORN_THREADS": "",
        "GUNICORN_TIMEOUT": "-1",
        "GUNICORN_GRACEFUL_TIMEOUT": "3601",
        "LOG_LEVEL": "very-loud",
        "GUNICORN_ACCESS_LOG": "sometimes",
    }
    settings, problems = ServerSettings.from_env(environ)
    assert settings == ServerSettings()
    assert [problem.split(" ", 1)[0] for problem in problems] == list(environ)
    assert all(problem.count("\n") == 0 for problem in problems)
    for value in ("70000", "many-workers", "3601", "very-loud", "sometimes"):
        assert value not in "".join(problems)


def test_bad_server_variables_stop_the_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """All problems at once, as the one message SystemExit prints (gunicorn does not catch it)."""
    import runpy

    for name in ("PORT", "GUNICORN_THREADS", "GUNICORN_TIMEOUT", "GUNICORN_GRACEFUL_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GUNICORN_WORKERS", "abc")
    monkeypatch.setenv("LOG_LEVEL", "")
    with pytest.raises(SystemExit) as raised:
        runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert str(raised.value) == (
        "Error: invalid gunicorn configuration:\n"
        "  - GUNICORN_WORKERS must be a whole number from 1 to 64 (got a non-number).\n"
        "  - LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL "
        "(any case; got an empty value)."
    )
