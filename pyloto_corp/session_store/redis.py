"""Redis store: one round trip per read, a bounded wait per call.

The read is ``GETEX key EX lifetime``: it returns the session and slides its idle timeout in one
command, so a request that only reads the session costs one round trip (Flask-Session rewrites
the whole session after every request: GET then SET). Only a modified session is written back:
``SET ... XX`` for a session that was read (a logout meanwhile is final), ``SET ... NX`` for a new
one (an id is never overwritten). Every operation touches one key, so it runs unchanged on a
Redis Cluster client.

A hung server must cost a request no more than ``REDIS_SOCKET_TIMEOUT``: a timeout is never
retried (the server is not answering; a retry doubles the wait), no idle-connection health check
adds its own PING, and the connection handshake sends nothing when no password or db needs it.
Only a dropped connection is retried, once, after a short backoff.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import redis
from flask import Flask
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from ..config.settings import REDIS, Settings, redact_url
from ..errors import SessionStoreUnavailable
from .base import Record, StoreInterface, StoreOptions, interface_options

if TYPE_CHECKING:
    from environs import Env

REDIS_URL = "REDIS_URL"
REDIS_SOCKET_TIMEOUT = "REDIS_SOCKET_TIMEOUT"
REDIS_CONNECT_TIMEOUT = "REDIS_CONNECT_TIMEOUT"
REDIS_SSL_CA_CERTS = "REDIS_SSL_CA_CERTS"
REDIS_SSL_CHECK_HOSTNAME = "REDIS_SSL_CHECK_HOSTNAME"

#: A dropped connection is retried once (after ~50 ms); a timeout is not retried at all.
RETRIES = 1


@dataclass(frozen=True)
class Options(StoreOptions):
    backend: ClassVar[str] = REDIS
    VARIABLES: ClassVar[tuple[str, ...]] = (
        REDIS_URL,
        REDIS_SOCKET_TIMEOUT,
        REDIS_CONNECT_TIMEOUT,
        REDIS_SSL_CA_CERTS,
        REDIS_SSL_CHECK_HOSTNAME,
    )

    url: str | None = None
    #: The longest one command may wait for the server (and so a request, before its 503).
    socket_timeout: float = 2.0
    connect_timeout: float = 2.0
    #: The CA certificate for ``rediss://`` (Memorystore's server CA).
    ssl_ca_certs: str | None = None
    #: False for Memorystore, whose certificate names an IP (the CA is still verified).
    ssl_check_hostname: bool = True

    @classmethod
    def from_env(cls, env: Env) -> Options:
        values: dict[str, Any] = {
            "url": env.str(REDIS_URL, None) or None,
            "socket_timeout": env.float(REDIS_SOCKET_TIMEOUT, None),
            "connect_timeout": env.float(REDIS_CONNECT_TIMEOUT, None),
            "ssl_ca_certs": env.str(REDIS_SSL_CA_CERTS, None) or None,
            "ssl_check_hostname": env.bool(REDIS_SSL_CHECK_HOSTNAME, None),
        }
        return cls(**{name: value for name, value in values.items() if value is not None})

    def problems(self, settings: Settings) -> list[str]:
        problems: list[str] = []
        if not self.url:
            problems.append(
                f"{REDIS_URL} is required when SESSION_STORE_BACKEND=redis; "
                "set it to redis://[:password@]host:port/db (or rediss:// for TLS)."
            )
        else:
            problems += url_problems(self.url)
        for var, value in (
            (REDIS_SOCKET_TIMEOUT, self.socket_timeout),
            (REDIS_CONNECT_TIMEOUT, self.connect_timeout),
        ):
            if not 0 < value <= 60:
                problems.append(f"{var} must be a number of seconds above 0 and at most 60.")
        return problems

    def redacted(self, settings: Settings) -> dict[str, Any]:
        return {
            REDIS_URL: redact_url(self.url),
            REDIS_SOCKET_TIMEOUT: self.socket_timeout,
            REDIS_CONNECT_TIMEOUT: self.connect_timeout,
            REDIS_SSL_CA_CERTS: self.ssl_ca_certs,
            REDIS_SSL_CHECK_HOSTNAME: self.ssl_check_hostname,
        }


def url_problems(url: str) -> list[str]:
    """``redis://`` or ``rediss://`` with a host and, if given, a numeric port and db; no query
    (redis-py would apply ``?socket_timeout=...`` past our limits, or fail at init on a typo)."""
    expected = "expected redis://[[user]:password@]host[:port][/db] (or rediss:// for TLS)"
    invalid = [f"{REDIS_URL} is not a valid redis:// or rediss:// URL; {expected}."]
    if any(c.isspace() for c in url):
        return invalid
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return invalid
    db = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.scheme not in ("redis", "rediss") or not parts.hostname or port == 0:
        return invalid
    if not (db == "" or (db.isascii() and db.isdigit())):
        return invalid
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return [
            f"{REDIS_URL} must not carry options after '?' or '#'; use {REDIS_SOCKET_TIMEOUT}, "
            f"{REDIS_CONNECT_TIMEOUT}, {REDIS_SSL_CA_CERTS} and {REDIS_SSL_CHECK_HOSTNAME}, and "
            "percent-encode a password that contains '/', '?', '#' or '@'."
        ]
    return []


#: The clients this backend drives: anything else is refused at init, never replaced.
Client = redis.Redis | RedisCluster


class RedisSessionInterface(StoreInterface):
    backend_name = REDIS

    def __init__(self, app: Flask, client: Client, *, display_url: str, **options: Any) -> None:
        super().__init__(app, **options)
        self.client = client
        self.display_url = display_url

    def _unavailable(self, exc: Exception) -> SessionStoreUnavailable:
        return SessionStoreUnavailable(
            f"Redis session store at {self.display_url} failed: {describe_error(exc)}"
        )

    def _call(self, command: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from None

    def read(self, store_id: str, lifetime: timedelta) -> Record | None:
        # execute_command skips redis-py's keyword parsing for GETEX (a few µs on every
        # request); the command sent is the same.
        data = self._call(self.client.execute_command, "GETEX", store_id, "EX", _seconds(lifetime))
        return None if data is None else Record(data)

    def create(self, store_id: str, data: bytes, lifetime: timedelta) -> bool:
        return bool(self._call(self.client.set, store_id, data, ex=_seconds(lifetime), nx=True))

    def replace(self, store_id: str, data: bytes, lifetime: timedelta, stored: Record) -> bool:
        return bool(self._call(self.client.set, store_id, data, ex=_seconds(lifetime), xx=True))

    def delete(self, store_id: str) -> None:
        self._call(self.client.delete, store_id)

    def ping(self) -> None:
        self._call(self.client.ping)


def _seconds(lifetime: timedelta) -> int:
    return max(1, int(lifetime.total_seconds()))


def describe_error(exc: BaseException) -> str:
    """The error's class, and the TLS cause when there is one (never the URL or a password)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = cause.verify_message or "certificate verify failed"
            return f"{type(exc).__name__} (TLS handshake failed: {detail})"
        if isinstance(cause, ssl.SSLError):
            return f"{type(exc).__name__} (TLS handshake failed: {cause.reason or 'SSL error'})"
        if "handshake" in str(cause):
            # The server never answered the TLS greeting: most likely it does not speak TLS.
            return (
                f"{type(exc).__name__} (TLS handshake failed: no answer to the TLS handshake; "
                "does the server accept TLS on this port?)"
            )
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    if "SSL" in text or "certificate" in text:
        return f"{type(exc).__name__} (TLS handshake failed: certificate verify failed)"
    return type(exc).__name__


