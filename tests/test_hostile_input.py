"""Hostile cookies: each yields a fresh anonymous session (or a 4xx), never a 500 and never
another user's session. Generated with hypothesis, against every backend's real service."""

from __future__ import annotations

import string

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyloto_corp.config.settings import previous_cookie_name
from tests.conftest import SECRET, MakeApp, cookie_name

VICTIM_COUNTER = 7


@pytest.fixture(params=["memory", "redis", "firestore"])
def victim(request: pytest.FixtureRequest, make_app: MakeApp) -> tuple[Flask, str]:
    """An app with one victim session (counter 7) and that session's id."""
    if request.param == "memory":
        app = make_app(ENV="test")
    else:
        app = make_app(**request.getfixturevalue(f"{request.param}_env"))
    client = app.test_client()
    for _ in range(VICTIM_COUNTER):
        response = client.post("/session/counter", base_url="https://localhost")
    cookie = client.get_cookie(cookie_name(app))
    assert cookie is not None
    assert response.json == {"counter": VICTIM_COUNTER}
    return app, cookie.value


def _attack(app: Flask, raw_cookie_value: str) -> None:
    """Send ``<cookie name>=<value>`` as raw header bytes (latin-1, as WSGI sees them); when
    deployed, under the name the cookie had before ``__Host-`` too (it is read when alone)."""
    name = cookie_name(app)
    for sent in filter(None, (name, previous_cookie_name(name))):
        _attack_as(app, f"{sent}={raw_cookie_value}")


def _attack_as(app: Flask, cookie: str) -> None:
    client = app.test_client(use_cookies=False)  # with a cookie jar, Werkzeug drops the header
    headers = {"Cookie": cookie}
    response = client.get("/session/counter", headers=headers, base_url="https://localhost")
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.status_code
    if response.status_code == 200:
        assert response.json == {"counter": 0}
    written = client.post("/session/counter", headers=headers, base_url="https://localhost")
    assert written.status_code == 200 or 400 <= written.status_code < 500
    if written.status_code == 200:
        assert written.json == {"counter": 1}


def _header_safe(value: str) -> bool:
    return not any(c in value for c in "\r\n\x00")


HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

glob_and_path = st.text(alphabet="*?[]^-\\/.:%{}" + string.ascii_letters, min_size=1, max_size=64)


@HYPOTHESIS
@given(value=st.text(min_size=1, max_size=300).filter(_header_safe))
def test_random_unicode_cookies(victim: tuple[Flask, str], value: str) -> None:
    _attack(victim[0], value.encode("utf-8").decode("latin-1"))


@HYPOTHESIS
@given(value=st.binary(min_size=1, max_size=300).map(lambda b: b.decode("latin-1")))
def test_non_utf8_bytes(victim: tuple[Flask, str], value: str) -> None:
    if _header_safe(value):
        _attack(victim[0], value)


@HYPOTHESIS
@given(value=glob_and_path)
def test_path_and_redis_glob_characters(victim: tuple[Flask, str], value: str) -> None:
    _attack(victim[0], value)


@HYPOTHESIS
@given(data=st.data())
def test_victim_id_with_one_character_flipped(
    victim: tuple[Flask, str], data: st.DataObject
) -> None:
    app, sid = victim
    index = data.draw(st.integers(0, len(sid) - 1))
    alphabet = string.ascii_letters + string.digits + "-_"
    replacement = data.draw(st.sampled_from([c for c in alphabet if c != sid[index]]))
    _attack(app, sid[:index] + replacement + sid[index + 1 :])


@pytest.mark.parametrize("size", [4_096, 16_384, 100_000])
def test_oversized_cookies(victim: tuple[Flask, str], size: int) -> None:
    _attack(victim[0], "A" * size)


def test_the_victim_still_has_its_session(victim: tuple[Flask, str]) -> None:
    """The control: the same request with the real id does see the victim's data."""
    app, sid = victim
    client = app.test_client(use_cookies=False)
    headers = {"Cookie": f"{cookie_name(app)}={sid}"}
    response = client.get("/session/counter", headers=headers, base_url="https://localhost")
    assert response.json == {"counter": VICTIM_COUNTER}


def test_signing_is_not_offered() -> None:
    """Flask-Session's signer is deprecated; ids are 256-bit random, so nothing to sign."""
    app = Flask(__name__)
    from pyloto_corp import SessionStore, Settings

    SessionStore(app, Settings(environment="test", secret_key=SECRET))
    assert app.session_interface.use_signer is False  # type: ignore[attr-defined]
