"""Settings: parsing with environs and the pure validation rules."""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta

import pytest
from click.testing import CliRunner

from pyloto_corp import create_app
from pyloto_corp.cli import session_store_cli
from pyloto_corp.config.settings import Settings, Var, redact_url
from pyloto_corp.records import firestore, redis
from tests.conftest import SECRET

VALID_CONTEXT = {
    Var.SECRET_KEY: SECRET,
    "REDIS_URL": "rediss://:hunter2-password@10.0.0.3:6378/0",
    "FIRESTORE_PROJECT": "demo-project",
}

ENVIRONMENTS = {
    # spelling -> canonical
    "development": "development",
    "dev": "development",
    " DEV ": "development",
    "local": "local",
    "test": "test",
    "testing": "test",
    "staging": "staging",
    "stage": "staging",
    "Staging": "staging",
    "production": "production",
    "prod": "production",
    " PRODUCTION\n": "production",
}
BACKENDS = {
    "memory": "memory",
    "MEMORY": "memory",
    " Memory ": "memory",
    "redis": "redis",
    "REDIS": "redis",
    "firestore": "firestore",
    "FireStore": "firestore",
}


def test_defaults_are_development_with_memory() -> None:
    settings = Settings.from_env({})
    assert settings.environment == "development"
    assert settings.session_store_backend == "memory"
    assert settings.validate() == []
    assert settings == Settings()


def test_keyword_construction_normalises_like_the_environment() -> None:
    settings = Settings(environment=" PROD ", session_store_backend="Memory")
    assert settings.environment == "production"
    assert settings.session_store_backend == "memory"
    assert settings.is_production
    assert not settings.is_staging


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.environment = "production"  # type: ignore[misc]


def test_environment_is_parsed_into_typed_fields() -> None:
    settings = Settings.from_env(
        {
            Var.ENV: "staging",
            Var.SESSION_LIFETIME: "2h",
            Var.SESSION_COOKIE_HTTPONLY: "true",
            Var.SESSION_COOKIE_SAMESITE: "strict",
            Var.GOOGLE_CLOUD_PROJECT: "from-google-var",
            Var.K_SERVICE: "api",
        }
    )
    assert settings.is_staging
    assert settings.session_lifetime == timedelta(hours=2)
    assert settings.session_cookie_samesite == "Strict"
    assert settings.google_cloud_project == "from-google-var"
    assert settings.trace_project == "from-google-var"
    assert settings.on_cloud_run


def test_backend_options_are_parsed_by_the_backend() -> None:
    settings = Settings.from_env(
        {
            Var.SESSION_STORE_BACKEND: "redis",
            "REDIS_URL": "redis://r",
            "REDIS_SOCKET_TIMEOUT": "0.5",
        }
    )
    assert settings.store == redis.Options(url="redis://r", socket_timeout=0.5)
    firestore_settings = Settings.from_env(
        {Var.SESSION_STORE_BACKEND: "firestore", Var.GOOGLE_CLOUD_PROJECT: "from-google-var"}
    )
    assert isinstance(firestore_settings.store, firestore.Options)
    assert firestore_settings.store.project == "from-google-var"


def test_firestore_project_prefers_its_own_variable() -> None:
    settings = Settings.from_env(
        {
            Var.SESSION_STORE_BACKEND: "firestore",
            "FIRESTORE_PROJECT": "a",
            Var.GOOGLE_CLOUD_PROJECT: "b",
        }
    )
    assert isinstance(settings.store, firestore.Options)
    assert settings.store.project == "a"
    assert settings.trace_project == "a"


@pytest.mark.parametrize("spelling", ENVIRONMENTS)
@pytest.mark.parametrize("backend_spelling", BACKENDS)
def test_environment_by_backend_table(spelling: str, backend_spelling: str) -> None:
    settings = Settings.from_env(
        {Var.ENV: spelling, Var.SESSION_STORE_BACKEND: backend_spelling, **VALID_CONTEXT}
    )
    environment, backend = ENVIRONMENTS[spelling], BACKENDS[backend_spelling]
    assert (settings.environment, settings.session_store_backend) == (environment, backend)

    problems = settings.validate_session_store_config()
    if backend == "memory" and environment in ("staging", "production"):
        assert len(problems) == 1
        assert f"memory is refused in {environment}" in problems[0]
    else:
        assert problems == []
    assert settings.validate() == problems


