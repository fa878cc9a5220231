"""One frozen, typed settings object: parsed from the environment with environs, validated purely.

``Settings.from_env()`` only converts types (a value that does not parse becomes a problem, not an
exception), and ``Settings.validate()`` applies every rule to the object and returns the list of
problems. Nothing here does IO, so the same rules run at app init, in ``check`` and in tests.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from environs import Env, EnvValidationError


class Var:
    """Every environment variable the service reads, named in one place."""

    ENV: Final = "ENV"
    K_SERVICE: Final = "K_SERVICE"
    SECRET_KEY: Final = "SECRET_KEY"  # noqa: S105 - a variable name, not a secret
    SESSION_STORE_BACKEND: Final = "SESSION_STORE_BACKEND"
    SESSION_LIFETIME: Final = "SESSION_LIFETIME"
    SESSION_ABSOLUTE_LIFETIME: Final = "SESSION_ABSOLUTE_LIFETIME"
    SESSION_MAX_BYTES: Final = "SESSION_MAX_BYTES"
    SESSION_KEY_PREFIX: Final = "SESSION_KEY_PREFIX"
    SESSION_COOKIE_NAME: Final = "SESSION_COOKIE_NAME"
    SESSION_COOKIE_SECURE: Final = "SESSION_COOKIE_SECURE"
    SESSION_COOKIE_HTTPONLY: Final = "SESSION_COOKIE_HTTPONLY"
    SESSION_COOKIE_SAMESITE: Final = "SESSION_COOKIE_SAMESITE"
    REDIS_URL: Final = "REDIS_URL"
    REDIS_SOCKET_TIMEOUT: Final = "REDIS_SOCKET_TIMEOUT"
    REDIS_CONNECT_TIMEOUT: Final = "REDIS_CONNECT_TIMEOUT"
    REDIS_SSL_CA_CERTS: Final = "REDIS_SSL_CA_CERTS"
    REDIS_SSL_CHECK_HOSTNAME: Final = "REDIS_SSL_CHECK_HOSTNAME"
    FIRESTORE_PROJECT: Final = "FIRESTORE_PROJECT"
    GOOGLE_CLOUD_PROJECT: Final = "GOOGLE_CLOUD_PROJECT"
    FIRESTORE_DATABASE: Final = "FIRESTORE_DATABASE"
    FIRESTORE_COLLECTION: Final = "FIRESTORE_COLLECTION"
    FIRESTORE_TIMEOUT: Final = "FIRESTORE_TIMEOUT"
    FIRESTORE_REFRESH_INTERVAL: Final = "FIRESTORE_REFRESH_INTERVAL"
    TRUSTED_PROXY_HOPS: Final = "TRUSTED_PROXY_HOPS"
    WHATSAPP_ACCESS_TOKEN: Final = "WHATSAPP_ACCESS_TOKEN"  # noqa: S105 - a variable name


DEVELOPMENT: Final = "development"
LOCAL: Final = "local"
TEST: Final = "test"
STAGING: Final = "staging"
PRODUCTION: Final = "production"

ENVIRONMENTS: Final = (DEVELOPMENT, LOCAL, TEST, STAGING, PRODUCTION)
ENVIRONMENT_ALIASES: Final = {
    "dev": DEVELOPMENT,
    "testing": TEST,
    "stage": STAGING,
    "prod": PRODUCTION,
}
#: Environments that serve real users: the store must be shared and cookies must be safe.
DEPLOYED_ENVIRONMENTS: Final = frozenset({STAGING, PRODUCTION})

MEMORY: Final = "memory"
REDIS: Final = "redis"
FIRESTORE: Final = "firestore"
BACKENDS: Final = (MEMORY, REDIS, FIRESTORE)

SAMESITE_VALUES: Final = ("Lax", "Strict", "None")
MIN_SECRET_KEY_LENGTH: Final = 32
REDACTED: Final = "***"


def _normalise(value: str) -> str:
    return value.strip().lower()


def normalise_environment(value: str) -> str:
    """``' PROD '`` -> ``'production'``; unknown names are kept (lowercased) for validation."""
    name = _normalise(value)
    return ENVIRONMENT_ALIASES.get(name, name)


def normalise_samesite(value: str | None) -> str | None:
    """Map ``lax``/``STRICT``/``none`` to the spelling browsers and Werkzeug expect."""
    if value is None:
        return None
    name = value.strip().capitalize()
    return name or None


def redact_url(url: str | None) -> str | None:
    """The URL with its password replaced by ``***`` (and anything unparseable hidden whole)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        userinfo = f"{parts.username}:{REDACTED}" if parts.username else f":{REDACTED}"
        host = parts.hostname or ""
        netloc = f"{userinfo}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return REDACTED


