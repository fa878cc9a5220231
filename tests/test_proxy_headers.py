"""Which X-Forwarded-* headers are trusted, asked of the real app served by the real gunicorn.

Every connection comes from 127.0.0.1; the forwarded values are only header values. gunicorn
itself trusts none of them (``forwarded_allow_ips = ""``), so ProxyFix, set from
TRUSTED_PROXY_HOPS, is the one place that decides; and X-Forwarded-Host is never trusted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask, request
from flask.cli import ScriptInfo
from werkzeug.middleware.proxy_fix import ProxyFix

from pyloto_corp import SessionStore, Settings
from pyloto_corp.cli import session_store_cli
from tests.conftest import SECRET
from tests.services import Gunicorn, RedisServer

#: What a client (or anything between it and the app) can put in a request.
FORGED = {
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-For": "203.0.113.9",
}

Serve = Callable[..., Gunicorn]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    started: list[Gunicorn] = []

    def start(app: str = "factory", **environ: str) -> Gunicorn:
        server = Gunicorn(
            tmp_path, {"GUNICORN_THREADS": "2", **environ}, app=f"tests.proxy_app:{app}()"
        )
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def _seen(server: Gunicorn, headers: dict[str, str]) -> dict[str, str]:
    status, _, body = server.request("GET", "/_test/url", headers)
    assert status == 200, body
    seen: dict[str, str] = json.loads(body)
    return seen


def test_no_trusted_proxy_trusts_no_forwarded_header(serve: Serve) -> None:
    server = serve(ENV="development", SESSION_STORE_BACKEND="memory", TRUSTED_PROXY_HOPS="0")
    assert _seen(server, FORGED) == {
        "external": f"http://127.0.0.1:{server.port}/healthz",
        "scheme": "http",
        "remote_addr": "127.0.0.1",
    }


def test_default_outside_cloud_run_trusts_no_forwarded_header(serve: Serve) -> None:
    server = serve(ENV="development", SESSION_STORE_BACKEND="memory")
    assert _seen(server, FORGED)["scheme"] == "http"
    assert _seen(server, FORGED)["remote_addr"] == "127.0.0.1"
    # gunicorn's own X-Forwarded-Proto handling is off, not only ProxyFix's.
    assert _seen(server, {"X-Forwarded-Ssl": "on", "X-Forwarded-Protocol": "ssl"})["scheme"] == (
        "http"
    )


def _assert_one_hop_trusted(server: Gunicorn) -> None:
    assert _seen(server, FORGED) == {
        "external": f"https://127.0.0.1:{server.port}/healthz",
        "scheme": "https",
        "remote_addr": "203.0.113.9",
    }
    # Without the headers, the connection's own facts.
    assert _seen(server, {}) == {
        "external": f"http://127.0.0.1:{server.port}/healthz",
        "scheme": "http",
        "remote_addr": "127.0.0.1",
    }


def test_one_trusted_hop_trusts_proto_and_for_but_not_host(serve: Serve) -> None:
    server = serve(ENV="development", SESSION_STORE_BACKEND="memory", TRUSTED_PROXY_HOPS="1")
    _assert_one_hop_trusted(server)
    assert "evil.example" not in json.dumps(_seen(server, FORGED))


def test_cloud_run_trusts_one_hop_but_not_the_host(serve: Serve, redis_server: RedisServer) -> None:
    server = serve(
        ENV="development",
        K_SERVICE="svc",
        SESSION_STORE_BACKEND="redis",
        REDIS_URL=redis_server.url,
        SECRET_KEY=SECRET,
    )
    _assert_one_hop_trusted(server)
    assert "evil.example" not in json.dumps(_seen(server, FORGED))


def _info(app: Flask) -> dict[str, object]:
    result = CliRunner().invoke(
        session_store_cli, ["info", "--json"], obj=ScriptInfo(create_app=lambda: app)
    )
    assert result.exit_code == 0, result.output
    values: dict[str, object] = json.loads(result.output)
    return values


def test_a_host_app_behind_a_proxy_trusts_its_configured_hops(serve: Serve) -> None:
    """A host app (no factory) with TRUSTED_PROXY_HOPS=1 sees https and the client's address,
    served by the real gunicorn; X-Forwarded-Host stays untrusted."""
    server = serve(
        "host", ENV="development", SESSION_STORE_BACKEND="memory", TRUSTED_PROXY_HOPS="1"
    )
    _assert_one_hop_trusted(server)
    assert "evil.example" not in json.dumps(_seen(server, FORGED))
    untrusting = serve("host", ENV="development", SESSION_STORE_BACKEND="memory")
    assert _seen(untrusting, FORGED)["remote_addr"] == "127.0.0.1"


@pytest.mark.parametrize("hops", [0, 1, 3])
def test_info_shows_the_hops_the_app_applies(hops: int) -> None:
    """A host app's TRUSTED_PROXY_HOPS is applied, and info shows the count applied."""
    app = Flask(__name__)
    app.config["TRUSTED_PROXY_HOPS"] = hops
    SessionStore(app)

    @app.get("/addr")
    def addr() -> str:
        return str(request.remote_addr)

    chain = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    seen = app.test_client().get("/addr", headers={"X-Forwarded-For": ", ".join(chain)}).text
    assert seen == (chain[-hops] if hops else "127.0.0.1")
    assert _info(app)["TRUSTED_PROXY_HOPS"] == hops


def test_info_shows_the_host_apps_own_proxy_fix() -> None:
    app = Flask(__name__)
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    SessionStore(app)
    assert _info(app)["TRUSTED_PROXY_HOPS"] == (
        "x_for=1, x_proto=1, x_host=1 (the app's own ProxyFix)"
    )
    later = Flask(__name__)
    SessionStore(later, Settings(environment="test", trusted_proxy_hops=1))
    later.wsgi_app = ProxyFix(later.wsgi_app, x_for=3, x_proto=3)  # type: ignore[method-assign]
    assert _info(later)["TRUSTED_PROXY_HOPS"] == 3