@pytest.mark.parametrize("backend", ["mongo", "redis-cluster", "", "memcached"])
def test_invalid_backend_is_named(backend: str) -> None:
    problems = Settings(session_store_backend=backend).validate_session_store_config()
    assert problems == [
        "SESSION_STORE_BACKEND is not a session store backend; use one of: memory, redis, "
        "firestore."
    ]


@pytest.mark.parametrize("typo", ["prodution", "prd", "qa", "development2"])
def test_unknown_environment_is_an_error_not_development(typo: str) -> None:
    settings = Settings.from_env({Var.ENV: typo})
    assert settings.environment == typo
    assert settings.validate() == [
        "ENV is not a known environment; use one of: development (dev), local, test (testing), "
        "staging (stage), production (prod)."
    ]


def test_missing_env_on_cloud_run_refuses_memory() -> None:
    settings = Settings.from_env({Var.K_SERVICE: "api", Var.SECRET_KEY: SECRET})
    assert settings.environment == "development"
    problems = settings.validate()
    assert problems == [
        "SESSION_STORE_BACKEND=memory is refused on Cloud Run (K_SERVICE is set): sessions kept "
        "in process memory are lost or split between Cloud Run instances; "
        "set SESSION_STORE_BACKEND=redis or firestore."
    ]


def test_cloud_run_requires_a_secret_key_whatever_the_label() -> None:
    settings = Settings.from_env(
        {Var.K_SERVICE: "api", Var.SESSION_STORE_BACKEND: "redis", "REDIS_URL": "redis://r:6379"}
    )
    assert [p for p in settings.validate() if p.startswith("SECRET_KEY")]


@pytest.mark.parametrize("environment", ["development", "local", "test"])
def test_local_environments_may_use_memory_without_a_secret(environment: str) -> None:
    assert Settings(environment=environment).validate() == []


def test_all_problems_are_reported_at_once() -> None:
    settings = Settings.from_env(
        {
            Var.ENV: "production",
            Var.SESSION_STORE_BACKEND: "memory",
            Var.SESSION_COOKIE_SECURE: "false",
            Var.SESSION_COOKIE_SAMESITE: "none",
            Var.SESSION_MAX_BYTES: "fast",
            Var.SESSION_LIFETIME: "forever",
        }
    )
    problems = settings.validate()
    starts = sorted(p.split("=")[0].split(":")[0].split(" ")[0] for p in problems)
    assert starts == [
        "SECRET_KEY",
        "SESSION_COOKIE_SAMESITE",
        "SESSION_COOKIE_SECURE",
        "SESSION_LIFETIME",
        "SESSION_MAX_BYTES",
        "SESSION_STORE_BACKEND",
    ]


