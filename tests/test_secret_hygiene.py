"""No secret value reaches an error, its repr, a boot log line, the CLI or the settings repr.

hypothesis draws secret values and (mostly invalid) environments around them.
"""

from __future__ import annotations

import logging
import string

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyloto_corp import ConfigurationError, Settings, create_app
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
)
def test_secrets_never_leak(
    secret_key: str,
    redis_password: str,
    token: str,
    short_key: bool,
    environment: str,
    backend: str,
    url: str,
    timeout: str,
    on_cloud_run: bool,
) -> None:
    secret_key = secret_key[:20] if short_key else secret_key * 3
    environ = {
        "ENV": environment,
        "SESSION_STORE_BACKEND": backend,
        "SECRET_KEY": secret_key,
        "REDIS_URL": url.format(pw=redis_password),
        "REDIS_SOCKET_TIMEOUT": timeout,
        "WHATSAPP_ACCESS_TOKEN": token,
        "FIRESTORE_PROJECT": "demo-project",
    }
    if on_cloud_run:
        environ["K_SERVICE"] = "api"

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
    for secret in (secret_key, redis_password, token):
        assert secret not in text
