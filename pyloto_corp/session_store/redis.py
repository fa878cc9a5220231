"""Redis store: one hash per session, one round trip per read and per write, no lost updates.

A session is a hash with one field per top-level key (its encoded value). The read is one script
call that returns the hash and slides its idle timeout (Flask-Session rewrites the whole session
after every request: GET then SET). A write is one script call that applies only the fields the
request changed or deleted, atomically, to the hash as it is now, so concurrent requests of one
session that change different keys all land; it refuses a record that no longer exists (a logout
is final) or a merged record over the size limit, and never overwrites an id when creating.
Records an earlier release stored as one string are still read, and rewritten as a hash on their
next change. Every script touches one key, so it runs unchanged on a Redis Cluster client.

A hung server must cost a request no more than ``REDIS_SOCKET_TIMEOUT``: a timeout is never
retried (the server is not answering; a retry doubles the wait), no idle-connection health check
adds its own PING, and the connection handshake sends nothing when no password or db needs it.
Only a dropped connection is retried, once, after a short backoff.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from collections.abc import Mapping
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
from . import codec
from .base import (
    CREATED_AT,
    Changes,
    Record,
    StoreInterface,
    StoreOptions,
    UserSession,
    interface_options,
    user_session,
)

if TYPE_CHECKING:
    from environs import Env

REDIS_URL = "REDIS_URL"
REDIS_SOCKET_TIMEOUT = "REDIS_SOCKET_TIMEOUT"
REDIS_CONNECT_TIMEOUT = "REDIS_CONNECT_TIMEOUT"
REDIS_SSL_CA_CERTS = "REDIS_SSL_CA_CERTS"
REDIS_SSL_CHECK_HOSTNAME = "REDIS_SSL_CHECK_HOSTNAME"

#: A dropped connection is retried once (after ~50 ms); a timeout is not retried at all.
RETRIES = 1

#: KEYS[1] the session; ARGV[1] the idle lifetime in seconds. The hash's fields and values, or
#: the string an earlier release stored (both with the expiry slid), or nil. It only reads and
#: slides an expiry, so it may run when the server is out of memory (``allow-oom``).
READ_SCRIPT = """#!lua flags=allow-oom
local fields = redis.pcall('HGETALL', KEYS[1])
if fields['err'] then
  return redis.call('GETEX', KEYS[1], 'EX', ARGV[1])
end
if #fields == 0 then
  return false
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return fields
"""

#: KEYS[1] the session; ARGV: lifetime, max bytes, mode, number of fields set, then the fields
#: and values set, then the fields deleted. Modes: 'create' (only if absent), 'whole' (replace
#: an existing record), 'merge' (apply to an existing hash). Returns 'ok', 'gone', 'taken' or
#: the merged size when it exceeds the limit (nothing written then). Declared with a shebang
#: (Redis 7+), so an out-of-memory server refuses it before it starts, never half-way.
WRITE_SCRIPT = """#!lua
local key, ttl, limit, mode = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local count = tonumber(ARGV[4])
local exists = redis.call('EXISTS', key) == 1
if mode == 'create' then
  if exists then return 'taken' end
elseif not exists then
  return 'gone'
end
local first_deleted = 5 + 2 * count
local size, touched = 0, {}
for i = 5, first_deleted - 1, 2 do
  touched[ARGV[i]] = true
  size = size + #ARGV[i] + #ARGV[i + 1]
end
for i = first_deleted, #ARGV do
  touched[ARGV[i]] = true
end
if mode == 'merge' then
  local current = redis.call('HGETALL', key)
  for i = 1, #current, 2 do
    if not touched[current[i]] then
      size = size + #current[i] + #current[i + 1]
    end
  end
end
if size > limit then return size end
if mode == 'whole' then redis.call('DEL', key) end
for i = 5, first_deleted - 1, 2 do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
end
for i = first_deleted, #ARGV do
  redis.call('HDEL', key, ARGV[i])
