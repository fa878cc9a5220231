"""``flask session-store ...`` and ``python -m pyloto_corp ...``: operate the session store.

The group is registered through the ``flask.commands`` entry point, not on an app: when the
configuration is bad, building the app raises and Flask would drop every command defined on it,
exactly when ``check`` is needed. Every command uses the store registered on the app Flask loads
(``--app``/``FLASK_APP``), with its own settings and client (an app whose configuration is bad
reports its problems), and the environment alone under ``python -m pyloto_corp``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import click
from flask import Flask
from flask.cli import NoAppException, ScriptInfo

from .config.rate_limits import RateLimitStorage, limiters, rate_limit_problems, rate_limit_storages
from .config.settings import FIRESTORE, Settings, Var
from .errors import ConfigurationError, SessionStoreUnavailable
from .records.base import CLIENT_GIVEN
from .session_store import SessionStore, revoke_user_sessions, user_sessions
from .session_store.extension import EXTENSION_KEY, StoreState, effective_proxy_hops
from .state import KeyedState, namespaces


def _settings(environment: str | None = None) -> Settings:
    environ = dict(os.environ)
    if environment is not None:
        environ[Var.ENV] = environment
    return Settings.from_env(environ)


def _loaded_app() -> Flask | None:
    """The app Flask loads (``--app``/``FLASK_APP``) with its SessionStore, or None when there
    is no app to load (``python -m pyloto_corp``)."""
    info = click.get_current_context().find_object(ScriptInfo)
    if info is None:
        return None
    try:
        app = info.load_app()
    except NoAppException:
        return None
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # the app's own code failed; its message may hold anything
        raise click.ClickException(
            f"The app could not be loaded: {type(exc).__name__} while importing or building "
            f"{info.app_import_path or 'it'}."
        ) from None
    if EXTENSION_KEY not in app.extensions:
        raise click.ClickException(
            f"The app {app.name!r} has no SessionStore registered; call SessionStore(app)."
        )
    return app


def _app() -> Flask:
    """The app Flask loads, with its SessionStore; without one (``python -m pyloto_corp``, or
    no app to find), the environment's configuration on a bare app."""
    app = _loaded_app()
    if app is not None:
        return app
    app = Flask("pyloto_corp.cli")
    try:
        SessionStore(app, _settings())
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    return app


def _store() -> StoreState:
    return SessionStore.state(_app())


def _lifetime_text(lifetime: timedelta) -> str:
    """``2h``, ``1h30m``, ``30d``: a namespace's lifetime as people write it."""
    seconds = lifetime.total_seconds()
    if seconds != int(seconds):
        return f"{seconds:g}s"
    left, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts)


def _seconds(lifetime: timedelta) -> int | float:
    seconds = lifetime.total_seconds()
    return int(seconds) if seconds == int(seconds) else seconds


def _namespaces_text(found: dict[str, timedelta]) -> str:
    return ", ".join(f"{name}: {_lifetime_text(lifetime)}" for name, lifetime in found.items())


T = TypeVar("T")

#: The entry of ``info`` that lists the keyed state namespaces (lower case: not a variable).
KEYED_STATE = "keyed_state"


@click.group("session-store")
def session_store_cli() -> None:
    """Check, inspect and operate the session store (no app is built)."""


@session_store_cli.command()
@click.option("--env", "environment", help="Validate for this environment instead of $ENV.")
def check(environment: str | None) -> None:
    """Validate the configuration without connecting to anything; exit 1 on any problem.

    The app Flask loads is validated with what it configured in code (its own client, as
    Flask-Session's SESSION_REDIS); without one, the environment alone. Flask-Limiter's storage
    is judged as the app has it now (a Limiter registered after SessionStore included) and
    shown with any password as ***. The keyed state namespaces the app created (KeyedState at
    module level) are listed with their lifetimes.
    """
    app = _loaded_app()
    found = {} if app is None else namespaces()
    storages: list[RateLimitStorage]
    if app is None:
        settings = _settings(environment)
        storages = rate_limit_storages({}, (), os.environ)
    else:
        state = SessionStore.state(app)
        settings = state.settings
        if environment is not None:
            settings = dataclasses.replace(settings, environment=environment)
        # The loaded app as it is now: a Limiter registered after SessionStore is seen here.
        environ = os.environ if state.from_environment else {}
        storages = rate_limit_storages(app.config, limiters(app.extensions), environ)
    problems = settings.validate() + rate_limit_problems(storages, settings)
    if problems:
        raise click.ClickException(str(ConfigurationError(settings.environment, problems)))
    for advice in settings.advice():
        click.echo(f"Warning: {advice}", err=True)
    store = settings.session_store_backend
    if getattr(settings.store, "client_given", False):
        store += f", {CLIENT_GIVEN}"
    click.echo(
        f"Configuration is valid for environment '{settings.environment}' (session store: {store})."
    )
    for storage in storages:
        click.echo(f"Rate-limit storage (Flask-Limiter): {storage.shown_uri}.")
    if found:
        click.echo(f"Keyed state namespaces: {_namespaces_text(found)}.")


@session_store_cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(as_json: bool) -> None:
    """Print the effective configuration, every secret shown as ***.

    keyed_state (not a variable) lists the keyed state namespaces the app Flask loads created,
    with their lifetimes (in seconds in the JSON).
    """
    loaded = _loaded_app()
    app = _app() if loaded is None else loaded
    found = {} if loaded is None else namespaces()
    values: dict[str, Any] = SessionStore.state(app).settings.redacted()
    # What the app applies, which may be the host's own ProxyFix rather than the setting.
    values[Var.TRUSTED_PROXY_HOPS] = effective_proxy_hops(app)
    if as_json:
        values[KEYED_STATE] = {name: _seconds(lifetime) for name, lifetime in found.items()}
        click.echo(json.dumps(values, indent=2))
        return
    values[KEYED_STATE] = _namespaces_text(found)
    width = max(map(len, values))
    for name, value in values.items():
        click.echo(f"{name:<{width}}  {'' if value is None else value}")


