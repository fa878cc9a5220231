"""The SessionStore extension: fail-fast validation at init and the Flask-Session binding."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis as redis_py
from flask import Flask

from pyloto_corp import ConfigurationError, SessionStore, Settings
from pyloto_corp.records import firestore, redis
from pyloto_corp.records.firestore import FirestoreRecords
from pyloto_corp.records.memory import MemoryRecords
from pyloto_corp.records.redis.store import RedisRecords
from pyloto_corp.session_store import EXTENSION_KEY
from tests.conftest import SECRET, cookie_name
from tests.redis_commands import commands
from tests.services import RedisClusterNodes, RedisServer, free_port


def test_init_app_registers_state_in_app_extensions() -> None:
    app = Flask(__name__)
    store = SessionStore()
    settings = Settings(environment="test")
    store.init_app(app, settings)
    state = app.extensions[EXTENSION_KEY]
    assert state.settings is settings
    assert app.session_interface is state.interface
    assert isinstance(state.interface.records, MemoryRecords)
    assert not hasattr(store, "app")


def test_one_extension_object_serves_several_apps() -> None:
    store = SessionStore()
    first, second = Flask("first"), Flask("second")
    store.init_app(first, Settings(environment="test"))
    store.init_app(
        second, Settings(environment="dev", session_lifetime=Settings().session_lifetime)
    )
    assert first.session_interface is not second.session_interface
    assert SessionStore.state(first).settings.environment == "test"
    assert SessionStore.state(second).settings.environment == "development"


def test_second_registration_is_refused() -> None:
    app = Flask(__name__)
    SessionStore(app, Settings())
    with pytest.raises(RuntimeError, match="already registered"):
        SessionStore().init_app(app, Settings())


def test_state_of_an_unregistered_app_says_how_to_fix() -> None:
    with pytest.raises(RuntimeError, match=r"call SessionStore\(\).init_app\(app\)"):
        SessionStore.state(Flask(__name__))


@pytest.mark.parametrize("environment", ["production", "staging", "prod", "stage"])
def test_memory_in_deployed_environments_fails_at_init(environment: str) -> None:
    app = Flask(__name__)
    with pytest.raises(ConfigurationError) as caught:
        SessionStore(app, Settings(environment=environment, secret_key=SECRET))
    error = caught.value
    assert isinstance(error, ValueError)
    canonical = "production" if environment.startswith("prod") else "staging"
    assert error.environment == canonical
    assert f"environment '{canonical}'" in str(error)
    assert EXTENSION_KEY not in app.extensions
    assert app.session_interface.__class__.__module__.startswith("flask.")


def test_error_lists_every_problem_and_no_secret() -> None:
    settings = Settings(
        environment="production",
        session_store_backend="redis",
        secret_key="short-secret-value",
        store=redis.Options(url="http://:redis-password-42@cache:6379"),
        whatsapp_access_token="EAAG-token-999",
        session_cookie_secure=False,
    )
    with pytest.raises(ConfigurationError) as caught:
        SessionStore(Flask(__name__), settings)
    error = caught.value
    assert len(error.problems) == 3
    text = str(error) + repr(error) + repr(error.args)
    assert "(3 problems)" in text
    for secret in ("short-secret-value", "redis-password-42", "EAAG-token-999"):
        assert secret not in text


def test_flask_config_follows_the_settings() -> None:
    app = Flask(__name__)
    SessionStore(app, Settings(environment="test", session_cookie_samesite="strict"))
    assert app.config["SESSION_COOKIE_SAMESITE"] == "Strict"
    assert app.config["SESSION_COOKIE_HTTPONLY"] is True
    assert app.config["SESSION_COOKIE_SECURE"] is False
    assert app.config["PERMANENT_SESSION_LIFETIME"] == Settings().session_lifetime


def test_development_without_secret_generates_one_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pyloto_corp")
    first, second = Flask("a"), Flask("b")
    SessionStore(first, Settings())
    SessionStore(second, Settings())
    assert len(first.config["SECRET_KEY"]) >= 32
    assert first.config["SECRET_KEY"] != second.config["SECRET_KEY"]
    assert "SECRET_KEY is not set; using a random key" in caplog.text
    assert first.config["SECRET_KEY"] not in caplog.text


def test_production_with_redis_binds_flask_session_without_connecting() -> None:
    """Connection problems are the readiness probe's business, not a boot crash."""
    app = Flask(__name__)
    settings = Settings(
        environment="production",
        session_store_backend="redis",
        secret_key=SECRET,
        store=redis.Options(url="redis://:pw@127.0.0.1:1/0", allow_plaintext_auth=True),
    )
    SessionStore(app, settings)
    interface = app.session_interface
    assert isinstance(interface.records, RedisRecords)
    kwargs = interface.records.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == redis.Options().socket_timeout
    assert kwargs["socket_connect_timeout"] == redis.Options().connect_timeout
    assert kwargs["retry"].get_retries() == 1
    assert "pw" not in interface.records.display_url


