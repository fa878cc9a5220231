"""The ``SessionStore`` Flask extension: resolve and validate the app's settings, install the
chosen backend's interface."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app
from flask.sessions import SecureCookieSessionInterface
from werkzeug.middleware.proxy_fix import ProxyFix

from ..config.app_config import effective_settings
from ..config.rate_limits import limiters, rate_limit_problems, rate_limit_storages
from ..config.settings import Settings, Var
from ..errors import ConfigurationError, LeaseLost, SessionStoreUnavailable, StateBusy
from ..records.base import RecordStore
from ..telemetry import instrument
from .base import (
    StoreInterface,
    answer_lease_lost,
    answer_state_busy,
    answer_store_unavailable,
    interface_options,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

logger = logging.getLogger("pyloto_corp.session_store")

EXTENSION_KEY = "pyloto_session_store"


@dataclass(frozen=True)
class StoreState:
    """What one app's registration holds, in ``app.extensions[EXTENSION_KEY]``."""

    settings: Settings
    interface: StoreInterface
    #: The settings were read from the environment (no ``Settings`` passed): ``check`` reads the
    #: environment's RATELIMIT_* variables only then, as init did.
    from_environment: bool = True


class SessionStore:
    """Server-side sessions that survive Cloud Run's stateless instances.

    ``init_app`` resolves the app's effective settings (its own ``app.config`` first, then the
    ``Settings`` passed or the environment), validates them for their environment and raises one
    :class:`~pyloto_corp.errors.ConfigurationError` listing every problem before the app serves
    anything; then it fills in the Flask session keys the app left at their defaults and installs
    the backend's interface. It does no IO.
    """

    def __init__(
        self, app: Flask | None = None, settings: Settings | None = None, *, client: Any = None
    ) -> None:
        if app is not None:
            self.init_app(app, settings, client=client)

    def init_app(self, app: Flask, settings: Settings | None = None, *, client: Any = None) -> None:
        """Register on ``app``; ``client`` (or Flask-Session's ``SESSION_REDIS``) is the store
        client to use as given, instead of one built from the settings (which then need no
        REDIS_URL, or no FIRESTORE_PROJECT)."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "SessionStore is already registered on this app; call init_app once per app."
            )
        if type(app.session_interface) is not SecureCookieSessionInterface:
            raise RuntimeError(
                f"app.session_interface is already a {type(app.session_interface).__name__} "
                "(Flask-Session's Session(app)?); remove that registration: SessionStore "
                "installs its own interface."
            )
        environ = os.environ if settings is None else {}
        settings, problems = effective_settings(app.config, settings, environ)
        client = _client(app, client, problems)
        if client is not None and settings.store is not None:
            # The app's own client: what only builds a client (a URL, a project) is not needed.
            settings = dataclasses.replace(settings, store=settings.store.with_client())
        problems += settings.validate()
        problems += _proxy_problems(app, settings)
        # A Limiter registered before this extension is judged here, one registered after it by
        # `flask session-store check`.
        storages = rate_limit_storages(app.config, limiters(app.extensions), environ)
        problems += rate_limit_problems(storages, settings)
        if problems:
            raise ConfigurationError(settings.environment, problems)

        _configure_flask(app, settings)
        backend = importlib.import_module(f"pyloto_corp.records.{settings.session_store_backend}")
        records: RecordStore = backend.create_store(settings, client)
        # Spans and metrics around every store call (no-ops until an SDK is configured).
        telemetry = instrument(records, records.server_address())
        interface = StoreInterface(app, records, **interface_options(settings))
        interface.telemetry = telemetry
        interface.breaker.on_open = telemetry.opened
        app.session_interface = interface
        # A view that uses the session while the store is down gets a 503, not a 500.
        app.register_error_handler(SessionStoreUnavailable, answer_store_unavailable)
        app.register_error_handler(StateBusy, answer_state_busy)
        app.register_error_handler(LeaseLost, answer_lease_lost)
        app.extensions[EXTENSION_KEY] = StoreState(
            settings=settings, interface=interface, from_environment=environ is os.environ
        )

    @staticmethod
    def state(app: Flask | None = None) -> StoreState:
        """The registration of ``app`` (the current app by default)."""
        target = current_app if app is None else app
        try:
            state: StoreState = target.extensions[EXTENSION_KEY]
        except KeyError:
            raise RuntimeError(
                "SessionStore is not registered on this app; call SessionStore().init_app(app)."
            ) from None
        return state


def _client(app: Flask, client: Any, problems: list[str]) -> Any:
    """``client=``, or Flask-Session's ``SESSION_REDIS``; both and different is refused."""
    configured = app.config.get("SESSION_REDIS")
    if configured is None:
        return client
    if client is not None and client is not configured:
        problems.append(
            "app.config['SESSION_REDIS'] and the client passed to SessionStore differ; "
            "pass one client."
        )
    return configured


