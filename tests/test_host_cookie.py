"""The ``__Host-`` session cookie (OWASP ASVS 4.0.3 V3.4.4, 5.0 V3.3.1).

Deployed, the cookie is ``__Host-session``: Secure, ``Path=/``, no ``Domain``, so a browser
refuses it from a sibling subdomain or a plain-HTTP answer. A name the host chose is kept; a
``__Host-``/``__Secure-`` name the browser would drop is refused at init, by the setting to
change. The upgrade from ``session`` logs no one out: a request carrying only the old cookie
keeps its session, gets the new cookie, and the old one is deleted; but only a session stored
before the upgrade moves so (the old name is exactly what a sibling subdomain can set).

Against a real redis-server and the Firestore emulator, over https.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
from flask import Flask, session
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from pyloto_corp import ConfigurationError, SessionStore, Settings
from pyloto_corp.config.settings import Var
from pyloto_corp.session_store.base import HOST_COOKIE
from tests.conftest import DEPLOYED_COOKIE, LOCAL_COOKIE, MakeApp
from tests.session_store.conftest import user_routes
from tests.stored import stored_session

HTTPS = "https://localhost"
STORE_LOGGER = "pyloto_corp.session_store"


@pytest.fixture(params=["redis_env", "firestore_env"])
def store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    env: dict[str, str] = request.getfixturevalue(request.param)
    return env


def _client(app: Flask) -> FlaskClient:
    """A browser that sends exactly the cookies each call names (no cookie jar)."""
    return app.test_client(use_cookies=False)


def _cookies(response: TestResponse) -> dict[str, dict[str, str | None]]:
    """Each cookie the response sets: its value and attributes (lower-case names)."""
    found: dict[str, dict[str, str | None]] = {}
    for header in response.headers.getlist("Set-Cookie"):
        pair, *attributes = (part.strip() for part in header.split(";"))
        name, _, value = pair.partition("=")
        parsed: dict[str, str | None] = {"value": value}
        for attribute in attributes:
            key, equals, argument = attribute.partition("=")
            parsed[key.lower()] = argument if equals else None
        found[name] = parsed
    return found


def _browser_keeps(name: str, cookie: dict[str, str | None], scheme: str) -> bool:
    """What a browser does with the cookie (RFC 6265bis 5.7 step 20-21: the name's prefix
    decides; the prefix matched case-insensitively)."""
    lowered = name.lower()
    if "secure" in cookie and scheme != "https":
        return False
    if lowered.startswith(("__secure-", "__host-")) and "secure" not in cookie:
        return False
    if lowered.startswith("__host-"):
        return "domain" not in cookie and cookie.get("path") == "/"
    return True


def _is_deletion(cookie: dict[str, str | None]) -> bool:
    return cookie["value"] == "" and cookie.get("max-age") == "0"


def _sid(response: TestResponse, name: str = DEPLOYED_COOKIE) -> str:
    value = _cookies(response)[name]["value"]
    assert value
    return value


# -- the name and flags ---------------------------------------------------------------------------


def test_deployed_the_cookie_is_a_host_cookie_the_browser_keeps(
    make_app: MakeApp, store_env: dict[str, str]
) -> None:
    app = make_app(**store_env)
    assert app.config["SESSION_COOKIE_NAME"] == DEPLOYED_COOKIE
    response = _client(app).post("/session/counter", base_url=HTTPS)
    cookies = _cookies(response)
    assert list(cookies) == [DEPLOYED_COOKIE]
    cookie = cookies[DEPLOYED_COOKIE]
    assert "secure" in cookie
    assert "httponly" in cookie
    assert cookie["path"] == "/"
    assert cookie["samesite"] == "Lax"
    assert "domain" not in cookie
    assert _browser_keeps(DEPLOYED_COOKIE, cookie, "https")
    again = _client(app).get(
        "/session/counter", headers={"Cookie": f"{DEPLOYED_COOKIE}={cookie['value']}"}
    )
    assert again.json == {"counter": 1}


def test_on_cloud_run_behind_its_front_end_too(
    make_app: MakeApp, redis_env: dict[str, str]
) -> None:
    """K_SERVICE alone makes the instance deployed; Cloud Run's front end says https."""
    environ = {**redis_env, Var.K_SERVICE: "api"}
    del environ[Var.ENV]
    app = make_app(**environ)
    response = _client(app).post("/session/counter", headers={"X-Forwarded-Proto": "https"})
    cookie = _cookies(response)[DEPLOYED_COOKIE]
    assert _browser_keeps(DEPLOYED_COOKIE, cookie, "https")