def test_unparseable_values_keep_defaults_and_become_problems() -> None:
    settings = Settings.from_env(
        {
            Var.SESSION_STORE_BACKEND: "redis",
            "REDIS_URL": "redis://r",
            "REDIS_SOCKET_TIMEOUT": "abc",
        }
    )
    assert settings.store == redis.Options(url="redis://r")
    assert settings.validate() == ["REDIS_SOCKET_TIMEOUT: Not a valid number."]


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({}, "REDIS_URL is required when SESSION_STORE_BACKEND=redis"),
        ({"REDIS_URL": "http://cache:6379"}, "REDIS_URL is not a valid Redis URL"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL is not a valid Redis URL"),
        ({"REDIS_URL": "redis://"}, "REDIS_URL is not a valid Redis URL"),
        ({"REDIS_URL": "redis://h:99999"}, "REDIS_URL is not a valid Redis URL"),
        ({"REDIS_URL": "redis://h:6379/zero"}, "REDIS_URL is not a valid Redis URL"),
        ({"REDIS_URL": "redis://h x:1"}, "REDIS_URL is not a valid Redis URL"),
        (
            {"REDIS_URL": "redis://r", "REDIS_CONNECT_TIMEOUT": "0"},
            "REDIS_CONNECT_TIMEOUT must",
        ),
        ({"REDIS_URL": "redis://r", "REDIS_SOCKET_TIMEOUT": "-1"}, "REDIS_SOCKET_TIMEOUT must"),
    ],
)
def test_redis_connection_settings(environ: dict[str, str], fragment: str) -> None:
    settings = Settings.from_env({Var.SESSION_STORE_BACKEND: "redis", **environ})
    problems = settings.validate_session_store_config()
    assert len(problems) == 1
    assert fragment in problems[0]


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://:pw@10.1.2.3:6378", "redis://user:pw@cache/2"]
)
def test_redis_urls_accepted(url: str) -> None:
    settings = Settings(session_store_backend="redis", store=redis.Options(url=url))
    assert settings.validate() == []


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({Var.ENV: "production"}, "FIRESTORE_PROJECT (or GOOGLE_CLOUD_PROJECT) is required"),
        ({"FIRESTORE_COLLECTION": "a/b"}, "not a valid Firestore collection id"),
        ({"FIRESTORE_COLLECTION": "__sessions__"}, "not a valid Firestore collection id"),
        ({"FIRESTORE_COLLECTION": ".."}, "not a valid Firestore collection id"),
        ({"FIRESTORE_COLLECTION": "x" * 1501}, "not a valid Firestore collection id"),
    ],
)
def test_firestore_settings(environ: dict[str, str], fragment: str) -> None:
    settings = Settings.from_env(
        {Var.SESSION_STORE_BACKEND: "firestore", Var.SECRET_KEY: SECRET, **environ}
    )
    problems = settings.validate()
    assert len(problems) == 1
    assert fragment in problems[0]


def test_firestore_defaults() -> None:
    settings = Settings.from_env({Var.SESSION_STORE_BACKEND: "firestore"})
    assert settings.store == firestore.Options()
    assert (settings.store.database, settings.store.collection) == ("(default)", "sessions")
    assert settings.validate() == []


@pytest.mark.parametrize("environment", ["staging", "production"])
def test_secret_key_rules_in_deployed_environments(environment: str) -> None:
    base = {Var.ENV: environment, Var.SESSION_STORE_BACKEND: "redis", "REDIS_URL": "redis://r"}
    missing = Settings.from_env(base).validate()
    assert missing == [missing[0]]
    assert missing[0].startswith(f"SECRET_KEY is required in {environment}")
    short = Settings.from_env({**base, Var.SECRET_KEY: SECRET[:31]}).validate()
    assert short == [f"SECRET_KEY is too short in {environment}: it needs at least 32 characters."]
    empty = Settings.from_env({**base, Var.SECRET_KEY: ""}).validate()
    assert empty[0].startswith("SECRET_KEY is required")
    assert Settings.from_env({**base, Var.SECRET_KEY: SECRET[:32]}).validate() == []


#: Long enough, and still guessable: one character, a short pattern repeated, or a handful of
#: distinct characters.
WEAK_KEYS = [
    "a" * 32,
    "ab" * 16,
    "abcdefgh" * 4,
    "0123456789abcdef" * 2,
    "abc" * 11 + "a",
    "s3cr3t-" + "k" * 40,
    "changeme" * 4,
    "1234567" * 5,
]