def test_caller_may_pass_its_own_redis_client(redis_server: RedisServer) -> None:
    client = redis_server.client()
    app = Flask(__name__)
    SessionStore(
        app,
        Settings(
            environment="test",
            session_store_backend="redis",
            store=redis.Options(url=redis_server.url),
        ),
        client=client,
    )
    assert app.session_interface.records.client is client
    client.close()


def test_production_with_firestore_boots_without_touching_google(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No credentials and no network at boot: the client is created at the first request."""
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
    app = Flask(__name__)
    settings = Settings(
        environment="production",
        session_store_backend="firestore",
        store=firestore.Options(project="demo-project"),
        secret_key=SECRET,
    )
    SessionStore(app, settings)
    assert isinstance(app.session_interface.records, FirestoreRecords)
    assert app.session_interface.records._client is None


def test_a_client_that_is_not_redis_py_is_refused_not_replaced() -> None:
    settings = Settings(
        environment="test", session_store_backend="redis", store=redis.Options(url="redis://r")
    )
    with pytest.raises(TypeError, match=r"client=dict cannot back the redis session store"):
        SessionStore(Flask(__name__), settings, client={})


def test_flask_sessions_session_redis_client_is_used_as_given(redis_server: RedisServer) -> None:
    client = redis_server.client()
    app = Flask(__name__)
    app.config.update(SESSION_TYPE="redis", SESSION_REDIS=client, REDIS_URL=redis_server.url)
    SessionStore(app)
    interface = app.session_interface
    assert isinstance(interface.records, RedisRecords)
    assert interface.records.client is client
    client.close()


def test_a_redis_cluster_client_is_used_as_given(redis_cluster: RedisClusterNodes) -> None:
    client = redis_cluster.client()
    app = Flask(__name__)
    app.config.update(SESSION_STORE_BACKEND="redis", REDIS_URL=redis_cluster.url)
    SessionStore(app, client=client)
    assert app.session_interface.records.client is client  # type: ignore[attr-defined]

    _user_routes(app)

    web = app.test_client()
    web.post("/set")
    assert web.get("/get").json == {"user": "ana"}
    client.close()


def test_a_valkey_py_client_is_used_as_given(redis_server: RedisServer) -> None:
    """valkey-py (a redis-py fork with its own exception classes) drives the same server."""
    import valkey

    client = valkey.Valkey(port=redis_server.port, socket_timeout=2)
    app = Flask(__name__)
    app.config.update(SESSION_STORE_BACKEND="redis", REDIS_URL=redis_server.url)
    SessionStore(app, client=client)
    assert app.session_interface.records.client is client  # type: ignore[attr-defined]

    _user_routes(app)

    web = app.test_client()
    web.post("/set")
    assert web.get("/get").json == {"user": "ana"}
    client.close()


def test_a_valkey_py_clients_errors_are_a_503_not_a_500() -> None:
    import valkey

    down = valkey.Valkey(port=free_port(), socket_timeout=1, socket_connect_timeout=1)
    app = Flask("down")
    app.config.update(SESSION_STORE_BACKEND="redis", REDIS_URL="redis://127.0.0.1:1")
    SessionStore(app, client=down)
    _user_routes(app)
    probe = app.test_client()
    probe.set_cookie(cookie_name(app), "x" * 43)
    response = probe.get("/get", headers={"Accept": "application/json"})
    assert response.status_code == 503


def test_a_client_that_decodes_responses_is_refused(redis_server: RedisServer) -> None:
    import redis as redis_py

    client = redis_py.Redis(port=redis_server.port, decode_responses=True)
    app = Flask(__name__)
    app.config.update(SESSION_STORE_BACKEND="redis", REDIS_URL=redis_server.url)
    with pytest.raises(TypeError, match="decode_responses=True"):
        SessionStore(app, client=client)
    client.close()


def test_a_credential_provider_that_raises_is_a_503(redis_server: RedisServer) -> None:
    import redis as redis_py
    from redis.credentials import CredentialProvider

    class Broken(CredentialProvider):
        def get_credentials(self) -> tuple[str]:
            raise RuntimeError("vault unreachable")

    client = redis_py.Redis(port=redis_server.port, credential_provider=Broken(), socket_timeout=1)
    app = Flask(__name__)
    app.config.update(SESSION_STORE_BACKEND="redis", REDIS_URL=redis_server.url)
    SessionStore(app, client=client)

    _user_routes(app)

    assert app.test_client().post("/set", headers={"Accept": "application/json"}).status_code == 503


def test_a_valkey_cluster_client_reports_its_topology(redis_cluster: RedisClusterNodes) -> None:
    import valkey.cluster

    from pyloto_corp.views import bp

    client = valkey.cluster.ValkeyCluster(host="127.0.0.1", port=redis_cluster.ports[0])
    app = Flask(__name__)
    app.config.update(SESSION_STORE_BACKEND="redis", REDIS_URL=redis_cluster.url)
    SessionStore(app, client=client)
    app.register_blueprint(bp)
    readiness = app.test_client().get("/readyz")
    assert readiness.status_code == 200
    assert readiness.json == {
        "status": "ready",
        "session_store": "redis",
        "topology": "cluster",
        "primaries": 3,
        "primaries_answering": 3,
        "slots_covered": 16384,
        "maxmemory_policy": "noeviction",  # INFO memory of every primary
    }
    client.close()


def _user_routes(app: Flask) -> None:
    """``POST /set`` stores a user in the session, ``GET /get`` reads it back."""
    from flask import session

    @app.post("/set")
    def set_value() -> dict[str, bool]:
        session["user"] = "ana"
        return {"ok": True}

    @app.get("/get")
    def get_value() -> dict[str, str | None]:
        return {"user": session.get("user")}


# -- the app's own client needs no URL (Flask-Session's migration path) ----------------------------


def _serves_on(app: Flask, admin: Any, prefix: str = "session:") -> None:
    """Two real requests (a login-like write, a read) answered from ``admin``'s server: the
    session is stored there and that server counted the commands."""
    _user_routes(app)
    admin.config_resetstat()
    web = app.test_client()
    assert web.post("/set").status_code == 200
    assert web.get("/get").json == {"user": "ana"}
    seen = commands(admin)
    assert seen.get("getex", 0) >= 1, seen  # the read came here
    assert seen.get("evalsha", 0) + seen.get("eval", 0) >= 1, seen  # and the write
    assert len(admin.keys(f"{prefix}*")) == 1
    # Through the given client (it names its connections), not one built from settings.
    others = [c for c in admin.client_list() if c["id"] != str(admin.client_id())]
    assert others, "no connection from the app"
    assert {c["name"] for c in others} == {"given"}, others


def test_a_flask_session_app_with_session_redis_needs_no_redis_url(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's migration: SESSION_TYPE='redis' and SESSION_REDIS, no REDIS_URL in the
    config or the environment, validated for production."""
    monkeypatch.setenv("ENV", "production")
    client = redis_py.Redis(port=own_redis.port, socket_timeout=2, client_name="given")
    admin = own_redis.client()
    app = Flask("migrating")
    app.config.update(SECRET_KEY=SECRET, SESSION_TYPE="redis", SESSION_REDIS=client)
    SessionStore(app)
    state = SessionStore.state(app)
    assert state.settings.environment == "production"
    assert state.interface.records.client is client  # type: ignore[attr-defined]
    assert state.settings.redacted()["REDIS_URL"] == "client given by the app"
    _serves_on(app, admin)
    admin.close()
    client.close()


def test_session_store_with_client_and_no_url_serves_on_that_client(
    own_redis: RedisServer,
) -> None:
    client = redis_py.Redis(port=own_redis.port, socket_timeout=2, client_name="given")
    admin = own_redis.client()
    app = Flask("own_client")
    settings = Settings(environment="production", secret_key=SECRET, session_store_backend="redis")
    SessionStore(app, settings, client=client)
    _serves_on(app, admin)
    admin.close()
    client.close()


def test_a_given_client_still_gets_every_other_rule_of_production(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENV", "production")
    client = redis_py.Redis(port=own_redis.port, socket_timeout=2)
    app = Flask("strict")
    app.config.update(
        SECRET_KEY="too-short-key",
        SESSION_TYPE="redis",
        SESSION_REDIS=client,
        SESSION_COOKIE_HTTPONLY=False,
    )
    with pytest.raises(ConfigurationError) as caught:
        SessionStore(app)
    problems = caught.value.problems
    assert len(problems) == 2, problems
    assert any(p.startswith("SECRET_KEY is too short") for p in problems), problems
    assert any(p.startswith("SESSION_COOKIE_HTTPONLY=false") for p in problems), problems
    assert not any("REDIS_URL" in p for p in problems), problems
    client.close()


def test_without_a_client_redis_url_is_still_required_and_says_both_ways() -> None:
    with pytest.raises(ConfigurationError) as caught:
        SessionStore(Flask("no_url"), Settings(environment="test", session_store_backend="redis"))
    (problem,) = caught.value.problems
    assert "REDIS_URL is required" in problem
    assert "SessionStore(app, client=...)" in problem


def test_firestore_with_a_given_client_needs_no_project(
    firestore_env: dict[str, str],
    firestore_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Production with a firestore.Client of the app's own (here on the emulator): no
    FIRESTORE_PROJECT or GOOGLE_CLOUD_PROJECT, and nothing the client reads on its own."""
    from google.cloud import firestore as google_firestore

    given = google_firestore.Client(project=firestore_env["FIRESTORE_PROJECT"])
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST")  # the client was built with it; we need none
    monkeypatch.setenv("ENV", "production")
    app = Flask("firestore_client")
    app.config.update(SECRET_KEY=SECRET, SESSION_STORE_BACKEND="firestore")
    SessionStore(app, client=given)
    state = SessionStore.state(app)
    assert state.interface.records.client is given  # type: ignore[attr-defined]
    assert state.settings.redacted()["FIRESTORE_PROJECT"] == "client given by the app"
    _user_routes(app)
    web = app.test_client()
    assert web.post("/set").status_code == 200
    assert web.get("/get").json == {"user": "ana"}
    stored = list(firestore_client.collection("sessions").stream())
    assert len(stored) == 1
    assert stored[0].id.startswith("session:")
    given.close()