class _MappingEnv(Env):
    """environs' Env reading a given mapping instead of ``os.environ`` (for tests and ``check``)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(eager=False)
        self._source = environ

    def _get_value(self, env_key: str, default: Any) -> Any:
        return self._source.get(env_key, default)


@dataclasses.dataclass(frozen=True, repr=False)
class Settings:
    """Everything the app needs from its environment; the single source of truth after parsing.

    Construct it with keywords in tests (every field has a default) or with :meth:`from_env`.
    """

    environment: str = DEVELOPMENT
    #: Cloud Run's service name (``K_SERVICE``); set means "stateless instance, whatever ENV says".
    cloud_run_service: str | None = None
    session_store_backend: str = MEMORY
    secret_key: str | None = None
    #: Idle timeout: a session not used for this long expires (sliding on every use).
    session_lifetime: timedelta = timedelta(hours=12)
    #: Absolute timeout: a session ends this long after it began, however active.
    session_absolute_lifetime: timedelta = timedelta(days=7)
    #: Largest encoded session a backend accepts (Firestore is also capped by its 1 MiB limit).
    session_max_bytes: int = 512 * 1024
    session_key_prefix: str = "session:"
    session_cookie_name: str = "session"
    #: ``None`` means "safe default": ``True`` in staging/production, ``False`` elsewhere.
    session_cookie_secure: bool | None = None
    session_cookie_httponly: bool = True
    session_cookie_samesite: str | None = "Lax"
    redis_url: str | None = None
    redis_socket_timeout: float = 2.0
    redis_connect_timeout: float = 2.0
    redis_ssl_ca_certs: str | None = None
    redis_ssl_check_hostname: bool = True
    firestore_project: str | None = None
    firestore_database: str = "(default)"
    firestore_collection: str = "sessions"
    firestore_timeout: float = 5.0
    #: How stale the stored expiry may get before a read-only request rewrites it (None: a tenth
    #: of the lifetime). Keeps Firestore at about one write per session per interval.
    firestore_refresh_interval: timedelta | None = None
    #: Proxies in front of the app whose X-Forwarded-* headers are trusted (None: 1 on Cloud
    #: Run, whose front end terminates TLS; 0 elsewhere, where such headers may be forged).
    trusted_proxy_hops: int | None = None
    whatsapp_access_token: str | None = None
    #: Values that did not parse (``("REDIS_SOCKET_TIMEOUT: Not a valid number.",)``).
    parse_problems: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Keyword construction and from_env() get the same normalisation.
        set_ = object.__setattr__
        set_(self, "environment", normalise_environment(self.environment))
        set_(self, "session_store_backend", _normalise(self.session_store_backend))
        set_(self, "session_cookie_samesite", normalise_samesite(self.session_cookie_samesite))

    # -- parsing ---------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse ``environ`` (``os.environ`` when None); never raises for a bad value."""
        env = _MappingEnv(os.environ if environ is None else environ)
        project = env.str(Var.FIRESTORE_PROJECT, None) or env.str(Var.GOOGLE_CLOUD_PROJECT, None)
        values: dict[str, Any] = {
            "environment": env.str(Var.ENV, DEVELOPMENT),
            "cloud_run_service": env.str(Var.K_SERVICE, None) or None,
            "session_store_backend": env.str(Var.SESSION_STORE_BACKEND, MEMORY),
            "secret_key": env.str(Var.SECRET_KEY, None),
            "session_lifetime": env.timedelta(Var.SESSION_LIFETIME, None),
            "session_absolute_lifetime": env.timedelta(Var.SESSION_ABSOLUTE_LIFETIME, None),
            "session_max_bytes": env.int(Var.SESSION_MAX_BYTES, None),
            "session_key_prefix": env.str(Var.SESSION_KEY_PREFIX, None),
            "session_cookie_name": env.str(Var.SESSION_COOKIE_NAME, None),
            "session_cookie_secure": env.bool(Var.SESSION_COOKIE_SECURE, None),
            "session_cookie_httponly": env.bool(Var.SESSION_COOKIE_HTTPONLY, None),
            "session_cookie_samesite": env.str(Var.SESSION_COOKIE_SAMESITE, None),
            "redis_url": env.str(Var.REDIS_URL, None) or None,
            "redis_socket_timeout": env.float(Var.REDIS_SOCKET_TIMEOUT, None),
            "redis_connect_timeout": env.float(Var.REDIS_CONNECT_TIMEOUT, None),
            "redis_ssl_ca_certs": env.str(Var.REDIS_SSL_CA_CERTS, None) or None,
            "redis_ssl_check_hostname": env.bool(Var.REDIS_SSL_CHECK_HOSTNAME, None),
            "firestore_project": project or None,
            "firestore_database": env.str(Var.FIRESTORE_DATABASE, None),
            "firestore_collection": env.str(Var.FIRESTORE_COLLECTION, None),
            "firestore_timeout": env.float(Var.FIRESTORE_TIMEOUT, None),
            "firestore_refresh_interval": env.timedelta(Var.FIRESTORE_REFRESH_INTERVAL, None),
            "trusted_proxy_hops": env.int(Var.TRUSTED_PROXY_HOPS, None),
            "whatsapp_access_token": env.str(Var.WHATSAPP_ACCESS_TOKEN, None),
        }
        problems: tuple[str, ...] = ()
        try:
            env.seal()
        except EnvValidationError as exc:
            # environs' own messages name the variable and never echo the value.
            messages = exc.error_messages
            assert isinstance(messages, Mapping)  # non-eager environs keys errors by variable
            problems = tuple(
                f"{name}: {' '.join(str(m) for m in errors)}"
                for name, errors in sorted(messages.items())
            )
        # A variable that is unset (or did not parse) keeps the field's default.
        kwargs = {name: value for name, value in values.items() if value is not None}
        return cls(**kwargs, parse_problems=problems)

    # -- derived facts ---------------------------------------------------------------------------

    @property
    def is_production(self) -> bool:
        return self.environment == PRODUCTION

    @property
    def is_staging(self) -> bool:
        return self.environment == STAGING

    @property
    def on_cloud_run(self) -> bool:
        return self.cloud_run_service is not None

    @property
    def is_deployed(self) -> bool:
        """Serving real users: staging, production, or any Cloud Run instance (it is stateless)."""
        return self.environment in DEPLOYED_ENVIRONMENTS or self.on_cloud_run

    @property
    def proxy_hops(self) -> int:
        """The effective number of trusted proxy hops."""
        if self.trusted_proxy_hops is None:
            return 1 if self.on_cloud_run else 0
        return self.trusted_proxy_hops

    @property
    def refresh_interval(self) -> timedelta:
        """The effective Firestore expiry refresh interval."""
        if self.firestore_refresh_interval is None:
            return self.session_lifetime / 10
        return self.firestore_refresh_interval

    @property
    def cookie_secure(self) -> bool:
        """The effective ``Secure`` flag (an unset value is safe in staging and production)."""
        if self.session_cookie_secure is None:
            return self.environment in DEPLOYED_ENVIRONMENTS
        return self.session_cookie_secure

    def _where(self) -> str:
        if self.environment in DEPLOYED_ENVIRONMENTS:
            return f"in {self.environment}"
        return f"on Cloud Run ({Var.K_SERVICE} is set)"

    # -- validation (pure: the object in, a list of problems out) ---------------------------------

    def validate_session_store_config(self) -> list[str]:
        """Every problem with the session store settings; an empty list means valid."""
        problems: list[str] = []
        backend = self.session_store_backend
        if backend not in BACKENDS:
            problems.append(
                f"{Var.SESSION_STORE_BACKEND}={backend!r} is not a session store backend; "
                f"use one of: {', '.join(BACKENDS)}."
            )
        elif backend == MEMORY and self.is_deployed:
            problems.append(
                f"{Var.SESSION_STORE_BACKEND}=memory is refused {self._where()}: sessions kept in "
                "process memory are lost or split between Cloud Run instances; "
                f"set {Var.SESSION_STORE_BACKEND}=redis or firestore."
            )
        elif backend == REDIS:
            problems += self._redis_problems()
        elif backend == FIRESTORE:
            problems += self._firestore_problems()
        if not self.session_key_prefix or len(self.session_key_prefix) > 100:
            problems.append(f"{Var.SESSION_KEY_PREFIX} must be 1 to 100 characters.")
        if self.session_lifetime <= timedelta(0):
            problems.append(
                f"{Var.SESSION_LIFETIME} must be a positive duration (for example 12h or 3600)."
            )
        elif self.session_absolute_lifetime < self.session_lifetime:
            problems.append(
                f"{Var.SESSION_ABSOLUTE_LIFETIME} must be at least {Var.SESSION_LIFETIME} "
                "(the absolute timeout cannot end a session before its idle timeout)."
            )
        if not 1024 <= self.session_max_bytes <= 64 * 1024 * 1024:
            problems.append(f"{Var.SESSION_MAX_BYTES} must be between 1024 and 67108864 bytes.")
        return problems

    def _redis_problems(self) -> list[str]:
        problems: list[str] = []
        if not self.redis_url:
            problems.append(
                f"{Var.REDIS_URL} is required when {Var.SESSION_STORE_BACKEND}=redis; "
                "set it to redis://[:password@]host:port/db (or rediss:// for TLS)."
            )
        else:
            if not is_valid_redis_url(self.redis_url):
                problems.append(
                    f"{Var.REDIS_URL} is not a valid redis:// or rediss:// URL; "
                    "expected redis://[:password@]host:port/db."
                )
        for var, value in (
            (Var.REDIS_SOCKET_TIMEOUT, self.redis_socket_timeout),
            (Var.REDIS_CONNECT_TIMEOUT, self.redis_connect_timeout),
        ):
            if not 0 < value <= 60:
                problems.append(f"{var} must be a number of seconds above 0 and at most 60.")
        return problems

    def _firestore_problems(self) -> list[str]:
        problems: list[str] = []
        if not self.firestore_project and self.environment in DEPLOYED_ENVIRONMENTS:
            problems.append(
                f"{Var.FIRESTORE_PROJECT} (or {Var.GOOGLE_CLOUD_PROJECT}) is required "
                f"{self._where()} when {Var.SESSION_STORE_BACKEND}=firestore; "
                "set it to the Google Cloud project id that holds the database."
            )
        if not is_valid_collection_id(self.firestore_collection):
            problems.append(
                f"{Var.FIRESTORE_COLLECTION}={self.firestore_collection!r} is not a valid "
                "Firestore collection id: 1 to 1,500 bytes, no '/', not '.' or '..', "
                "and not of the form __name__."
            )
        if not self.firestore_database:
            problems.append(
                f"{Var.FIRESTORE_DATABASE} must not be empty; "
                "use (default) for the default database."
            )
        if "/" in self.session_key_prefix:
            problems.append(
                f"{Var.SESSION_KEY_PREFIX} must not contain '/' with the firestore backend "
                "(it starts every document id)."
            )
        lifetime = self.session_lifetime
        if lifetime > timedelta(0) and not timedelta(0) <= self.refresh_interval < lifetime:
            problems.append(
                f"{Var.FIRESTORE_REFRESH_INTERVAL} must be at least 0 and shorter than "
                f"{Var.SESSION_LIFETIME}."
            )
        if not 0 < self.firestore_timeout <= 60:
            problems.append(
                f"{Var.FIRESTORE_TIMEOUT} must be a number of seconds above 0 and at most 60."
            )
        return problems

    def validate(self) -> list[str]:
        """Every problem in the settings, in a stable order; an empty list means valid."""
        problems = list(self.parse_problems)
        if self.environment not in ENVIRONMENTS:
            known = "development (dev), local, test (testing), staging (stage), production (prod)"
            problems.append(
                f"{Var.ENV}={self.environment!r} is not a known environment; use one of: {known}."
            )
        problems += self.validate_session_store_config()
        if not 0 <= self.proxy_hops <= 5:
            problems.append(f"{Var.TRUSTED_PROXY_HOPS} must be a whole number from 0 to 5.")
        problems += self._secret_key_problems()
        problems += self._cookie_problems()
        return problems

    def _secret_key_problems(self) -> list[str]:
        if not self.is_deployed:
            return []
        if not self.secret_key:
            return [
                f"{Var.SECRET_KEY} is required {self._where()}; generate one with "
                "python -c 'import secrets; print(secrets.token_urlsafe(48))'."
            ]
        if len(self.secret_key) < MIN_SECRET_KEY_LENGTH:
            return [
                f"{Var.SECRET_KEY} is too short {self._where()}: it needs at least "
                f"{MIN_SECRET_KEY_LENGTH} characters."
            ]
        return []

    def _cookie_problems(self) -> list[str]:
        problems: list[str] = []
        samesite = self.session_cookie_samesite
        if samesite is not None and samesite not in SAMESITE_VALUES:
            problems.append(
                f"{Var.SESSION_COOKIE_SAMESITE}={samesite!r} is not valid; use Lax, Strict or None."
            )
        if self.environment not in DEPLOYED_ENVIRONMENTS:
            return problems
        where = self._where()
        if self.session_cookie_secure is False:
            problems.append(
                f"{Var.SESSION_COOKIE_SECURE}=false is refused {where}: the session cookie must "
                "only travel over HTTPS; remove the variable."
            )
        if not self.session_cookie_httponly:
            problems.append(
                f"{Var.SESSION_COOKIE_HTTPONLY}=false is refused {where}: scripts must not read "
                "the session cookie; remove the variable."
            )
        if samesite not in ("Lax", "Strict"):
            problems.append(f"{Var.SESSION_COOKIE_SAMESITE} must be Lax or Strict {where}.")
        return problems

    # -- display (never a secret) ----------------------------------------------------------------

    def redacted(self) -> dict[str, Any]:
        """The effective settings keyed by variable name, every secret replaced by ``***``."""

        def secret(value: str | None) -> str | None:
            return REDACTED if value else None

        return {
            Var.ENV: self.environment,
            Var.K_SERVICE: self.cloud_run_service,
            Var.SESSION_STORE_BACKEND: self.session_store_backend,
            Var.SECRET_KEY: secret(self.secret_key),
            Var.SESSION_LIFETIME: int(self.session_lifetime.total_seconds()),
            Var.SESSION_ABSOLUTE_LIFETIME: int(self.session_absolute_lifetime.total_seconds()),
            Var.SESSION_MAX_BYTES: self.session_max_bytes,
            Var.SESSION_KEY_PREFIX: self.session_key_prefix,
            Var.SESSION_COOKIE_NAME: self.session_cookie_name,
            Var.SESSION_COOKIE_SECURE: self.cookie_secure,
            Var.SESSION_COOKIE_HTTPONLY: self.session_cookie_httponly,
            Var.SESSION_COOKIE_SAMESITE: self.session_cookie_samesite,
            Var.REDIS_URL: redact_url(self.redis_url),
            Var.REDIS_SOCKET_TIMEOUT: self.redis_socket_timeout,
            Var.REDIS_CONNECT_TIMEOUT: self.redis_connect_timeout,
            Var.REDIS_SSL_CA_CERTS: self.redis_ssl_ca_certs,
            Var.REDIS_SSL_CHECK_HOSTNAME: self.redis_ssl_check_hostname,
            Var.FIRESTORE_PROJECT: self.firestore_project,
            Var.FIRESTORE_DATABASE: self.firestore_database,
            Var.FIRESTORE_COLLECTION: self.firestore_collection,
            Var.FIRESTORE_TIMEOUT: self.firestore_timeout,
            Var.FIRESTORE_REFRESH_INTERVAL: int(self.refresh_interval.total_seconds()),
            Var.TRUSTED_PROXY_HOPS: self.proxy_hops,
            Var.WHATSAPP_ACCESS_TOKEN: secret(self.whatsapp_access_token),
        }

    def __repr__(self) -> str:
        body = ", ".join(f"{name}={value!r}" for name, value in self.redacted().items())
        return f"Settings({body})"


def is_valid_redis_url(url: str) -> bool:
    """``redis://`` or ``rediss://`` with a host and, if given, a numeric port and db.

    (marshmallow's URL validator compiles a regex that alone costs ~60 ms of cold start.)
    """
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        return False
    db = parts.path.lstrip("/")
    return (
        parts.scheme in ("redis", "rediss")
        and bool(parts.hostname)
        and port_ok
        and (not db or db.isdigit())
        and not any(c.isspace() for c in url)
    )


def is_valid_collection_id(name: str) -> bool:
    """Firestore's rules for a collection id (and a document id)."""
    if not name or "/" in name or name in (".", ".."):
        return False
    if name.startswith("__") and name.endswith("__"):
        return False
    return len(name.encode()) <= 1500