@pytest.mark.parametrize("key", WEAK_KEYS)
@pytest.mark.parametrize(
    ("environ", "where"),
    [
        ({Var.ENV: "production"}, "in production"),
        ({Var.ENV: "staging"}, "in staging"),
        ({Var.K_SERVICE: "api"}, "on Cloud Run (K_SERVICE is set)"),
    ],
)
def test_weak_secret_keys_are_refused_when_deployed(
    key: str, environ: dict[str, str], where: str
) -> None:
    settings = Settings.from_env(
        {
            **environ,
            Var.SESSION_STORE_BACKEND: "redis",
            "REDIS_URL": "redis://r",
            Var.SECRET_KEY: key,
        }
    )
    problems = settings.validate()
    assert problems == [
        f"SECRET_KEY is too weak {where}: it repeats a short pattern or uses fewer than 8 "
        "different characters; generate one with "
        "python -c 'import secrets; print(secrets.token_urlsafe(48))'."
    ]
    assert key not in problems[0]
    # The same rule for a key the host app set as bytes.
    as_bytes = dataclasses.replace(settings, secret_key=key.encode())
    assert as_bytes.validate() == problems


@pytest.mark.parametrize("key", WEAK_KEYS)
@pytest.mark.parametrize("environment", ["development", "local", "test"])
def test_any_secret_key_is_accepted_in_development_and_tests(key: str, environment: str) -> None:
    assert Settings.from_env({Var.ENV: environment, Var.SECRET_KEY: key}).validate() == []


@pytest.mark.parametrize(
    "key",
    [
        SECRET,
        "correct horse battery staple 2024",
        "f3a9c1d07e5b2468a1c3e5f7092b4d6e",  # 32 hex digits, as from secrets.token_hex(16)
        "Kq8vWz2pLm4xNj6yHb0dFg7sTr1cUe3a",
    ],
)
def test_keys_that_are_not_obviously_weak_are_accepted_when_deployed(key: str) -> None:
    settings = Settings.from_env(
        {Var.K_SERVICE: "api", Var.SESSION_STORE_BACKEND: "redis", "REDIS_URL": "redis://r"}
        | {Var.SECRET_KEY: key}
    )
    assert settings.validate() == []


@pytest.mark.parametrize(
    ("environment", "secure"), [("production", True), ("staging", True), ("development", False)]
)
def test_cookie_secure_defaults_to_safe(environment: str, secure: bool) -> None:
    assert Settings(environment=environment).cookie_secure is secure


def test_cloud_run_without_env_makes_cookies_secure() -> None:
    settings = Settings.from_env({Var.K_SERVICE: "api"})
    assert settings.environment == "development"
    assert settings.cookie_secure is True
    assert settings.redacted()[Var.SESSION_COOKIE_SECURE] is True


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        (Var.SESSION_COOKIE_SECURE, "false"),
        (Var.SESSION_COOKIE_HTTPONLY, "false"),
        (Var.SESSION_COOKIE_SAMESITE, "None"),
    ],
)
@pytest.mark.parametrize(
    ("deployed", "where"),
    [({Var.ENV: "prod"}, "in production"), ({Var.K_SERVICE: "api"}, "on Cloud Run")],
)
def test_deployed_refuses_relaxed_cookies(
    variable: str, value: str, deployed: dict[str, str], where: str
) -> None:
    environ = {
        Var.SESSION_STORE_BACKEND: "redis",
        "REDIS_URL": "redis://r",
        Var.SECRET_KEY: SECRET,
        variable: value,
    }
    problems = Settings.from_env({**environ, **deployed}).validate()
    assert len(problems) == 1
    assert problems[0].startswith(variable)
    assert where in problems[0]
    assert Settings.from_env({**environ, Var.ENV: "dev"}).validate() == []


def test_invalid_samesite_anywhere() -> None:
    problems = Settings.from_env({Var.SESSION_COOKIE_SAMESITE: "sometimes"}).validate()
    assert problems == ["SESSION_COOKIE_SAMESITE is not valid; use Lax, Strict or None."]


def test_validation_is_pure_and_deterministic() -> None:
    settings = Settings.from_env({Var.ENV: "prod", Var.SESSION_STORE_BACKEND: "nope"})
    first = settings.validate()
    assert settings.validate() == first
    assert settings == Settings.from_env({Var.ENV: "prod", Var.SESSION_STORE_BACKEND: "nope"})