end
redis.call('EXPIRE', key, ttl)
return 'ok'
"""

#: KEYS[1] a user's index (a sorted set of store ids scored by login time); ARGV: the store id,
#: now, the oldest login time that can still be live (now - absolute lifetime), and the index's
#: own lifetime. Entries past the absolute lifetime are dropped here, so the index stays bounded.
INDEX_SCRIPT = """#!lua
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


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
        scripts = (READ_SCRIPT, WRITE_SCRIPT, INDEX_SCRIPT)
        self._scripts = {source: _sha1(source) for source in scripts}

    def _unavailable(self, exc: Exception) -> SessionStoreUnavailable:
        return SessionStoreUnavailable(
            f"Redis session store at {self.display_url} failed: {describe_error(exc)}"
        )

    def _call(self, command: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from None

    def _script(self, source: str, store_id: str, *args: Any) -> Any:
        """EVALSHA, loading the script once when the server does not know it yet (a restart,
        a new cluster node). execute_command skips redis-py's Script wrapper (a few µs)."""
        command = ("EVALSHA", self._scripts[source], 1, store_id, *args)
        client: Any = self.client
        try:
            try:
                return client.execute_command(*command)
            except redis.exceptions.NoScriptError:
                client.script_load(source)
                return client.execute_command(*command)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from None

    def read(self, store_id: str, lifetime: timedelta) -> Record | None:
        reply = self._script(READ_SCRIPT, store_id, _seconds(lifetime))
        if reply is None:
            return None
        if isinstance(reply, bytes):
            return Record(None, blob=reply)  # stored whole by an earlier release
        names = [name.decode("utf-8", "surrogatepass") for name in reply[::2]]
        return Record(dict(zip(names, reply[1::2], strict=True)))

    def create(self, store_id: str, fields: Mapping[str, bytes], lifetime: timedelta) -> bool:
        return self._apply(store_id, "create", fields, (), lifetime) == b"ok"

    def update(self, store_id: str, changes: Changes, lifetime: timedelta, stored: Record) -> bool:
        mode = "whole" if changes.whole else "merge"
        return self._apply(store_id, mode, changes.set, changes.delete, lifetime) == b"ok"

    def _apply(
        self,
        store_id: str,
        mode: str,
        fields: Mapping[str, bytes],
        deleted: tuple[str, ...],
        lifetime: timedelta,
    ) -> bytes:
        args: list[Any] = [_seconds(lifetime), self.max_bytes, mode, len(fields)]
        for name, raw in fields.items():
            args += (name.encode("utf-8", "surrogatepass"), raw)
        args += (name.encode("utf-8", "surrogatepass") for name in deleted)
        reply = self._script(WRITE_SCRIPT, store_id, *args)
        if isinstance(reply, int):
            self.check_size(reply)
        assert isinstance(reply, bytes)
        return reply

    def delete(self, store_id: str) -> None:
        # UNLINK, never used inside the scripts: a store round trip shows in INFO commandstats.
        self._call(self.client.unlink, store_id)

    # -- the user index --------------------------------------------------------------------------

    def index_key(self, user: str) -> str:
        """One sorted set per user; the hash tag keeps it in one slot of a cluster."""
        digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.key_prefix}user:{{{digest}}}"

    def index(self, store_id: str, user: str) -> None:
        now = time.time()
        absolute = self.absolute_lifetime.total_seconds()
        self._script(
            INDEX_SCRIPT,
            self.index_key(user),
            store_id,
            repr(now),
            repr(now - absolute),
            int(absolute) + 60,
        )

    def unindex(self, store_id: str, user: str) -> None:
        self._call(self.client.zrem, self.index_key(user), store_id)

    def find_user_sessions(self, user: str, lifetime: timedelta) -> dict[str, UserSession]:
        """The index's members that still exist and still belong to ``user``; the others (expired,
        logged out, taken over) are dropped from the index on the way."""
        index = self.index_key(user)
        members = [m.decode() for m in self._call(self.client.zrange, index, 0, -1)]
        if not members:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for member in members:
            pipe.hget(member, self.user_key)
            pipe.hget(member, CREATED_AT)
            pipe.pttl(member)
        replies = self._call(pipe.execute, raise_on_error=False)
        found: dict[str, UserSession] = {}
        stale: list[str] = []
        for position, member in enumerate(members):
            owner, created, left = replies[3 * position : 3 * position + 3]
            if not isinstance(owner, bytes) or _text(owner) != user or not _positive(left):
                stale.append(member)
                continue
            fields = {CREATED_AT: created} if isinstance(created, bytes) else {}
            found[member] = user_session(member, fields, lifetime, left / 1000)
        if stale:
            self._call(self.client.zrem, index, *stale)
        return found

    def revoke(self, user: str, keep: str | None = None) -> int:
        """UNLINK every session of ``user`` but ``keep`` (split by slot on a cluster), then
        the index (or just their entries, when one is kept)."""
        targets = [m for m in self.find_user_sessions(user, timedelta(0)) if m != keep]
        if not targets:
            return 0
        ended = int(self._call(self.client.unlink, *targets))
        if keep is None:
            self._call(self.client.unlink, self.index_key(user))
        else:
            self._call(self.client.zrem, self.index_key(user), *targets)
        return ended

    def ping(self) -> None:
        self._call(self.client.ping)


def _text(raw: bytes) -> str | None:
    try:
        value = codec.unpack_value(raw)
    except ValueError:
        return None
    return None if value is None else str(value)


def _positive(milliseconds: object) -> bool:
    return isinstance(milliseconds, int) and milliseconds > 0


def _sha1(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


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
