"""Values Flask's own cookie session stores, stored by a real view and read back in the next
request on memory, redis and firestore, next to a plain Flask app on its signed cookie; and
Flask-Dance's OAuth 2 login, which keeps an ``OAuth2Token`` (a dict subclass) in the session.

The rule (``tests/flask_values.py``): where Flask's cookie session gives a value back, ours gives
back the same or the original exactly, as its base type, with no class name in the store.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from flask import Flask, Response, session
from flask_dance.consumer.requests import OAuth2Session
from flask_dance.contrib.github import make_github_blueprint
from oauthlib.oauth2.rfc6749.tokens import OAuth2Token
from requests.adapters import BaseAdapter
from werkzeug.test import TestResponse

from tests.conftest import MakeApp
from tests.flask_values import CASES, REFUSED, as_flask_allows, typed
from tests.session_store.conftest import HARNESSES, Harness, sid_of

BACKENDS = ("memory", "redis", "firestore")
#: Module paths and class names of the values stored: none may reach the store (reading a
#: record never imports or builds an application class).
CLASS_NAMES = (
    b"tests.flask_values",
    b"collections",
    b"oauthlib",
    b"decimal",
    b"datetime",
    b"enum",
    b"OAuth2Token",
    b"OrderedDict",
    b"Decimal",
    b"Money",
    b"LineItem",
    b"Cart",
)
BASE_URL = "https://localhost"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, make_app: MakeApp) -> Harness:
    return HARNESSES[request.param](make_app, request)


def flask_cookie_app() -> Flask:
    """A plain Flask app on its own signed-cookie session: the reference behaviour."""
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "reference-app-secret-key-" + "x" * 16
    return app


def exact(value: Any) -> Any:
    """``value`` with the exact type of every node and dict order: what ``==`` cannot tell."""
    if isinstance(value, dict):
        return (type(value), [(key, exact(item)) for key, item in value.items()])
    if isinstance(value, list | tuple):
        return (type(value), [exact(item) for item in value])
    return (type(value), typed(value))


# --- every value, through a view ------------------------------------------------------------


def add_value_routes(app: Flask, box: dict[str, Any]) -> None:
    """``/put/<case>`` stores that case's value; ``/take`` reads it back into ``box``."""

    @app.get("/put/<name>")
    def put(name: str) -> str:
        session["v"] = CASES[name].value
        return "stored"

    @app.get("/take")
    def take() -> str:
        box["got"] = session.get("v", REFUSED)
        return "read"


def store_and_read(app: Flask, box: dict[str, Any], name: str) -> tuple[Any, TestResponse]:
    """What the next request reads after ``/put/<name>``, or REFUSED."""
    client = app.test_client()
    stored = client.get(f"/put/{name}", base_url=BASE_URL, headers={"Accept": "application/json"})
    if stored.status_code == 500:
        return REFUSED, stored
    assert stored.status_code == 200, stored.text
    assert client.get("/take", base_url=BASE_URL).status_code == 200
    return box.pop("got"), stored


