"""The effective settings of one app: the host app's ``app.config`` first, then the environment.

Pure, like validation: a config mapping, optional explicit :class:`Settings` and an environ in;
one ``Settings`` and the list of conflicts out. A value the host app set is never silently
replaced: it is used, or it is refused by name (and ``validate()`` then judges the result).

- The extension's own keys (``SESSION_STORE_BACKEND``, ``REDIS_URL``, ``SESSION_LIFETIME``, ...,
  the environment variables' names) are read from ``app.config`` before ``os.environ``.
- Flask's keys (``SECRET_KEY``, ``SECRET_KEY_FALLBACKS``, ``SESSION_COOKIE_*``,
  ``PERMANENT_SESSION_LIFETIME``) count as set when they differ from Flask's defaults; such a
  value is used, and refused only when it contradicts a value given explicitly elsewhere. The
  cookie's domain and path are only read (for the ``__Host-`` rules).
- Flask-Session's keys mean what they meant there, or are refused by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final

from flask import Flask

from .settings import BACKENDS, REDIS, Settings, Var, backend_options

#: Flask's key -> (Settings field, the extension's variable of the same meaning).
FLASK_KEYS: Final = {
    "SECRET_KEY": ("secret_key", Var.SECRET_KEY),
    "SECRET_KEY_FALLBACKS": ("secret_key_fallbacks", Var.SECRET_KEY_FALLBACKS),
    "SESSION_COOKIE_NAME": ("session_cookie_name", Var.SESSION_COOKIE_NAME),
    "SESSION_COOKIE_SECURE": ("session_cookie_secure", Var.SESSION_COOKIE_SECURE),
    "SESSION_COOKIE_HTTPONLY": ("session_cookie_httponly", Var.SESSION_COOKIE_HTTPONLY),
    "SESSION_COOKIE_SAMESITE": ("session_cookie_samesite", Var.SESSION_COOKIE_SAMESITE),
    "PERMANENT_SESSION_LIFETIME": ("session_lifetime", Var.SESSION_LIFETIME),
}

#: Flask-Session keys this extension cannot honour, and why.
REFUSED_FLASK_SESSION_KEYS: Final = {
    "SESSION_USE_SIGNER": "signing an unguessable 256-bit id adds nothing; remove it",
    "SESSION_CLEANUP_N_REQUESTS": (
        "expired sessions are removed by the store itself or by `flask session-store cleanup`; "
        "remove it"
    ),
    "SESSION_CACHELIB": "the stores are memory, redis and firestore; set SESSION_STORE_BACKEND",
    "SESSION_MEMCACHED": "the stores are memory, redis and firestore; set SESSION_STORE_BACKEND",
    "SESSION_FILE_DIR": "the stores are memory, redis and firestore; set SESSION_STORE_BACKEND",
    "SESSION_MONGODB": "the stores are memory, redis and firestore; set SESSION_STORE_BACKEND",
    "SESSION_SQLALCHEMY": "the stores are memory, redis and firestore; set SESSION_STORE_BACKEND",
    "SESSION_DYNAMODB": "the stores are memory, redis and firestore; set SESSION_STORE_BACKEND",
}


def own_variables(backend: str | None) -> tuple[str, ...]:
    """The extension's variables that ``app.config`` may carry (the chosen backend's too)."""
    names = tuple(
        value for name, value in vars(Var).items() if name.isupper() and value not in FLASK_KEYS
    )
    if backend in BACKENDS:
        names += backend_options(backend).VARIABLES
    return names


def _as_text(value: Any) -> str | None:
    """An ``app.config`` value in the form the environment parser reads."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, timedelta):
        return str(int(value.total_seconds()))
    if isinstance(value, int | float | str):
        return str(value)
    raise TypeError(type(value).__name__)


def effective_settings(
    config: Mapping[str, Any], settings: Settings | None, environ: Mapping[str, str]
) -> tuple[Settings, list[str]]:
    """The app's effective settings and the problems of combining its sources."""
    problems: list[str] = []
    backend = _backend(config, settings, environ, problems)
    own = {}
    for name in own_variables(backend):
        if config.get(name) is None:
            continue
        try:
            text = _as_text(config[name])
        except TypeError as exc:
            problems.append(f"app.config[{name!r}] is a {exc}; use a string, number or boolean.")
            continue
        if text is not None:
            own[name] = text
    if backend is not None:
        own[Var.SESSION_STORE_BACKEND] = backend
    if settings is None:
        settings = Settings.from_env({**environ, **own})
    elif own.keys() - {Var.SESSION_STORE_BACKEND}:
        problems += [
            f"app.config[{name!r}] is set, and so are the Settings passed to init_app(); "
            "configure the session store in one place."
            for name in sorted(own.keys() - {Var.SESSION_STORE_BACKEND})
        ]
    _check_flask_session_keys(config, problems)
    return _with_flask_keys(config, settings, problems), problems