@pytest.mark.parametrize("environment", ["development", "test", "local"])
def test_elsewhere_the_cookie_stays_session(make_app: MakeApp, environment: str) -> None:
    """A local browser on http:// keeps it (a __Host- cookie would need Secure)."""
    app = make_app(ENV=environment)
    response = _client(app).post("/session/counter")
    cookie = _cookies(response)[LOCAL_COOKIE]
    assert "secure" not in cookie
    assert _browser_keeps(LOCAL_COOKIE, cookie, "http")


@pytest.mark.parametrize("name", ["session", "sid", "__Secure-sid", "__Host-sid"])
def test_a_name_set_in_the_environment_is_kept(
    make_app: MakeApp, redis_env: dict[str, str], name: str
) -> None:
    """``SESSION_COOKIE_NAME=session`` pins the old name when deployed (nothing moves)."""
    app = make_app(**redis_env, SESSION_COOKIE_NAME=name)
    response = _client(app).post("/session/counter", base_url=HTTPS)
    cookies = _cookies(response)
    assert list(cookies) == [name]
    assert _browser_keeps(name, cookies[name], "https")


def test_a_name_the_host_app_configured_is_kept(redis_env: dict[str, str]) -> None:
    app = Flask(__name__)
    app.config.update(SESSION_COOKIE_NAME="my_sid")
    SessionStore(app, Settings.from_env(redis_env))
    assert app.config["SESSION_COOKIE_NAME"] == "my_sid"

    @app.post("/write")
    def write() -> dict[str, bool]:
        session["x"] = 1
        return {"ok": True}

    assert list(_cookies(_client(app).post("/write", base_url=HTTPS))) == ["my_sid"]