def create_client(options: Options) -> redis.Redis:
    """A client from REDIS_URL with a bounded wait per call; it connects on first use."""
    assert options.url is not None  # guaranteed by Options.problems()
    tls: dict[str, Any] = {}
    if urlsplit(options.url).scheme == "rediss":
        # Memorystore's certificate names an IP: verify against its CA, optionally skip the name.
        tls = {
            "ssl_ca_certs": options.ssl_ca_certs,
            "ssl_check_hostname": options.ssl_check_hostname,
        }
    return redis.Redis.from_url(
        options.url,
        socket_timeout=options.socket_timeout,
        socket_connect_timeout=options.connect_timeout,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), RETRIES, (redis.ConnectionError,)),
        health_check_interval=0,
        driver_info=None,
        **tls,
    )


def check_client(client: object) -> Client:
    """The caller's client, used as given; anything that is not a redis-py client is refused
    (Flask-Session would silently connect to localhost instead)."""
    if isinstance(client, redis.Redis | RedisCluster):
        return client
    raise TypeError(
        f"client={type(client).__name__} cannot back the redis session store; pass a "
        "redis.Redis or redis.cluster.RedisCluster (or a redis-py compatible client that "
        "subclasses one), or no client to connect to REDIS_URL."
    )


def create_interface(
    app: Flask, settings: Settings, client: object | None = None
) -> RedisSessionInterface:
    options = settings.store
    assert isinstance(options, Options)
    if client is None:
        return RedisSessionInterface(
            app,
            create_client(options),
            display_url=redact_url(options.url) or "",
            **interface_options(settings),
        )
    return RedisSessionInterface(
        app,
        check_client(client),
        display_url="(the client passed to SessionStore)",
        **interface_options(settings),
    )
