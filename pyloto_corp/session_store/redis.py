"""Redis store: Flask-Session's Redis interface, one round trip per read.

Flask-Session refreshes the expiry by rewriting the whole session after every request (GET then
SET). Here the read is ``GETEX key EX lifetime``, which returns the session and slides its idle
timeout in one command, so a request that only reads the session costs one round trip, and only a
modified session is written back: ``SET ... XX`` for a session that was read (a logout meanwhile
is final), ``SET ... NX`` for a new one (an id is never overwritten).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import redis
from flask import Flask, Response
from flask_session.base import ServerSideSession
from flask_session.redis import RedisSessionInterface as _FlaskSessionRedisInterface
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..config.settings import Settings, redact_url
from ..errors import SessionStoreUnavailable
from .base import StoreInterfaceMixin

#: Retries on connection errors and timeouts only (redis-py's Retry); a bad command is not retried.
RETRIES = 2


def _lifetime_seconds(lifetime: timedelta) -> int:
    return max(1, int(lifetime.total_seconds()))


class RedisSessionInterface(StoreInterfaceMixin, _FlaskSessionRedisInterface):
    backend_name = "redis"

    def __init__(
        self,
        app: Flask,
        client: redis.Redis,
        *,
        key_prefix: str,
        display_url: str,
        lifetime: timedelta,
    ) -> None:
        super().__init__(app, client=client, key_prefix=key_prefix)
        self.display_url = display_url
        self.ttl_seconds = _lifetime_seconds(lifetime)

    def _unavailable(self, exc: redis.RedisError) -> SessionStoreUnavailable:
        return SessionStoreUnavailable(
            f"Redis session store at {self.display_url} failed: {type(exc).__name__}"
        )

    def _redis(self, command: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def _retrieve_session_data(self, store_id: str) -> dict[str, Any] | None:
        ttl = self.ttl_seconds
        # execute_command skips redis-py's keyword parsing for GETEX (a few µs on every
        # request); the command sent is the same.
        data = self._redis(self.client.execute_command, "GETEX", store_id, "EX", ttl)
        return self.load(data, store_id)

    def replace_existing(self, store_id: str, data: bytes, lifetime: timedelta) -> bool:
        ex = _lifetime_seconds(lifetime)
        return bool(self._redis(self.client.set, store_id, data, ex=ex, xx=True))

    def create_absent(self, store_id: str, data: bytes, lifetime: timedelta) -> bool:
        ex = _lifetime_seconds(lifetime)
        return bool(self._redis(self.client.set, store_id, data, ex=ex, nx=True))

    def _delete_session(self, store_id: str) -> None:
        self._redis(self.client.delete, store_id)

    def ping(self) -> None:
        self._redis(self.client.ping)

    def write_session(self, app: Flask, session: ServerSideSession, response: Response) -> None:
        if not session.modified and session:
            # GETEX already slid the stored expiry and the cookie's expiry is absolute:
            # a read-only request writes nothing.
            if session.accessed:
                response.vary.add("Cookie")
            return
        super().write_session(app, session, response)


def create_client(settings: Settings) -> redis.Redis:
    """A client from REDIS_URL with timeouts and bounded retries; it connects on first use."""
    assert settings.redis_url is not None  # guaranteed by Settings.validate()
    options: dict[str, Any] = {}
    if urlsplit(settings.redis_url).scheme == "rediss":
        # Memorystore's certificate names an IP: verify against its CA, optionally skip the name.
        options["ssl_ca_certs"] = settings.redis_ssl_ca_certs
        options["ssl_check_hostname"] = settings.redis_ssl_check_hostname
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        **options,
    )


def create_interface(
    app: Flask, settings: Settings, client: redis.Redis | None = None
) -> RedisSessionInterface:
    interface = RedisSessionInterface(
        app,
        client if client is not None else create_client(settings),
        key_prefix=settings.session_key_prefix,
        display_url=redact_url(settings.redis_url) or "(client given by the caller)",
        lifetime=settings.session_lifetime,
    )
    interface.set_limits(
        absolute_lifetime=settings.session_absolute_lifetime, max_bytes=settings.session_max_bytes
    )
    return interface