class TrustedProxies(ProxyFix):
    """The ``ProxyFix`` installed from ``TRUSTED_PROXY_HOPS``. It steps aside when another
    ``ProxyFix`` already ran (one the host wrapped around ``app.wsgi_app`` after ``init_app``):
    the host's counts decide, never both."""

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if "werkzeug.proxy_fix.orig" in environ:
            return self.app(environ, start_response)
        return super().__call__(environ, start_response)


def _proxy_fixes(app: Flask) -> list[ProxyFix]:
    """The ``ProxyFix`` layers around the app, outermost (first to run) first, found through the
    ``.app`` attribute Werkzeug's middlewares keep."""
    found: list[ProxyFix] = []
    layer: object = app.wsgi_app
    for _ in range(50):  # a chain of middlewares, never a cycle
        if isinstance(layer, ProxyFix):
            found.append(layer)
        layer = getattr(layer, "app", None)
        if layer is None:
            break
    return found


def _host_proxy_fix(app: Flask) -> ProxyFix | None:
    """The host app's own ``ProxyFix`` (the outermost one that is not ours), if any."""
    return next((fix for fix in _proxy_fixes(app) if not isinstance(fix, TrustedProxies)), None)


def _proxy_problems(app: Flask, settings: Settings) -> list[str]:
    """TRUSTED_PROXY_HOPS set, and the host's own ProxyFix applying other counts: refused."""
    own = _host_proxy_fix(app)
    hops = settings.trusted_proxy_hops
    if own is None or hops is None or own.x_for == own.x_proto == hops:
        return []
    return [
        f"{Var.TRUSTED_PROXY_HOPS} is set and app.wsgi_app is already wrapped in a ProxyFix "
        f"(x_for={own.x_for}, x_proto={own.x_proto}) that decides otherwise; configure proxies "
        "in one place."
    ]


def effective_proxy_hops(app: Flask) -> int | str:
    """The forwarding headers the app really trusts, for ``info``: the hop count when
    X-Forwarded-For and -Proto are trusted alike (0: none), else the host's ProxyFix's counts."""
    fixes = _proxy_fixes(app)
    fix = _host_proxy_fix(app) or (fixes[0] if fixes else None)
    if fix is None:
        return 0
    counts = {
        "x_for": fix.x_for,
        "x_proto": fix.x_proto,
        "x_host": fix.x_host,
        "x_port": fix.x_port,
        "x_prefix": fix.x_prefix,
    }
    if fix.x_for == fix.x_proto and not (fix.x_host or fix.x_port or fix.x_prefix):
        return fix.x_for
    shown = ", ".join(f"{name}={count}" for name, count in counts.items() if count)
    return f"{shown} (the app's own ProxyFix)"


def _configure_flask(app: Flask, settings: Settings) -> None:
    """Fill in Flask's session keys from the effective settings (which already hold every value
    the host app set: nothing the host configured changes), and trust the configured proxies."""
    for advice in settings.advice():
        logger.warning("%s", advice)
    hops = settings.proxy_hops
    if hops and _host_proxy_fix(app) is None:
        # Cloud Run's front end terminates TLS: trust its X-Forwarded-For and -Proto so the app
        # sees https and the client's address. Nowhere else by default: there the headers could
        # be forged. Never X-Forwarded-Host: Cloud Run does not set it (Host is already the
        # client's), so a client's own value would reach url_for(..., _external=True).
        app.wsgi_app = TrustedProxies(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    if not app.config.get("SECRET_KEY"):
        secret_key = settings.secret_key
        if not secret_key:
            # Only reachable outside staging/production/Cloud Run (validation requires it there).
            secret_key = secrets.token_urlsafe(48)
            logger.warning(
                "%s is not set; using a random key for this process (%s only): tokens signed "
                "by one process (CSRF, remember-me) fail in another.",
                Var.SECRET_KEY,
                settings.environment,
            )
        app.config["SECRET_KEY"] = secret_key
    if not app.config.get("SECRET_KEY_FALLBACKS") and settings.secret_key_fallbacks:
        # Flask 3.1 verifies its signatures (and keyed state finds its entries) under these too.
        app.config["SECRET_KEY_FALLBACKS"] = list(settings.secret_key_fallbacks)
    app.config.update(
        SESSION_COOKIE_NAME=settings.cookie_name,
        SESSION_COOKIE_SECURE=settings.cookie_secure,
        SESSION_COOKIE_HTTPONLY=settings.session_cookie_httponly,
        SESSION_COOKIE_SAMESITE=settings.session_cookie_samesite,
        PERMANENT_SESSION_LIFETIME=settings.session_lifetime,
    )