def test_repr_and_redacted_view_hide_secrets() -> None:
    settings = Settings.from_env(
        {
            **VALID_CONTEXT,
            Var.SESSION_STORE_BACKEND: "redis",
            Var.WHATSAPP_ACCESS_TOKEN: "EAAG-token-value-123",
        }
    )
    text = repr(settings) + str(settings) + repr(settings.redacted())
    for secret in (SECRET, "hunter2-password", "EAAG-token-value-123"):
        assert secret not in text
    assert "rediss://***@10.0.0.3:6378/0" in text
    assert settings.redacted()[Var.SECRET_KEY] == "***"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:6379/0", "redis://***@h:6379/0"),
        ("rediss://default:pw@h", "rediss://***@h"),
        ("redis://h:6379", "redis://h:6379"),
        ("redis://:pw@h:notaport", "redis://***@h:notaport"),
        ("redis://:pa/ss#wo?rd@h:6379/0", "redis://***@h:6379/0"),
        ("redis://:p@ss@h", "redis://***@h"),
        ("not a url :pw@h", "***"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("environ", "hops"),
    [({}, 0), ({Var.K_SERVICE: "api"}, 1), ({Var.TRUSTED_PROXY_HOPS: "2"}, 2)],
)
def test_proxy_hops(environ: dict[str, str], hops: int) -> None:
    assert Settings.from_env(environ).proxy_hops == hops


def test_proxy_hops_out_of_range() -> None:
    problems = Settings.from_env({Var.TRUSTED_PROXY_HOPS: "9"}).validate()
    assert problems == ["TRUSTED_PROXY_HOPS must be a whole number from 0 to 5."]


def test_the_redis_options_repr_hides_the_password() -> None:
    options = redis.Options(url="redis://user:hunter2-pw@host:6379/0")
    assert "hunter2-pw" not in repr(options)
    assert "redis://***@host:6379/0" in repr(options)


SHARED_PREFIX_ADVICE = (
    "SESSION_KEY_PREFIX is the default 'session:' on Cloud Run: each service's sessions are "
    "stamped with its name and another's are refused, but they still share one 'log out "
    "everywhere' index; give each service its own prefix (for example "
    "SESSION_KEY_PREFIX=session:api:) before its first deploy (changing it later ends the "
    "sessions stored under the old prefix)."
)


def test_the_shared_default_prefix_is_pointed_out_on_cloud_run() -> None:
    """The default stays 'session:' (a new default would log every user out at the deploy
    that brings it); on Cloud Run the shared default is pointed out instead."""
    cloud_run = {
        Var.K_SERVICE: "api",
        Var.SESSION_STORE_BACKEND: "redis",
        "REDIS_URL": "redis://r",
        Var.SECRET_KEY: SECRET,
    }
    settings = Settings.from_env(cloud_run)
    assert settings.session_key_prefix == "session:"
    assert settings.validate() == []
    assert settings.advice() == [SHARED_PREFIX_ADVICE]
    own = Settings.from_env({**cloud_run, Var.SESSION_KEY_PREFIX: "session:api:"})
    assert own.advice() == []
    assert Settings.from_env({}).advice() == []


def test_check_and_init_print_the_advice(caplog: pytest.LogCaptureFixture) -> None:
    environ = {
        Var.K_SERVICE: "api",
        Var.SESSION_STORE_BACKEND: "redis",
        "REDIS_URL": "redis://127.0.0.1:1",
        Var.SECRET_KEY: SECRET,
    }
    result = CliRunner().invoke(session_store_cli, ["check"], env=environ)
    assert result.exit_code == 0
    assert f"Warning: {SHARED_PREFIX_ADVICE}" in result.output
    with caplog.at_level(logging.WARNING, logger="pyloto_corp.session_store"):
        create_app(Settings.from_env(environ))
    assert [r.getMessage() for r in caplog.records] == [SHARED_PREFIX_ADVICE]