def _backend(
    config: Mapping[str, Any],
    settings: Settings | None,
    environ: Mapping[str, str],
    problems: list[str],
) -> str | None:
    """SESSION_STORE_BACKEND from app.config, or Flask-Session's SESSION_TYPE='redis'."""
    chosen = config.get(Var.SESSION_STORE_BACKEND)
    session_type = config.get("SESSION_TYPE")
    if session_type is not None:
        if session_type != REDIS:
            # Never the value (nor below): it may be a secret pasted into the wrong key.
            problems.append(
                "app.config['SESSION_TYPE'] (Flask-Session) is not supported except 'redis'; "
                "set SESSION_STORE_BACKEND to memory, redis or firestore instead."
            )
        elif chosen is not None and str(chosen).strip().lower() != REDIS:
            problems.append(
                "app.config['SESSION_TYPE'] and app.config['SESSION_STORE_BACKEND'] disagree; "
                "keep SESSION_STORE_BACKEND only."
            )
        else:
            chosen = REDIS
    if chosen is None:
        if settings is not None:
            return settings.session_store_backend
        return environ.get(Var.SESSION_STORE_BACKEND, "memory").strip().lower()
    text = str(chosen).strip().lower()
    if settings is not None and text != settings.session_store_backend:
        problems.append(
            f"app.config['{Var.SESSION_STORE_BACKEND}'] contradicts the Settings passed to "
            "init_app(); configure it in one place."
        )
        return settings.session_store_backend
    return text


def _with_flask_keys(
    config: Mapping[str, Any], settings: Settings, problems: list[str]
) -> Settings:
    """Flask's own keys the host set (they differ from Flask's defaults) win over defaults."""
    changes: dict[str, Any] = {}
    defaults = Settings.__dataclass_fields__
    for key, (field, variable) in FLASK_KEYS.items():
        value = config.get(key, Flask.default_config.get(key))
        if value == Flask.default_config.get(key):
            continue
        if key == "PERMANENT_SESSION_LIFETIME" and isinstance(value, int):
            value = timedelta(seconds=value)
        if key == "SECRET_KEY_FALLBACKS":
            value = _fallbacks(value)
        current = getattr(settings, field)
        if current == value:
            continue
        if current != defaults[field].default:
            problems.append(
                f"app.config[{key!r}] and {variable} (from the environment or the Settings) "
                "disagree; set it in one place."
            )
            continue
        changes[field] = value
    changes.update(_cookie_scope(config, settings))
    if config.get("SESSION_REFRESH_EACH_REQUEST") is False:
        problems.append(
            "app.config['SESSION_REFRESH_EACH_REQUEST']=False is not supported: reading a "
            "session slides its idle timeout in the store at no extra cost, and the cookie is "
            "written only when the session changes; remove the setting."
        )
    return dataclasses.replace(settings, **changes) if changes else settings


def _fallbacks(value: Any) -> Any:
    """``app.config['SECRET_KEY_FALLBACKS']`` as a tuple when it is a list or tuple; anything
    else (a string Flask would read one character at a time) as it is, for validation to name."""
    return tuple(value) if isinstance(value, list | tuple) else value


def _cookie_scope(config: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """The host's cookie domain and path (Flask's keys, used as they are), for the ``__Host-``
    rules; a path left unset follows ``APPLICATION_ROOT``, as Flask's does."""
    domain = config.get("SESSION_COOKIE_DOMAIN") or None
    path = config.get("SESSION_COOKIE_PATH") or config.get("APPLICATION_ROOT") or "/"
    scope: dict[str, Any] = {}
    if domain is not None and domain != settings.session_cookie_domain:
        scope["session_cookie_domain"] = domain
    if path != "/" and path != settings.session_cookie_path:
        scope["session_cookie_path"] = path
    return scope


def _check_flask_session_keys(config: Mapping[str, Any], problems: list[str]) -> None:
    """Flask-Session keys a migrating app may still set: honoured or refused by name.

    ``SESSION_KEY_PREFIX``, ``SESSION_PERMANENT`` and ``SESSION_ID_LENGTH`` are also this
    extension's own variables (same names, same meaning); ``SESSION_TYPE='redis'`` chooses the
    backend and ``SESSION_REDIS`` is used as the client (see the extension).
    """
    for key, why in REFUSED_FLASK_SESSION_KEYS.items():
        if config.get(key):
            problems.append(f"app.config[{key!r}] (Flask-Session) is not supported: {why}.")
    if config.get("SESSION_SERIALIZATION_FORMAT", "msgpack") != "msgpack":
        problems.append(
            "app.config['SESSION_SERIALIZATION_FORMAT'] (Flask-Session) is not supported: "
            "sessions are stored in this extension's own tagged msgpack format; remove it."
        )
