"""Flask-Limiter's storage under the session store's fail-fast rule.

Flask-Limiter counts in process memory unless told otherwise, and an explicit ``memory://``
silences even its warning: on Cloud Run that is one count per instance and per gunicorn worker,
i.e. no limit. So when an app uses Flask-Limiter (a ``RATELIMIT_*`` key in ``app.config``, one
of the variables below in the environment, or a ``Limiter`` registered on the app), a deployed
app refuses a per-process storage and the two switches that lift or split the limit when the
storage fails.

Split like the settings: :func:`rate_limit_storages` gathers the facts from a config mapping,
the registered limiters and an environ (no IO, and no import of Flask-Limiter, which this
package does not depend on); :func:`rate_limit_problems` judges them against the settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .settings import redact_url

if TYPE_CHECKING:
    from .settings import Settings


class RateLimitVar:
    """Flask-Limiter's keys this rule reads (the same names in ``app.config`` and the
    environment)."""

    STORAGE_URI: Final = "RATELIMIT_STORAGE_URI"
    SWALLOW_ERRORS: Final = "RATELIMIT_SWALLOW_ERRORS"
    IN_MEMORY_FALLBACK_ENABLED: Final = "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED"
    IN_MEMORY_FALLBACK: Final = "RATELIMIT_IN_MEMORY_FALLBACK"
    ENABLED: Final = "RATELIMIT_ENABLED"


#: Variables read from the environment when the app's config lacks them.
ENVIRONMENT_VARIABLES: Final = (
    RateLimitVar.STORAGE_URI,
    RateLimitVar.SWALLOW_ERRORS,
    RateLimitVar.IN_MEMORY_FALLBACK_ENABLED,
)
#: Flask-Limiter's entry in ``app.extensions`` (a set of ``Limiter`` objects).
LIMITER_EXTENSION: Final = "limiter"
#: Storage schemes of the ``limits`` library that count inside the process.
PER_PROCESS_SCHEMES: Final = frozenset({"memory"})
_TRUE: Final = frozenset({"1", "true", "yes", "on", "y", "t"})
_SHARED: Final = (
    "a storage every instance shares, such as the session store's Redis (the same REDIS_URL: "
    "redis://, rediss:// or redis+cluster://)"
)


@dataclass(frozen=True, repr=False)
class RateLimitStorage:
    """Where one Flask-Limiter counts, and what it does when that storage fails."""

    #: The storage URI it uses; None: none given, which Flask-Limiter takes as memory.
    storage_uri: str | None = None
    swallow_errors: bool = False
    in_memory_fallback: bool = False
    #: A RATELIMIT_STORAGE_URI in the environment that a registered Limiter does not use
    #: (Flask-Limiter reads app.config only).
    environ_uri_unused: bool = False

    @property
    def per_process(self) -> bool:
        if not self.storage_uri:
            return True
        scheme, _, _ = self.storage_uri.partition("://")
        return scheme.strip().lower() in PER_PROCESS_SCHEMES

    @property
    def shown_uri(self) -> str:
        """The storage URI with any password replaced by ``***`` (as REDIS_URL is shown)."""
        if not self.storage_uri:
            return f"memory ({RateLimitVar.STORAGE_URI} not set)"
        return redact_url(self.storage_uri) or ""

    def __repr__(self) -> str:
        return (
            f"RateLimitStorage(storage_uri={self.shown_uri!r}, "
            f"swallow_errors={self.swallow_errors}, in_memory_fallback={self.in_memory_fallback})"
        )

    def problems(self, where: str) -> list[str]:
        """What a deployed app may not run with (``where``: ``in production``, ...)."""
        problems: list[str] = []
        uri = RateLimitVar.STORAGE_URI
        if self.per_process:
            unused = (
                f" (the environment's {uri} is not read by Flask-Limiter, which reads app.config "
                "only: copy it there)"
                if self.environ_uri_unused
                else ""
            )
            stated = f"with {uri}={self.shown_uri}" if self.storage_uri else f"without {uri}"
            problems.append(
                f"Flask-Limiter {stated} is refused {where}: it then counts requests in "
                "each process's memory, so every instance and worker has its own count (no "
                f"limit across them){unused}; set {uri} (or Limiter(storage_uri=...)) to "
                f"{_SHARED}."
            )
        if self.in_memory_fallback:
            problems.append(
                f"{RateLimitVar.IN_MEMORY_FALLBACK_ENABLED} (or {RateLimitVar.IN_MEMORY_FALLBACK}"
                f", Limiter(in_memory_fallback...)) is refused {where}: when the storage fails, "
                "Flask-Limiter then counts in each process's memory, one limit per instance; "
                "remove it (a storage failure then fails the request instead)."
            )
        if self.swallow_errors:
            problems.append(
                f"{RateLimitVar.SWALLOW_ERRORS} (or Limiter(swallow_errors=True)) is refused "
                f"{where}: when the storage fails, Flask-Limiter then lets every request through "
                "unlimited; remove it or set it to False (a storage failure then fails the "
                "request instead)."
            )
        return problems


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


def _environ_on(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in _TRUE


def limiters(extensions: Mapping[str, Any]) -> list[Any]:
    """The Flask-Limiter objects registered on an app (``app.extensions``)."""
    found = extensions.get(LIMITER_EXTENSION)
    if found is None:
        return []
    if isinstance(found, set | frozenset | list | tuple):
        return list(found)
    return [found]


def _of_limiter(
    limiter: Any, config: Mapping[str, Any], environ_uri: str | None
) -> RateLimitStorage | None:
    """A registered Limiter's effective values: its constructor's arguments come before
    ``app.config``, as in Flask-Limiter's ``init_app``."""
    if getattr(limiter, "enabled", True) is False:
        return None
    uri = _text(getattr(limiter, "_storage_uri", None)) or _text(
        config.get(RateLimitVar.STORAGE_URI)
    )
    swallow = getattr(limiter, "_swallow_errors", None)
    if swallow is None:
        swallow = config.get(RateLimitVar.SWALLOW_ERRORS)
    fallback = (
        getattr(limiter, "_in_memory_fallback_enabled", None)
        or config.get(RateLimitVar.IN_MEMORY_FALLBACK_ENABLED)
        or config.get(RateLimitVar.IN_MEMORY_FALLBACK)
    )
    return RateLimitStorage(
        storage_uri=uri,
        swallow_errors=bool(swallow),
        in_memory_fallback=bool(fallback),
        environ_uri_unused=environ_uri is not None and environ_uri != uri,
    )


