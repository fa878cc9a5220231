"""No secret value reaches an error, its repr, a boot log line, the CLI or the settings repr.

hypothesis draws secret values and (mostly invalid) environments around them.
"""

from __future__ import annotations

import logging
import string

import pytest
from click.testing import CliRunner
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyloto_corp import ConfigurationError, SessionStore, Settings, create_app
from pyloto_corp.cli import session_store_cli

# The marker keeps a drawn secret from matching ordinary words of the output by chance
# (hypothesis is good at finding "Configuration").
secret_text = st.text(alphabet=string.ascii_letters + string.digits, min_size=9, max_size=45).map(
    lambda value: "Q7z" + value
)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    secret_key=secret_text,
    redis_password=secret_text,
    token=secret_text,
    fallback=secret_text,
    short_key=st.booleans(),
    environment=st.sampled_from(["production", "prod", "staging", "dev", "test", "prodution", ""]),
    backend=st.sampled_from(["memory", "redis", "REDIS", "firestore", "mongo"]),
    url=st.sampled_from(
        [
            "redis://:{pw}@cache:6379/0",
            "rediss://default:{pw}@10.0.0.3:6378",
            "http://:{pw}@x",
            "redis://:{pw}@cache:notaport",
            "redis://:{pw}@",
        ]
    ),
    timeout=st.sampled_from(["1", "0", "abc", "-3"]),
    on_cloud_run=st.booleans(),
    rate_limit_url=st.sampled_from(
        [
            "",
            "memory://",
            "memory://:{pw}@x",
            "redis://:{pw}@cache:6379/1",
            "redis+cluster://u:{pw}@a:1,b:2",
        ]
    ),
    swallow_errors=st.booleans(),
)
def test_secrets_never_leak(
    secret_key: str,
    redis_password: str,
    token: str,
    fallback: str,
    short_key: bool,
    environment: str,
    backend: str,
    url: str,
    timeout: str,
    on_cloud_run: bool,
    rate_limit_url: str,
    swallow_errors: bool,
) -> None:
    secret_key = secret_key[:20] if short_key else secret_key * 3
    environ = {
        "ENV": environment,
        "SESSION_STORE_BACKEND": backend,
        "SECRET_KEY": secret_key,
        # 12 to 48 characters: too short for a deployed key, or long enough.
        "SECRET_KEY_FALLBACKS": f"{fallback},{secret_key}",
        "REDIS_URL": url.format(pw=redis_password),
        "REDIS_SOCKET_TIMEOUT": timeout,
        "WHATSAPP_ACCESS_TOKEN": token,
        "FIRESTORE_PROJECT": "demo-project",
    }
    if on_cloud_run:
        environ["K_SERVICE"] = "api"
    if rate_limit_url:  # Flask-Limiter's storage, read by check (no app loaded)
        environ["RATELIMIT_STORAGE_URI"] = rate_limit_url.format(pw=redis_password)
    if swallow_errors:
        environ["RATELIMIT_SWALLOW_ERRORS"] = "true"

    parsed = Settings.from_env(environ)
    seen = [repr(parsed), str(parsed), str(parsed.redacted()), *parsed.validate()]

    capture = _Capture()
    root = logging.getLogger()
    root.addHandler(capture)
    try:
        create_app(parsed)
    except ConfigurationError as exc:
        seen += [str(exc), repr(exc), repr(exc.args), *exc.problems]
    finally:
        root.removeHandler(capture)
    seen += capture.lines

    runner = CliRunner()
    for command in (["info"], ["info", "--json"], ["check"]):
        seen.append(runner.invoke(session_store_cli, command, env=environ).output)

    text = "\n".join(seen)
    for secret in (secret_key, redis_password, token, fallback):
        assert secret not in text


PASTED = "Q7z-pasted-secret-0f9e8d7c6b5a"


def _everything_said(environ: dict[str, str]) -> str:
    """Every problem, error and CLI line the service produces for ``environ``."""
    parsed = Settings.from_env(environ)
    seen = parsed.validate()
    try:
        create_app(parsed)
    except ConfigurationError as exc:
        seen += [str(exc), repr(exc), repr(exc.args), exc.environment]
    runner = CliRunner()
    for command in (["check"], ["check", "--env", "prod"], ["info"], ["info", "--json"]):
        seen.append(runner.invoke(session_store_cli, command, env=environ).output)
    return "\n".join(seen)


@pytest.mark.parametrize("variable", ["ENV", "SESSION_STORE_BACKEND", "SESSION_COOKIE_SAMESITE"])
@pytest.mark.parametrize("spelling", [PASTED, PASTED.upper(), f" {PASTED}\n"])
def test_a_secret_pasted_into_a_choice_is_never_echoed(variable: str, spelling: str) -> None:
    """A secret pasted into a variable with fixed choices is refused by the variable's name and
    its allowed values, never repeated: not in a problem, the error, the CLI or the repr."""
    environ = {variable: spelling}
    said = _everything_said(environ)
    assert variable in said
    assert "one of" in said or "use Lax, Strict or None" in said
    parsed = Settings.from_env(environ)
    said += f"\n{parsed!r}\n{parsed.redacted()}"
    assert PASTED.lower() not in said.lower()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FIRESTORE_COLLECTION", f"__{PASTED}__"),
        ("FIRESTORE_COLLECTION", f"{PASTED}/x"),
        ("SESSION_COOKIE_NAME", f"{PASTED};"),
        ("SESSION_KEY_PREFIX", PASTED * 5),
        ("SESSION_USER_KEY", PASTED * 10),
        ("SESSION_LIFETIME", PASTED),
        ("REDIS_SOCKET_TIMEOUT", PASTED),
        ("SESSION_COOKIE_SECURE", PASTED),
        ("TRUSTED_PROXY_HOPS", PASTED),
    ],
)
def test_a_refused_free_form_value_is_never_echoed(variable: str, value: str) -> None:
    backend = "redis" if variable.startswith("REDIS") else "firestore"
    environ = {
        "SESSION_STORE_BACKEND": backend,
        "FIRESTORE_PROJECT": "demo",
        "REDIS_URL": "redis://cache",
        variable: value,
    }
    said = _everything_said(environ)
    assert variable in said
    parsed = Settings.from_env(environ)
    said += f"\n{parsed!r}\n{parsed.redacted()}"
    assert PASTED not in said


@pytest.mark.parametrize(
    ("config", "settings"),
    [
        ({"SESSION_TYPE": PASTED}, None),
        ({"SESSION_STORE_BACKEND": PASTED}, Settings(environment="test")),
        ({"SESSION_STORE_BACKEND": PASTED}, None),
        ({"SESSION_COOKIE_SAMESITE": PASTED}, None),
        ({"ENV": PASTED}, None),
    ],
)
def test_a_secret_in_a_host_apps_config_is_never_echoed(
    config: dict[str, str], settings: Settings | None
) -> None:
    app = Flask(__name__)
    app.config.update(config)
    with pytest.raises(ConfigurationError) as caught:
        SessionStore(app, settings)
    said = f"{caught.value}\n{caught.value!r}"
    assert PASTED.lower() not in said.lower()