def test_every_value_flask_keeps_comes_back_from_the_store(
    backend: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    ours_app, ours_box = backend.make(), {}
    add_value_routes(ours_app, ours_box)
    flask_app, flask_box = flask_cookie_app(), {}
    add_value_routes(flask_app, flask_box)

    problems = []
    for name, case in CASES.items():
        from_flask, _ = store_and_read(flask_app, flask_box, name)
        assert typed(from_flask) == typed(case.flask), f"{name}: Flask now gives {from_flask!r}"

        ours, response = store_and_read(ours_app, ours_box, name)
        if ours is REFUSED:
            assert response.json is not None
            assert response.json["error"] == "session_unstorable", response.json
            # The body is generic; the detail is logged under the same correlation id.
            correlation = response.json["correlation_id"]
            assert any(
                correlation in r.getMessage() and "session['v'] is " in r.getMessage()
                for r in caplog.records
            ), response.json
        else:
            sid = sid_of(response)
            stored = backend.read_raw(ours_app, backend.store_id(ours_app, sid))
            assert isinstance(stored, dict)
            named = [word for word in CLASS_NAMES if word in stored["v"]]
            assert not named, f"{name}: the store holds {named}"
        if exact(ours) != exact(case.ours):
            problems.append(f"{name}: read back {ours!r}, expected {case.ours!r}")
        if (why := as_flask_allows(ours, from_flask, case.value)) is not None:
            problems.append(f"{name}: {why}")
    assert not problems, "\n".join(problems)


# --- Flask-Dance ------------------------------------------------------------------------------

ACCESS_TOKEN = "gho_16C7e42F292c6912E7710c838347Ae178B4a"
TOKEN_URL = "https://github.com/login/oauth/access_token"
USER_URL = "https://api.github.com/user"


class GitHubStandIn(BaseAdapter):
    """Answers the two GitHub endpoints the login uses, in process: nothing leaves the machine.
    The token endpoint wants the code it issued; the API wants that token as a bearer."""

    def __init__(self) -> None:
        super().__init__()
        self.code = "code-from-the-authorize-redirect"
        self.calls: list[str] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.calls.append(f"{request.method} {request.url}")
        if request.method == "POST" and request.url == TOKEN_URL:
            form = parse_qs(str(request.body))
            if form.get("code") != [self.code]:
                return self._answer(request, 400, {"error": "bad_verification_code"})
            body = {"access_token": ACCESS_TOKEN, "token_type": "bearer", "scope": "read:user"}
            return self._answer(request, 200, {**body, "expires_in": 28800})
        if request.method == "GET" and request.url == USER_URL:
            if request.headers.get("Authorization") != f"Bearer {ACCESS_TOKEN}":
                return self._answer(request, 401, {"message": "Bad credentials"})
            return self._answer(request, 200, {"login": "octocat"})
        return self._answer(request, 404, {"message": "Not Found"})

    def close(self) -> None:
        pass

    @staticmethod
    def _answer(request: requests.PreparedRequest, status: int, body: object) -> requests.Response:
        response = requests.Response()
        response.status_code = status
        response.headers["Content-Type"] = "application/json"
        response._content = json.dumps(body).encode()
        response.request = request
        response.url = str(request.url)
        return response


def add_github_login(app: Flask, github: GitHubStandIn) -> list[type]:
    """Flask-Dance's GitHub blueprint, as its docs set it up, with every HTTP request of its
    requests session answered by ``github``; ``/whoami`` is the page a user lands on. Returns
    the types of the token values the views left in the session, as they were put there."""

    class Session(OAuth2Session):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.mount("https://", github)
            self.mount("http://", github)

    blueprint = make_github_blueprint(
        client_id="client-id",
        client_secret="client-secret",
        session_class=Session,
        redirect_to="whoami",
    )
    app.register_blueprint(blueprint, url_prefix="/login")

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        if not blueprint.session.authorized:
            return {"login": None}
        user = blueprint.session.get("/user")
        assert user.ok, user.text
        stored = session["github_oauth_token"]
        return {"login": user.json()["login"], "stored_as": type(stored).__name__}

    @app.get("/logout")
    def logout() -> str:
        del blueprint.token
        return "bye"

    put: list[type] = []

    @app.after_request
    def record(response: Response) -> Response:
        if session.modified and "github_oauth_token" in session:
            put.append(type(session["github_oauth_token"]))
        return response

    return put


def log_in_with_github(app: Flask, github: GitHubStandIn) -> TestResponse:
    """The OAuth 2 dance as a browser does it: to GitHub's authorize page (not fetched: its
    state is read from the redirect), back to the callback with a code, on to /whoami."""
    client = app.test_client()
    to_github = client.get("/login/github", base_url=BASE_URL)
    assert to_github.status_code == 302, to_github.text
    location = urlsplit(to_github.headers["Location"])
    assert (location.scheme, location.netloc) == ("https", "github.com")
    state = parse_qs(location.query)["state"][0]
    back = client.get(
        "/login/github/authorized",
        query_string={"code": github.code, "state": state},
        base_url=BASE_URL,
    )
    if back.status_code != 302:
        return back
    assert back.headers["Location"].endswith("/whoami"), back.headers["Location"]
    me = client.get("/whoami", base_url=BASE_URL)
    assert me.status_code == 200, me.text
    assert client.get("/logout", base_url=BASE_URL).status_code == 200
    assert client.get("/whoami", base_url=BASE_URL).json == {"login": None}
    return me


def test_flask_dance_github_login_keeps_its_token_in_our_session(backend: Harness) -> None:
    github = GitHubStandIn()
    app = backend.make()
    put = add_github_login(app, github)
    me = log_in_with_github(app, github)
    assert me.status_code == 200, me.get_data(as_text=True)  # was a 500 session_unstorable
    assert put == [OAuth2Token]  # what Flask-Dance puts in the session: a dict subclass
    assert me.json == {"login": "octocat", "stored_as": "dict"}
    assert github.calls == [f"POST {TOKEN_URL}", f"GET {USER_URL}"]

    # The same login on Flask's own cookie session: the token comes back a dict there too.
    reference_github = GitHubStandIn()
    reference = flask_cookie_app()
    add_github_login(reference, reference_github)
    assert log_in_with_github(reference, reference_github).json == me.json