def rate_limit_storages(
    config: Mapping[str, Any], registered: Iterable[Any], environ: Mapping[str, str]
) -> list[RateLimitStorage]:
    """The storage of each Limiter registered on the app; with none registered, the one its
    ``RATELIMIT_*`` configuration (``app.config`` first, then ``environ``) describes; none when
    the app does not use Flask-Limiter or turns it off (``RATELIMIT_ENABLED=False``). Pure."""
    environ_uri = _text(environ.get(RateLimitVar.STORAGE_URI))
    found = [_of_limiter(limiter, config, environ_uri) for limiter in registered]
    if found:
        return [storage for storage in found if storage is not None]
    if config.get(RateLimitVar.ENABLED, True) is False:
        return []
    in_config = any(str(key).startswith("RATELIMIT_") for key in config)
    in_environ = any(environ.get(name) for name in ENVIRONMENT_VARIABLES)
    if not (in_config or in_environ):
        return []

    def on(name: str) -> bool:
        return bool(config[name]) if name in config else _environ_on(environ, name)

    return [
        RateLimitStorage(
            storage_uri=_text(config.get(RateLimitVar.STORAGE_URI)) or environ_uri,
            swallow_errors=on(RateLimitVar.SWALLOW_ERRORS),
            in_memory_fallback=on(RateLimitVar.IN_MEMORY_FALLBACK_ENABLED)
            or bool(config.get(RateLimitVar.IN_MEMORY_FALLBACK)),
        )
    ]


def rate_limit_problems(storages: Iterable[RateLimitStorage], settings: Settings) -> list[str]:
    """Every rate-limit problem for the settings' environment (none unless deployed). Pure."""
    if not settings.is_deployed:
        return []
    where = settings.where()
    problems: list[str] = []
    for storage in storages:
        problems += storage.problems(where)
    return list(dict.fromkeys(problems))  # two Limiters configured alike: said once