def test_a_host_domain_keeps_the_default_name_and_says_why(
    redis_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A host that shares its cookie across subdomains (SESSION_COOKIE_DOMAIN) cannot have a
    __Host- cookie: the default stays ``session``, and the init log says why."""
    app = Flask(__name__)
    app.config.update(SESSION_COOKIE_DOMAIN="example.com")
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        SessionStore(app, Settings.from_env(redis_env))
    assert app.config["SESSION_COOKIE_NAME"] == LOCAL_COOKIE
    messages = [record.getMessage() for record in caplog.records]
    assert any("not '__Host-session': SESSION_COOKIE_DOMAIN" in line for line in messages)


# -- refusals -------------------------------------------------------------------------------------

DOMAIN_PROBLEM = (
    "SESSION_COOKIE_NAME starts with __Host-, and SESSION_COOKIE_DOMAIN is set: browsers drop "
    "such a cookie (it must have no Domain); remove SESSION_COOKIE_DOMAIN, or choose a name "
    "without the prefix."
)
PATH_PROBLEM = (
    "SESSION_COOKIE_NAME starts with __Host-, and the cookie's path (SESSION_COOKIE_PATH, else "
    "APPLICATION_ROOT) is not /: browsers drop such a cookie; set SESSION_COOKIE_PATH to /, or "
    "choose a name without the prefix."
)


def _secure_problem(prefix: str) -> str:
    return (
        f"SESSION_COOKIE_NAME starts with {prefix}, and SESSION_COOKIE_SECURE is false: browsers "
        "drop such a cookie; set SESSION_COOKIE_SECURE=true (browsers keep Secure cookies from "
        "http://localhost), or choose a name without the prefix."
    )


@pytest.mark.parametrize(
    ("environ", "config", "problems"),
    [
        ({}, {"SESSION_COOKIE_DOMAIN": "example.com"}, [DOMAIN_PROBLEM]),
        ({}, {"SESSION_COOKIE_PATH": "/app"}, [PATH_PROBLEM]),
        ({}, {"APPLICATION_ROOT": "/app"}, [PATH_PROBLEM]),
        (
            {},
            {"SESSION_COOKIE_DOMAIN": ".example.com", "SESSION_COOKIE_PATH": "/app"},
            [DOMAIN_PROBLEM, PATH_PROBLEM],
        ),
        ({Var.SESSION_COOKIE_NAME: "__HOST-sid"}, {"SESSION_COOKIE_PATH": "/a"}, [PATH_PROBLEM]),
        ({Var.ENV: "development"}, {}, [_secure_problem("__Host-")]),
        (
            {Var.ENV: "development", Var.SESSION_COOKIE_NAME: "__Secure-sid"},
            {},
            [_secure_problem("__Secure-")],
        ),
    ],
)
def test_a_prefixed_name_the_browser_would_drop_is_refused_by_name(
    redis_env: dict[str, str],
    environ: dict[str, str],
    config: dict[str, str],
    problems: list[str],
) -> None:
    """Refused at init in one ConfigurationError, each problem naming the setting to change."""
    app = Flask(__name__)
    app.config.update(config)
    env = {**redis_env, Var.SESSION_COOKIE_NAME: "__Host-sid", **environ}
    with pytest.raises(ConfigurationError) as caught:
        SessionStore(app, Settings.from_env(env))
    assert list(caught.value.problems) == problems


def test_the_same_rules_without_an_app(redis_env: dict[str, str]) -> None:
    """Pure validation: what ``check`` runs (``check --env production`` too)."""
    settings = Settings.from_env({**redis_env, Var.SESSION_COOKIE_NAME: "__Host-sid"})
    assert settings.validate() == []
    hosted = dataclasses.replace(
        settings, session_cookie_domain="example.com", session_cookie_path="/app"
    )
    assert hosted.validate() == [DOMAIN_PROBLEM, PATH_PROBLEM]
    # The default name steps aside instead (and advice() says why).
    default = dataclasses.replace(hosted, session_cookie_name=None)
    assert default.validate() == []
    assert default.cookie_name == LOCAL_COOKIE
    local = Settings(environment="development", session_cookie_name="__Host-sid")
    assert local.validate() == [_secure_problem("__Host-")]
    secure_local = Settings(
        environment="development", session_cookie_name="__Host-sid", session_cookie_secure=True
    )
    assert secure_local.validate() == []


# -- the upgrade from `session` -------------------------------------------------------------------


def _releases(make_app: MakeApp, env: dict[str, str]) -> tuple[Flask, Flask]:
    """The previous release (cookie ``session``; its records carry no HOST_COOKIE, as the
    previous release's never did) and this one, on the same store."""
    before = user_routes(make_app(**env, SESSION_COOKIE_NAME=LOCAL_COOKIE))
    after = user_routes(make_app(**env))

    @after.post("/counter")
    def count() -> dict[str, object]:
        session["counter"] = session.get("counter", 0) + 1
        return {"counter": session["counter"], "user": session.get("_user_id")}

    @after.post("/logout")
    def logout() -> dict[str, bool]:
        session.clear()
        return {"ok": True}

    return before, after


def _signed_in_before(before: Flask) -> str:
    response = _client(before).post("/as/ana", base_url=HTTPS)
    assert list(_cookies(response)) == [LOCAL_COOKIE]
    return _sid(response, LOCAL_COOKIE)


def _as_before(sid: str) -> dict[str, str]:
    return {"Cookie": f"{LOCAL_COOKIE}={sid}"}


def test_the_upgrade_logs_no_one_out(make_app: MakeApp, store_env: dict[str, str]) -> None:
    before, after = _releases(make_app, store_env)
    sid = _signed_in_before(before)

    response = _client(after).get("/whoami", headers=_as_before(sid), base_url=HTTPS)
    assert response.json == {"user": "ana"}
    cookies = _cookies(response)
    assert set(cookies) == {DEPLOYED_COOKIE, LOCAL_COOKIE}
    moved = cookies[DEPLOYED_COOKIE]
    assert moved["value"] == sid  # the same session, under the new name
    assert _browser_keeps(DEPLOYED_COOKIE, moved, "https")
    assert _is_deletion(cookies[LOCAL_COOKIE])
    assert cookies[LOCAL_COOKIE]["path"] == "/"
    assert "no-store" in response.headers["Cache-Control"]

    # A browser applies both: it holds the new cookie only, and stays signed in.
    browser = after.test_client()
    browser.set_cookie(LOCAL_COOKIE, sid)
    assert browser.get("/whoami", base_url=HTTPS).json == {"user": "ana"}
    assert browser.get_cookie(LOCAL_COOKIE) is None
    held = browser.get_cookie(DEPLOYED_COOKIE)
    assert held is not None
    assert held.value == sid
    settled = browser.get("/whoami", base_url=HTTPS)
    assert settled.json == {"user": "ana"}
    assert "Set-Cookie" not in settled.headers


def test_a_write_under_the_old_cookie_keeps_the_session(
    make_app: MakeApp, store_env: dict[str, str]
) -> None:
    before, after = _releases(make_app, store_env)
    sid = _signed_in_before(before)
    response = _client(after).post("/counter", headers=_as_before(sid), base_url=HTTPS)
    assert response.json == {"counter": 1, "user": "ana"}
    cookies = _cookies(response)
    assert cookies[DEPLOYED_COOKIE]["value"] == sid
    assert _is_deletion(cookies[LOCAL_COOKIE])
    store_id = SessionStore.state(after).interface.store_id(sid)
    stored = stored_session(after, store_id)
    assert stored is not None
    assert stored[HOST_COOKIE] is True  # written under the new name now


def test_a_login_under_the_old_cookie_moves_to_a_new_host_cookie(
    make_app: MakeApp, store_env: dict[str, str]
) -> None:
    before, after = _releases(make_app, store_env)
    sid = _signed_in_before(before)
    response = _client(after).post("/as/bob", headers=_as_before(sid), base_url=HTTPS)
    cookies = _cookies(response)
    new = cookies[DEPLOYED_COOKIE]["value"]
    assert new
    assert new != sid
    assert _is_deletion(cookies[LOCAL_COOKIE])
    signed_in = _client(after).get("/whoami", headers={"Cookie": f"{DEPLOYED_COOKIE}={new}"})
    assert signed_in.json == {"user": "bob"}
    # The old id is retired, under either name: a request still carrying it (sent before the
    # login's answer arrived) neither writes nor sets a cookie over the login's.
    assert _client(after).get("/whoami", headers=_as_before(sid)).json == {"user": None}
    late = _client(after).post("/counter", headers=_as_before(sid), base_url=HTTPS)
    assert late.status_code == 409
    assert DEPLOYED_COOKIE not in _cookies(late)


def test_a_logout_under_the_old_cookie_deletes_both(
    make_app: MakeApp, store_env: dict[str, str]
) -> None:
    before, after = _releases(make_app, store_env)
    sid = _signed_in_before(before)
    response = _client(after).post("/logout", headers=_as_before(sid), base_url=HTTPS)
    cookies = _cookies(response)
    assert _is_deletion(cookies[LOCAL_COOKIE])
    assert _is_deletion(cookies[DEPLOYED_COOKIE])
    assert stored_session(after, SessionStore.state(after).interface.store_id(sid)) is None


def test_a_session_written_since_the_upgrade_is_not_taken_from_the_old_name(
    make_app: MakeApp, store_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A sibling subdomain can set ``session`` for the whole domain (the attack the prefix
    stops): planting its own session id there signs no one in as the attacker. The session
    itself is left alone, and its own cookie still works."""
    _, after = _releases(make_app, store_env)
    attacker = _sid(_client(after).post("/as/mallory", base_url=HTTPS))
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        planted = _client(after).get("/whoami", headers=_as_before(attacker), base_url=HTTPS)
    assert planted.json == {"user": None}
    assert "Set-Cookie" not in planted.headers
    assert any("previous name" in record.getMessage() for record in caplog.records)
    assert attacker not in caplog.text
    own = _client(after).get("/whoami", headers={"Cookie": f"{DEPLOYED_COOKIE}={attacker}"})
    assert own.json == {"user": "mallory"}


def test_the_host_cookie_wins_over_the_old_one(
    make_app: MakeApp, store_env: dict[str, str]
) -> None:
    before, after = _releases(make_app, store_env)
    old = _signed_in_before(before)
    new = _sid(_client(after).post("/as/bob", base_url=HTTPS))
    both = {"Cookie": f"{LOCAL_COOKIE}={old}; {DEPLOYED_COOKIE}={new}"}
    response = _client(after).get("/whoami", headers=both, base_url=HTTPS)
    assert response.json == {"user": "bob"}
    assert "Set-Cookie" not in response.headers


def test_a_chosen_host_name_moves_from_the_name_without_its_prefix(
    make_app: MakeApp, redis_env: dict[str, str]
) -> None:
    before = user_routes(make_app(**redis_env, SESSION_COOKIE_NAME="sid"))
    after = user_routes(make_app(**redis_env, SESSION_COOKIE_NAME="__Host-sid"))
    sid = _sid(_client(before).post("/as/ana", base_url=HTTPS), "sid")
    response = _client(after).get("/whoami", headers={"Cookie": f"sid={sid}"}, base_url=HTTPS)
    assert response.json == {"user": "ana"}
    cookies = _cookies(response)
    assert cookies["__Host-sid"]["value"] == sid
    assert _is_deletion(cookies["sid"])


def test_a_pinned_old_name_reads_nothing_else_and_stamps_nothing(
    make_app: MakeApp, redis_env: dict[str, str]
) -> None:
    """``SESSION_COOKIE_NAME=session`` deployed: the previous release's behaviour, exactly."""
    app = user_routes(make_app(**redis_env, SESSION_COOKIE_NAME=LOCAL_COOKIE))
    sid = _sid(_client(app).post("/as/ana", base_url=HTTPS), LOCAL_COOKIE)
    stored = stored_session(app, SessionStore.state(app).interface.store_id(sid))
    assert stored is not None
    assert HOST_COOKIE not in stored
    other = _client(app).get("/whoami", headers={"Cookie": f"{DEPLOYED_COOKIE}={sid}"})
    assert other.json == {"user": None}