@session_store_cli.command()
def ping() -> None:
    """Connect to the configured store and report the round-trip time."""
    state = _store()
    started = time.perf_counter()
    try:
        facts = state.interface.records.ping()
    except SessionStoreUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    elapsed = (time.perf_counter() - started) * 1000
    details = "".join(f", {key} {value}" for key, value in facts.items())
    click.echo(f"{state.settings.session_store_backend} answered in {elapsed:.1f} ms{details}")


@session_store_cli.command()
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 500))
def cleanup(batch_size: int) -> None:
    """Delete expired sessions (Firestore without a TTL policy, and the emulator)."""
    state = _store()
    backend = state.settings.session_store_backend
    if backend != FIRESTORE:
        click.echo(f"Nothing to do: the {backend} store expires sessions itself.")
        return
    from .records.firestore import FirestoreRecords

    records = state.interface.records
    assert isinstance(records, FirestoreRecords)
    try:
        deleted = records.delete_expired(batch_size=batch_size)
    except SessionStoreUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Deleted {deleted} expired session(s) from collection {records.collection!r}.")


@session_store_cli.command("sessions")
@click.option("--user", "user_id", required=True, help="The user id (SESSION_USER_KEY's value).")
def list_sessions(user_id: str) -> None:
    """List a user's live sessions: when each began and was last used (no ids)."""
    app = _app()
    with app.app_context():
        try:
            found = user_sessions(user_id)
        except SessionStoreUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    for item in found:
        click.echo(
            f"{item.handle}  created {item.created_at:%Y-%m-%d %H:%M:%S}Z  "
            f"last seen {item.last_seen:%Y-%m-%d %H:%M:%S}Z"
        )
    click.echo(f"{len(found)} live session(s).")


@session_store_cli.command()
@click.option("--user", "user_id", required=True, help="The user id (SESSION_USER_KEY's value).")
def revoke(user_id: str) -> None:
    """End every session of a user at once (password change, compromised account)."""
    app = _app()
    with app.app_context():
        try:
            ended = revoke_user_sessions(user_id)
        except SessionStoreUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"Ended {ended} session(s).")


@session_store_cli.group("state")
def keyed_state_cli() -> None:
    """Read or erase one entry of keyed state (pyloto_corp.state.KeyedState) by its id.

    The id is never printed back (it may be a phone number). An ID of - is read from the first
    line of standard input, which keeps it out of the shell history and the process list.
    """


def _on_entry(namespace: str, id: str, action: Callable[[KeyedState, str], T]) -> T:
    """``action(keyed_state, id)`` in the loaded app's context, with the namespace's
    KeyedState as the app created it (its lifetime) and the id (read from stdin for ``-``).
    A namespace the app did not create is said aloud: a typo would otherwise read as "no
    entry". Bad input and a store that is down become one line (KeyedState's messages name
    no id)."""
    if id == "-":
        id = sys.stdin.readline().rstrip("\r\n")
    app = _app()  # imports the app's modules: the KeyedState objects they create are known
    known = namespaces()
    lifetime = known.get(namespace)
    try:
        keyed = (
            KeyedState(namespace) if lifetime is None else KeyedState(namespace, lifetime=lifetime)
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if lifetime is None:
        created = _namespaces_text(known) if known else "none"
        click.echo(
            f"Warning: the app created no KeyedState({namespace!r}) (its namespaces: {created}); "
            f"using the default lifetime, {_lifetime_text(keyed.lifetime)}.",
            err=True,
        )
    with app.app_context():
        try:
            return action(keyed, id)
        except (ValueError, RuntimeError) as exc:  # SessionStoreUnavailable is a RuntimeError
            raise click.ClickException(str(exc)) from None


@keyed_state_cli.command("get")
@click.argument("namespace")
@click.argument("id")
def state_get(namespace: str, id: str) -> None:
    """Print the entry of ID in NAMESPACE as one JSON object; when there is none, say so on
    stderr and exit 1 (nothing on stdout). An ID of - is read from standard input.

    Values JSON has no form for are shown as their Python repr, in a string: Decimal('10.50'),
    datetime.datetime(2026, 12, 2, 9, 30, tzinfo=...), b'\\x00', UUID('...'); a tuple is shown
    as an array.

    Reading slides the entry's expiry, as any use does: it then expires the namespace's
    lifetime from now (the lifetime the app created the namespace with, which check lists; for
    a namespace the app did not create, the default 2h, with a warning).
    """
    values = _on_entry(namespace, id, lambda keyed, id: keyed.get(id))
    if values is None:
        click.echo(f"No entry in {namespace!r} for this id.", err=True)
        raise click.exceptions.Exit(1)
    click.echo(json.dumps(values, indent=2, ensure_ascii=False, default=repr))


@keyed_state_cli.command("delete")
@click.argument("namespace")
@click.argument("id")
def state_delete(namespace: str, id: str) -> None:
    """Delete the entry of ID in NAMESPACE now (a user asks to be forgotten), including a copy
    kept under a SECRET_KEY_FALLBACKS key; says whether there was one (exit 0 either way). An
    ID of - is read from standard input."""
    if _on_entry(namespace, id, lambda keyed, id: keyed.delete(id)):
        click.echo(f"Deleted the entry in {namespace!r}.")
    else:
        click.echo(f"No entry in {namespace!r} for this id: nothing to delete.")
