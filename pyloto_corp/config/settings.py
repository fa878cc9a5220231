"""One frozen, typed settings object: parsed from the environment with environs, validated purely.

``Settings.from_env()`` only converts types (a value that does not parse becomes a problem, not an
exception), and ``Settings.validate()`` applies every rule to the object and returns the list of
problems. Nothing here does IO, so the same rules run at app init, in ``check`` and in tests.

The core settings (environment, secret, cookies, lifetimes) live here; each backend's own
variables, parsing and rules live in its module (``Options`` in ``records/<backend>``),
found through :func:`backend_options`, so a new backend adds nothing to this file.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from environs import Env, EnvValidationError

if TYPE_CHECKING:
    from ..records.base import StoreOptions


class Var:
    """Every core environment variable the service reads, named in one place (each backend's
    own variables are listed by its ``Options.VARIABLES``)."""

    ENV: Final = "ENV"
    K_SERVICE: Final = "K_SERVICE"
    GOOGLE_CLOUD_PROJECT: Final = "GOOGLE_CLOUD_PROJECT"
    SECRET_KEY: Final = "SECRET_KEY"  # noqa: S105 - a variable name, not a secret
    SECRET_KEY_FALLBACKS: Final = "SECRET_KEY_FALLBACKS"  # noqa: S105 - a variable name
    SESSION_STORE_BACKEND: Final = "SESSION_STORE_BACKEND"
    SESSION_STORE_COOLDOWN: Final = "SESSION_STORE_COOLDOWN"
    SESSION_LIFETIME: Final = "SESSION_LIFETIME"
    SESSION_ABSOLUTE_LIFETIME: Final = "SESSION_ABSOLUTE_LIFETIME"
    SESSION_ANONYMOUS_LIFETIME: Final = "SESSION_ANONYMOUS_LIFETIME"
    SESSION_PERMANENT: Final = "SESSION_PERMANENT"
    SESSION_ID_LENGTH: Final = "SESSION_ID_LENGTH"
    SESSION_MAX_BYTES: Final = "SESSION_MAX_BYTES"
    SESSION_KEY_PREFIX: Final = "SESSION_KEY_PREFIX"
    SESSION_USER_KEY: Final = "SESSION_USER_KEY"
    SESSION_ROTATE_ON_LOGIN: Final = "SESSION_ROTATE_ON_LOGIN"
    SESSION_MAX_PER_USER: Final = "SESSION_MAX_PER_USER"
    SESSION_COOKIE_NAME: Final = "SESSION_COOKIE_NAME"
    SESSION_COOKIE_SECURE: Final = "SESSION_COOKIE_SECURE"
    SESSION_COOKIE_HTTPONLY: Final = "SESSION_COOKIE_HTTPONLY"
    SESSION_COOKIE_SAMESITE: Final = "SESSION_COOKIE_SAMESITE"
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
#: The backend registry: a name is a module (or package) ``pyloto_corp.records.<name>``.
BACKENDS: Final = (MEMORY, REDIS, FIRESTORE)

SAMESITE_VALUES: Final = ("Lax", "Strict", "None")
MIN_SECRET_KEY_LENGTH: Final = 32
#: A deployed SECRET_KEY with fewer different characters than this is guessable, whatever its
#: length (``'a' * 32``, ``'s3cr3t-kkkk...'``); a generated key has dozens.
MIN_SECRET_KEY_DISTINCT: Final = 8
#: The prefix every service gets unless it sets its own (kept: changing a default prefix would
#: end every stored session at the deploy that brings it).
DEFAULT_KEY_PREFIX: Final = "session:"
#: Shown instead of a value that is not one of a variable's choices (it may be anything, a
#: secret pasted into the wrong variable included).
NOT_A_CHOICE: Final = "(not one of the allowed values)"
#: What ``redacted()`` shows of a free-form value its rules refuse (a pasted secret, say).
INVALID: Final = "(invalid)"
#: Browsers cap a cookie's lifetime at 400 days (RFC 6265bis); longer lifetimes mean nothing.
MAX_LIFETIME: Final = timedelta(days=400)
#: Idle timeout of a session without a user, unless SESSION_ANONYMOUS_LIFETIME says otherwise.
DEFAULT_ANONYMOUS_LIFETIME: Final = timedelta(minutes=30)
REDACTED: Final = "***"
#: Flask's cookie name, and the session cookie's name wherever it cannot be a host cookie.
DEFAULT_COOKIE_NAME: Final = "session"
#: Browsers keep a cookie named so only when it is Secure, has ``Path=/`` and no ``Domain``
#: (RFC 6265bis): no sibling subdomain and no plain-HTTP answer can set or replace it.
HOST_PREFIX: Final = "__Host-"
#: Browsers keep a cookie named so only when it is Secure.
SECURE_PREFIX: Final = "__Secure-"
#: The session cookie's name when deployed, unless SESSION_COOKIE_NAME says otherwise.
DEFAULT_HOST_COOKIE_NAME: Final = HOST_PREFIX + DEFAULT_COOKIE_NAME
#: Separates the keys of SECRET_KEY_FALLBACKS in the environment (generated keys never hold it).
FALLBACKS_SEPARATOR: Final = ","
#: RFC 6265 cookie-name token: visible ASCII except separators.
_COOKIE_NAME_SEPARATORS: Final = frozenset('()<>@,;:\\"/[]?={} \t')


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
    """The URL with everything between ``://`` and the last ``@`` replaced by ``***``.

    Deliberately not a URL parser: a password holding ``/``, ``#``, ``?`` or ``@`` confuses
    ``urlsplit`` (the password lands in the path or the fragment), and a redaction that depends
    on parsing leaks exactly then. Without ``://`` any ``@`` hides the whole value.
    """
    if not url:
        return url
    scheme, separator, rest = url.partition("://")
    if not separator:
        return REDACTED if "@" in url else url
    _userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}://{REDACTED}@{host}"


def is_cookie_name(name: str) -> bool:
    """An RFC 6265 token: browsers drop a cookie whose name is not one, so sessions never stick."""
    return bool(name) and all(
        "!" <= char <= "~" and char not in _COOKIE_NAME_SEPARATORS for char in name
    )


def has_prefix(name: str, prefix: str) -> bool:
    """Whether a cookie name carries ``prefix`` as browsers match it (case-insensitively)."""
    return name[: len(prefix)].lower() == prefix.lower()


def previous_cookie_name(name: str) -> str | None:
    """The name a ``__Host-`` session cookie had before it took the prefix (``__Host-session``
    -> ``session``): read when a request carries only that one, so the upgrade logs no one out."""
    if has_prefix(name, HOST_PREFIX) and len(name) > len(HOST_PREFIX):
        return name[len(HOST_PREFIX) :]
    return None


def split_fallbacks(value: str) -> tuple[str, ...]:
    """SECRET_KEY_FALLBACKS from the environment: comma-separated keys, spaces around each
    trimmed, empty entries ignored (``SECRET_KEY_FALLBACKS=`` means none)."""
    return tuple(key.strip() for key in value.split(FALLBACKS_SEPARATOR) if key.strip())


def is_weak_secret(key: str | bytes) -> bool:
    """Obviously guessable: fewer than 8 different characters, or one pattern repeated (a unit of
    at most half the key, ``'ab' * 16``, ``'changeme' * 4``). Not a strength estimate: a key
    that passes may still be weak; one that fails certainly is."""
    if len(set(key)) < MIN_SECRET_KEY_DISTINCT:
        return True
    return any(key[period:] == key[:-period] for period in range(1, len(key) // 2 + 1))


def backend_options(backend: str) -> type[StoreOptions]:
    """The ``Options`` class of a registered backend (importing its module, and only that one)."""
    module = importlib.import_module(f"pyloto_corp.records.{backend}")
    options: type[StoreOptions] = module.Options
    return options


def _fallbacks(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else split_fallbacks(value)


class _MappingEnv(Env):
    """environs' Env reading a given mapping instead of ``os.environ`` (for tests and ``check``)."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(eager=False)
        self._source = environ
        #: Durations environs could not even represent (it raises instead of collecting them).
        self.overflows: list[str] = []

    def _get_value(self, env_key: str, default: Any) -> Any:
        return self._source.get(env_key, default)

    def timedelta(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        try:
            return super().timedelta(name, default)
        except OverflowError:
            self.overflows.append(f"{name}: Not a valid duration (far beyond the 400-day maximum).")
            return None


@dataclasses.dataclass(frozen=True, repr=False)
class Settings:
    """Everything the app needs from its environment; the single source of truth after parsing.

    Construct it with keywords in tests (every field has a default) or with :meth:`from_env`.
    ``store`` holds the chosen backend's own options (``RedisOptions(url=...)``); left out, the
    backend's defaults are used.
    """

    environment: str = DEVELOPMENT
    #: Cloud Run's service name (``K_SERVICE``); set means "stateless instance, whatever ENV says".
    cloud_run_service: str | None = None
    #: ``GOOGLE_CLOUD_PROJECT``: the project logs are traced to (and Firestore's default).
    google_cloud_project: str | None = None
    session_store_backend: str = MEMORY
    secret_key: str | bytes | None = None
    #: Earlier keys, still accepted where something was signed or derived under them (Flask's
    #: ``SECRET_KEY_FALLBACKS``; keyed state finds its entries under them). Newest first.
    secret_key_fallbacks: tuple[str | bytes, ...] = ()
    #: Idle timeout: a session not used for this long expires (sliding on every use).
    session_lifetime: timedelta = timedelta(hours=12)
    #: Idle timeout of a session without a user (no ``SESSION_USER_KEY``): None means 30 minutes,
    #: or ``session_lifetime`` when that is shorter (see :attr:`anonymous_lifetime`).
    session_anonymous_lifetime: timedelta | None = None
    #: Absolute timeout: a session ends this long after it began, however active.
    session_absolute_lifetime: timedelta = timedelta(days=7)
    #: False (Flask's own default): the cookie lasts until the browser closes, and Flask-Login's
    #: "strong" session protection applies; True: it expires at the absolute timeout.
    session_permanent: bool = False
    #: Bytes of randomness in a session id (``secrets.token_urlsafe``).
    session_id_length: int = 32
    #: Largest encoded session a backend accepts (Firestore is also capped by its 1 MiB limit).
    session_max_bytes: int = 512 * 1024
    session_key_prefix: str = DEFAULT_KEY_PREFIX
    #: The session key naming its user (Flask-Login's): what "log out everywhere" indexes.
    session_user_key: str = "_user_id"
    #: Move the session to a new id when SESSION_USER_KEY appears or changes in a request that
    #: did not call rotate_session_id() (session fixation defence by default).
    session_rotate_on_login: bool = True
    #: Seconds a process answers 503 at once after a store failure before one request tries
    #: the store again (0: off, every request spends its own timeout).
    session_store_cooldown: float = 1.0
    #: Live sessions one user may have; a login beyond it ends that user's oldest (0: no cap).
    session_max_per_user: int = 1000
    #: None: ``__Host-session`` when deployed (when the cookie can be a host cookie, see
    #: :attr:`cookie_name`), else ``session``.
    session_cookie_name: str | None = None
    #: ``None`` means "safe default": ``True`` when deployed (staging, production, Cloud Run).
    session_cookie_secure: bool | None = None
    session_cookie_httponly: bool = True
    session_cookie_samesite: str | None = "Lax"
    #: Flask's ``SESSION_COOKIE_DOMAIN`` and the cookie's path (``SESSION_COOKIE_PATH``, else
    #: ``APPLICATION_ROOT``), as the host app configured them: no variable of ours sets them;
    #: ``init_app`` reads them from ``app.config`` so the ``__Host-`` rules are checked here.
    session_cookie_domain: str | None = None
    session_cookie_path: str = "/"
    #: Proxies in front of the app whose X-Forwarded-For/-Proto headers are trusted (None: 1 on
    #: Cloud Run, whose front end terminates TLS; 0 elsewhere, where such headers may be forged).
    trusted_proxy_hops: int | None = None
    whatsapp_access_token: str | None = None
    #: The chosen backend's options (None only for an unknown backend name).
    store: StoreOptions | None = None
    #: Values that did not parse (``("REDIS_SOCKET_TIMEOUT: Not a valid number.",)``).
    parse_problems: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Keyword construction and from_env() get the same normalisation.
        set_ = object.__setattr__
        set_(self, "environment", normalise_environment(self.environment))
        set_(self, "session_store_backend", _normalise(self.session_store_backend))
        set_(self, "session_cookie_samesite", normalise_samesite(self.session_cookie_samesite))
        fallbacks: Any = self.secret_key_fallbacks  # as given: validate() names anything else
        if isinstance(fallbacks, list):
            set_(self, "secret_key_fallbacks", tuple(fallbacks))
        if self.store is None and self.session_store_backend in BACKENDS:
            set_(self, "store", backend_options(self.session_store_backend)())

    # -- parsing ---------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse ``environ`` (``os.environ`` when None); never raises for a bad value."""
        env = _MappingEnv(os.environ if environ is None else environ)
        backend = _normalise(env.str(Var.SESSION_STORE_BACKEND, MEMORY) or "")
        values: dict[str, Any] = {
            "environment": env.str(Var.ENV, DEVELOPMENT),
            "cloud_run_service": env.str(Var.K_SERVICE, None) or None,
            "google_cloud_project": env.str(Var.GOOGLE_CLOUD_PROJECT, None) or None,
            "session_store_backend": backend,
            "secret_key": env.str(Var.SECRET_KEY, None),
            "secret_key_fallbacks": _fallbacks(env.str(Var.SECRET_KEY_FALLBACKS, None)),
            "session_lifetime": env.timedelta(Var.SESSION_LIFETIME, None),
            "session_absolute_lifetime": env.timedelta(Var.SESSION_ABSOLUTE_LIFETIME, None),
            "session_anonymous_lifetime": env.timedelta(Var.SESSION_ANONYMOUS_LIFETIME, None),
            "session_permanent": env.bool(Var.SESSION_PERMANENT, None),
            "session_id_length": env.int(Var.SESSION_ID_LENGTH, None),
            "session_max_bytes": env.int(Var.SESSION_MAX_BYTES, None),
            "session_key_prefix": env.str(Var.SESSION_KEY_PREFIX, None),
            "session_user_key": env.str(Var.SESSION_USER_KEY, None),
            "session_rotate_on_login": env.bool(Var.SESSION_ROTATE_ON_LOGIN, None),
            "session_store_cooldown": env.float(Var.SESSION_STORE_COOLDOWN, None),
            "session_max_per_user": env.int(Var.SESSION_MAX_PER_USER, None),
            "session_cookie_name": env.str(Var.SESSION_COOKIE_NAME, None),
            "session_cookie_secure": env.bool(Var.SESSION_COOKIE_SECURE, None),
            "session_cookie_httponly": env.bool(Var.SESSION_COOKIE_HTTPONLY, None),
            "session_cookie_samesite": env.str(Var.SESSION_COOKIE_SAMESITE, None),
            "trusted_proxy_hops": env.int(Var.TRUSTED_PROXY_HOPS, None),
            "whatsapp_access_token": env.str(Var.WHATSAPP_ACCESS_TOKEN, None),
        }
        if backend in BACKENDS:
            values["store"] = backend_options(backend).from_env(env)
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
        problems += tuple(env.overflows)
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
    def anonymous_lifetime(self) -> timedelta:
        """The effective idle timeout of a session without a user: short, so that requests
        without a cookie (each creates a session when its view writes one, a CSRF token) cannot
        fill the store for the users' full lifetime."""
        if self.session_anonymous_lifetime is None:
            return min(DEFAULT_ANONYMOUS_LIFETIME, self.session_lifetime)
        return self.session_anonymous_lifetime

    @property
    def cookie_secure(self) -> bool:
        """The effective ``Secure`` flag (an unset value is safe when deployed: Cloud Run serves
        HTTPS only, whatever ENV says)."""
        if self.session_cookie_secure is None:
            return self.is_deployed
        return self.session_cookie_secure

    @property
    def cookie_name(self) -> str:
        """The effective session cookie name: SESSION_COOKIE_NAME when set; else, when
        deployed, ``__Host-session`` (unless the host app's domain or path rules it out: then
        ``session``, and :meth:`advice` says why); ``session`` elsewhere."""
        if self.session_cookie_name is not None:
            return self.session_cookie_name
        if self.is_deployed and self._host_cookie_possible:
            return DEFAULT_HOST_COOKIE_NAME
        return DEFAULT_COOKIE_NAME

    @property
    def _host_cookie_possible(self) -> bool:
        return not self.session_cookie_domain and self.session_cookie_path == "/"

    @property
    def trace_project(self) -> str | None:
        """The project Cloud Logging traces belong to."""
        project = getattr(self.store, "project", None)
        return project if isinstance(project, str) else self.google_cloud_project

    def where(self) -> str:
        """``in production`` or ``on Cloud Run (K_SERVICE is set)``, for refusal messages."""
        if self.environment in DEPLOYED_ENVIRONMENTS:
            return f"in {self.environment}"
        return f"on Cloud Run ({Var.K_SERVICE} is set)"

    # -- validation (pure: the object in, a list of problems out) ---------------------------------

    def validate_session_store_config(self) -> list[str]:
        """Every problem with the session store settings; an empty list means valid."""
        problems: list[str] = []
        backend = self.session_store_backend
        if backend not in BACKENDS:
            # Never the value: it may be a secret pasted into the wrong variable.
            problems.append(
                f"{Var.SESSION_STORE_BACKEND} is not a session store backend; "
                f"use one of: {', '.join(BACKENDS)}."
            )
        elif self.store is None or self.store.backend != backend:
            problems.append(
                f"{Var.SESSION_STORE_BACKEND}={backend} does not match the store options given "
                f"({type(self.store).__name__}); pass the options of the {backend} backend."
            )
        else:
            problems += self.store.problems(self)
        if not self.session_key_prefix or len(self.session_key_prefix) > 100:
            problems.append(f"{Var.SESSION_KEY_PREFIX} must be 1 to 100 characters.")
        if not 0 < len(self.session_user_key) <= 200:
            problems.append(
                f"{Var.SESSION_USER_KEY} must be 1 to 200 characters (default _user_id, the key "
                "Flask-Login writes)."
            )
        if not 0 <= self.session_store_cooldown <= 60:  # also refuses NaN
            problems.append(
                f"{Var.SESSION_STORE_COOLDOWN} must be 0 (off) to 60 seconds (default 1): how "
                "long a process answers 503 at once after the store failed."
            )
        if not 0 <= self.session_max_per_user <= 1_000_000:
            problems.append(
                f"{Var.SESSION_MAX_PER_USER} must be 0 (no cap) to 1000000 sessions per user "
                "(default 1000)."
            )
        problems += self._lifetime_problems()
        if not 1024 <= self.session_max_bytes <= 64 * 1024 * 1024:
            problems.append(f"{Var.SESSION_MAX_BYTES} must be between 1024 and 67108864 bytes.")
        if not 16 <= self.session_id_length <= 128:
            problems.append(
                f"{Var.SESSION_ID_LENGTH} must be 16 to 128 bytes of randomness (default 32)."
            )
        return problems

    def _lifetime_problems(self) -> list[str]:
        lifetime, absolute = self.session_lifetime, self.session_absolute_lifetime
        problems: list[str] = []
        if not timedelta(0) < lifetime <= MAX_LIFETIME:
            problems.append(
                f"{Var.SESSION_LIFETIME} must be a positive duration of at most 400 days "
                "(for example 12h or 3600)."
            )
        if not timedelta(0) < absolute <= MAX_LIFETIME:
            problems.append(
                f"{Var.SESSION_ABSOLUTE_LIFETIME} must be a positive duration of at most 400 "
                "days, the longest a browser keeps a cookie (for example 7d)."
            )
        elif absolute < lifetime:
            problems.append(
                f"{Var.SESSION_ABSOLUTE_LIFETIME} must be at least {Var.SESSION_LIFETIME} "
                "(the absolute timeout cannot end a session before its idle timeout)."
            )
        anonymous = self.session_anonymous_lifetime
        if anonymous is not None and not timedelta(0) < anonymous <= lifetime:
            problems.append(
                f"{Var.SESSION_ANONYMOUS_LIFETIME} must be a positive duration of at most "
                f"{Var.SESSION_LIFETIME} (for example 30m or 1800; default 30 minutes): it is the "
                "idle timeout of sessions without a signed-in user."
            )
        return problems

    def validate(self) -> list[str]:
        """Every problem in the settings, in a stable order; an empty list means valid."""
        problems = list(self.parse_problems)
        if self.environment not in ENVIRONMENTS:
            known = "development (dev), local, test (testing), staging (stage), production (prod)"
            problems.append(f"{Var.ENV} is not a known environment; use one of: {known}.")
        problems += self.validate_session_store_config()
        if not 0 <= self.proxy_hops <= 5:
            problems.append(f"{Var.TRUSTED_PROXY_HOPS} must be a whole number from 0 to 5.")
        problems += self._secret_key_problems()
        problems += self._cookie_problems()
        return problems

    def _secret_key_problems(self) -> list[str]:
        fallbacks: Any = self.secret_key_fallbacks
        if not isinstance(fallbacks, tuple) or not all(
            isinstance(key, str | bytes) for key in fallbacks
        ):
            # Never the value. A string would be read by Flask one character at a time.
            return [
                f"{Var.SECRET_KEY_FALLBACKS} must be a list of keys (strings or bytes); in the "
                "environment, separate them with commas."
            ]
        if not self.is_deployed:
            return []
        problems = self._key_problems(Var.SECRET_KEY, self.secret_key)
        for number, key in enumerate(fallbacks, start=1):
            problems += self._key_problems(f"{Var.SECRET_KEY_FALLBACKS} entry {number}", key)
        return problems

    def _key_problems(self, name: str, key: str | bytes | None) -> list[str]:
        """The deployed rules of one key; ``name`` says which (never its value)."""
        if not key:
            return [
                f"{name} is required {self.where()}; generate one with "
                "python -c 'import secrets; print(secrets.token_urlsafe(48))'."
            ]
        if len(key) < MIN_SECRET_KEY_LENGTH:
            return [
                f"{name} is too short {self.where()}: it needs at least "
                f"{MIN_SECRET_KEY_LENGTH} characters."
            ]
        if is_weak_secret(key):
            return [
                f"{name} is too weak {self.where()}: it repeats a short pattern or uses "
                f"fewer than {MIN_SECRET_KEY_DISTINCT} different characters; generate one with "
                "python -c 'import secrets; print(secrets.token_urlsafe(48))'."
            ]
        return []

    def _cookie_problems(self) -> list[str]:
        problems: list[str] = []
        if not is_cookie_name(self.cookie_name):
            problems.append(
                f"{Var.SESSION_COOKIE_NAME} must be a cookie name: printable ASCII letters, "
                "digits and !#$%&'*+-.^_`|~ only (no spaces, ';', ',', '=' or quotes); browsers "
                "drop any other cookie."
            )
        samesite = self.session_cookie_samesite
        if samesite is not None and samesite not in SAMESITE_VALUES:
            problems.append(f"{Var.SESSION_COOKIE_SAMESITE} is not valid; use Lax, Strict or None.")
        problems += self._prefix_problems()
        if not self.is_deployed:
            return problems
        where = self.where()
        if self.session_cookie_secure is False:
            problems.append(
                f"{Var.SESSION_COOKIE_SECURE}=false is refused {where}: the session cookie must "
                "only travel over HTTPS; remove the setting."
            )
        if not self.session_cookie_httponly:
            problems.append(
                f"{Var.SESSION_COOKIE_HTTPONLY}=false is refused {where}: scripts must not read "
                "the session cookie; remove the setting."
            )
        if samesite not in ("Lax", "Strict"):
            problems.append(f"{Var.SESSION_COOKIE_SAMESITE} must be Lax or Strict {where}.")
        return problems

    def _prefix_problems(self) -> list[str]:
        """A ``__Host-``/``__Secure-`` name the browser would drop, in any environment (a
        cookie that is never kept is a session that never sticks)."""
        name, problems = self.cookie_name, []
        host, secure = has_prefix(name, HOST_PREFIX), has_prefix(name, SECURE_PREFIX)
        if host and self.session_cookie_domain:
            problems.append(
                f"{Var.SESSION_COOKIE_NAME} starts with {HOST_PREFIX}, and SESSION_COOKIE_DOMAIN "
                "is set: browsers drop such a cookie (it must have no Domain); remove "
                "SESSION_COOKIE_DOMAIN, or choose a name without the prefix."
            )
        if host and self.session_cookie_path != "/":
            problems.append(
                f"{Var.SESSION_COOKIE_NAME} starts with {HOST_PREFIX}, and the cookie's path "
                "(SESSION_COOKIE_PATH, else APPLICATION_ROOT) is not /: browsers drop such a "
                "cookie; set SESSION_COOKIE_PATH to /, or choose a name without the prefix."
            )
        # Deployed, an insecure cookie is refused by _cookie_problems already.
        if (host or secure) and not self.cookie_secure and not self.is_deployed:
            prefix = HOST_PREFIX if host else SECURE_PREFIX
            problems.append(
                f"{Var.SESSION_COOKIE_NAME} starts with {prefix}, and {Var.SESSION_COOKIE_SECURE} "
                "is false: browsers drop such a cookie; set SESSION_COOKIE_SECURE=true "
                "(browsers keep Secure cookies from http://localhost), or choose a name without "
                "the prefix."
            )
        return problems

    @property
    def session_service(self) -> str | None:
        """The service whose sessions these are, stamped into each record and checked on read:
        Cloud Run's service name when the key prefix is the shared default (two services on one
        store would otherwise accept each other's cookies); None otherwise (a chosen prefix is
        the isolation, and services that share one mean to share sessions)."""
        if self.on_cloud_run and self.session_key_prefix == DEFAULT_KEY_PREFIX:
            return self.cloud_run_service
        return None

    def advice(self) -> list[str]:
        """What works but deserves a look (logged at init, printed by ``check``); pure."""
        advice = self._cookie_name_advice()
        if self.on_cloud_run and self.session_key_prefix == DEFAULT_KEY_PREFIX:
            advice += [
                f"{Var.SESSION_KEY_PREFIX} is the default {DEFAULT_KEY_PREFIX!r} on Cloud Run: "
                "each service's sessions are stamped with its name and another's are refused, "
                "but they still share one 'log out everywhere' index; give each service its "
                f"own prefix (for example {Var.SESSION_KEY_PREFIX}=session:"
                f"{self.cloud_run_service}:) before its first deploy (changing it later ends "
                "the sessions stored under the old prefix)."
            ]
        return advice

    def _cookie_name_advice(self) -> list[str]:
        if self.session_cookie_name is not None or not self.is_deployed:
            return []
        if self._host_cookie_possible:
            return []
        return [
            f"The session cookie is named {DEFAULT_COOKIE_NAME!r}, not "
            f"{DEFAULT_HOST_COOKIE_NAME!r}: SESSION_COOKIE_DOMAIN or a cookie path other than / "
            "is set, and browsers keep a __Host- cookie only without both, so a sibling "
            f"subdomain can set this one; set {Var.SESSION_COOKIE_NAME} to choose the name."
        ]

    # -- display (never a secret) ----------------------------------------------------------------

    def redacted(self) -> dict[str, Any]:
        """The effective settings keyed by variable name, every secret replaced by ``***``."""

        def secret(value: str | bytes | None) -> str | None:
            return REDACTED if value else None

        def choice(value: str | None, choices: tuple[str | None, ...]) -> str | None:
            return value if value in choices else NOT_A_CHOICE

        def text(value: str, valid: bool) -> str:
            return value if valid else INVALID

        values: dict[str, Any] = {
            Var.ENV: choice(self.environment, ENVIRONMENTS),
            Var.K_SERVICE: self.cloud_run_service,
            Var.GOOGLE_CLOUD_PROJECT: self.google_cloud_project,
            Var.SESSION_STORE_BACKEND: choice(self.session_store_backend, BACKENDS),
            Var.SECRET_KEY: secret(self.secret_key),
            Var.SECRET_KEY_FALLBACKS: self._redacted_fallbacks(),
            Var.SESSION_LIFETIME: int(self.session_lifetime.total_seconds()),
            Var.SESSION_ABSOLUTE_LIFETIME: int(self.session_absolute_lifetime.total_seconds()),
            Var.SESSION_ANONYMOUS_LIFETIME: int(self.anonymous_lifetime.total_seconds()),
            Var.SESSION_PERMANENT: self.session_permanent,
            Var.SESSION_ID_LENGTH: self.session_id_length,
            Var.SESSION_MAX_BYTES: self.session_max_bytes,
            Var.SESSION_KEY_PREFIX: text(
                self.session_key_prefix, 0 < len(self.session_key_prefix) <= 100
            ),
            Var.SESSION_USER_KEY: text(
                self.session_user_key, 0 < len(self.session_user_key) <= 200
            ),
            Var.SESSION_ROTATE_ON_LOGIN: self.session_rotate_on_login,
            Var.SESSION_STORE_COOLDOWN: self.session_store_cooldown,
            Var.SESSION_MAX_PER_USER: self.session_max_per_user,
            Var.SESSION_COOKIE_NAME: text(self.cookie_name, is_cookie_name(self.cookie_name)),
            Var.SESSION_COOKIE_SECURE: self.cookie_secure,
            Var.SESSION_COOKIE_HTTPONLY: self.session_cookie_httponly,
            Var.SESSION_COOKIE_SAMESITE: choice(
                self.session_cookie_samesite, (*SAMESITE_VALUES, None)
            ),
            Var.TRUSTED_PROXY_HOPS: self.proxy_hops,
            Var.WHATSAPP_ACCESS_TOKEN: secret(self.whatsapp_access_token),
        }
        if self.store is not None:
            values.update(self.store.redacted(self))
        return values

    def _redacted_fallbacks(self) -> list[str] | str | None:
        """One ``***`` per key (how many there are is no secret), None when there are none."""
        fallbacks: Any = self.secret_key_fallbacks
        if not isinstance(fallbacks, tuple):
            return INVALID
        return [REDACTED] * len(fallbacks) or None

    def __repr__(self) -> str:
        body = ", ".join(f"{name}={value!r}" for name, value in self.redacted().items())
        return f"Settings({body})"
