"""Redis store: one string per session, read with one command, merged by one script.

A session is one string: :data:`RECORD_MARKER`, then for each top-level key its name and its
encoded value, each behind its length (4 bytes, big-endian), a framing simple enough for a Lua
script to take apart. The read is ``GETEX key EX lifetime``: it returns the record and slides the
idle timeout in one command, so a request that only reads the session costs one round trip
(Flask-Session rewrites the whole session after every request: GET then SET). A write is one
script call that applies only the keys the request changed or deleted to the record as it is
now, atomically, so concurrent requests of one session that change different keys all land; it
refuses a record that no longer exists (a logout is final) or a merged record over the size
limit, and never overwrites an id when creating. Records an earlier release stored (a msgpack
map) are still read, and rewritten in this layout on their next change. Every command touches
one key, so it runs unchanged on a Redis Cluster client.

A hung server must cost a request no more than ``REDIS_SOCKET_TIMEOUT``: a timeout is never
retried (the server is not answering; a retry doubles the wait), no idle-connection health check
adds its own PING, and the connection handshake sends nothing when no password or db needs it.
Only a dropped connection is retried, once, after a short backoff.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import unquote

import redis
from flask import Flask
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection
from redis.credentials import CredentialProvider
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from ..config.settings import REDIS, Settings, redact_url
from ..errors import SessionStoreNotAnswering, SessionStoreUnavailable
from ..records.redis import RedisRecords, parse_fields
from .base import (
    CLIENT_GIVEN,
    RETIRED_LINGER,
    Changes,
    Record,
    Retired,
    StoreInterface,
    StoreOptions,
    UserSession,
    handle_of,
    interface_options,
    mark_lifetime,
)

if TYPE_CHECKING:
    from environs import Env

logger = logging.getLogger("pyloto_corp.session_store")

REDIS_URL = "REDIS_URL"
REDIS_SOCKET_TIMEOUT = "REDIS_SOCKET_TIMEOUT"
REDIS_CONNECT_TIMEOUT = "REDIS_CONNECT_TIMEOUT"
REDIS_SSL_CA_CERTS = "REDIS_SSL_CA_CERTS"
REDIS_SSL_CHECK_HOSTNAME = "REDIS_SSL_CHECK_HOSTNAME"
REDIS_IAM_AUTH = "REDIS_IAM_AUTH"
REDIS_ALLOW_PLAINTEXT_AUTH = "REDIS_ALLOW_PLAINTEXT_AUTH"

#: A dropped connection is retried once (after ~50 ms); a timeout is not retried at all.
RETRIES = 1
#: A cluster command is tried this many more times, the slot map read again in between.
CLUSTER_RETRIES = 2
#: An IAM access token is fetched again this many seconds before it expires.
IAM_REFRESH_MARGIN = 300
#: A cached token this close to its expiry is not used any more, even when no new one comes.
IAM_MIN_VALIDITY = 30

#: The first bytes of a record in this layout (0xc1 is a byte msgpack never uses, so no record
#: of an earlier release, a msgpack map, starts with it).
RECORD_MARKER: Final = b"\xc1\x02"
#: The marker a login or a logout leaves for a retired id (``base.Retired``) is a key of its own,
#: in the session key's cluster slot (:func:`retired_key`): these bytes, the time it stops
#: counting (8 bytes, a big-endian double), then the store id the session moved to (empty after
#: a logout). The session key itself is deleted, so every release's write script, this one's
#: and the previous one's, finds the session gone.
RETIRED_MARKER: Final = b"\xc1\x03"
RETIRED_SUFFIX: Final = "~retired"

#: KEYS[1] the session; ARGV: lifetime (ms), max bytes, mode, number of keys set, then the keys
#: and values set, then the keys deleted. Modes: 'create' (only if absent), 'whole' (replace an
#: existing record), 'merge' (apply to an existing record in this layout). Returns 'ok', 'gone',
#: 'taken', 'format' (merge, but the record is an earlier release's: write it whole) or the
#: merged size when it exceeds the limit (nothing written then). The size counts the framing
#: (what the record takes stored), and a stored record already over the limit (planted: no write
#: makes one) is refused by its length before it is read or parsed, so no record costs Redis more
#: than the limit's worth of work. Declared with a shebang (Redis 7+), so an out-of-memory server
#: refuses it before it starts, never half-way. It uses only commands the app never sends itself
#: (STRLEN, GETRANGE, PSETEX), so each call counts as one round trip.
WRITE_SCRIPT = """#!lua
local key, ttl, limit, mode = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local count = tonumber(ARGV[4])
local marker = '\\193\\002'
local exists = redis.call('EXISTS', key) == 1
if mode == 'create' then
  if exists then return 'taken' end
elseif not exists then
  return 'gone'
end
local values, order = {}, {}
if mode == 'merge' then
  local length = redis.call('STRLEN', key)
  if length > limit then return length end
  local stored = redis.call('GETRANGE', key, 0, -1)
  if string.sub(stored, 1, 2) ~= marker then return 'format' end
  local at = 3
  while at <= #stored do
    local size, name_at = struct.unpack('>I4', stored, at)
    local name = string.sub(stored, name_at, name_at + size - 1)
    local length, value_at = struct.unpack('>I4', stored, name_at + size)
    values[name] = string.sub(stored, value_at, value_at + length - 1)
    order[#order + 1] = name
    at = value_at + length
  end
end
local first_deleted = 5 + 2 * count
for i = 5, first_deleted - 1, 2 do
  if values[ARGV[i]] == nil then order[#order + 1] = ARGV[i] end
  values[ARGV[i]] = ARGV[i + 1]
end
for i = first_deleted, #ARGV do
  values[ARGV[i]] = nil
end
local parts, total = {marker}, #marker
for _, name in ipairs(order) do
  local value = values[name]
  if value then
    parts[#parts + 1] = struct.pack('>I4', #name) .. name .. struct.pack('>I4', #value) .. value
    total = total + 8 + #name + #value
  end
end
if total > limit then return total end
redis.call('PSETEX', key, ttl, table.concat(parts))
return 'ok'
"""

#: KEYS[1] the session, KEYS[2] its marker key; ARGV: the marker, its lifetime (ms), the
#: successor's store id. Deletes a live record (in any release's layout) and writes the marker:
#: 1. The id absent: 0, unless the marker already names this successor (this very call, retried
#: after a dropped connection): 1. Runs DEL, never sent by the app, to count as one round trip.
RETIRE_SCRIPT = """#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[3] ~= '' and redis.call('GETRANGE', KEYS[2], 10, -1) == ARGV[3] then return 1 end
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('PSETEX', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

#: KEYS[1] a user's index (a sorted set of store ids scored by login time); ARGV: the store id,
#: now, the oldest login time that can still be live (now - absolute lifetime), the index's own
#: lifetime, and the cap on entries (0: none). Entries past the absolute lifetime are dropped
#: here, and the oldest beyond the cap popped and returned (the caller ends those sessions), so
#: the index stays bounded. The index only lists: a revoke is final through the user's mark.
INDEX_SCRIPT = """#!lua
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local cap = tonumber(ARGV[5])
if cap > 0 then
  local over = redis.call('ZCARD', KEYS[1]) - cap
  if over > 0 then
    local popped, members = redis.call('ZPOPMIN', KEYS[1], over), {}
    for i = 1, #popped, 2 do members[#members + 1] = popped[i] end
    return members
  end
end
return {}
"""

#: KEYS[1] a user's revocation mark; ARGV: the revoke's time, the mark's lifetime (ms). A script
#: only so that the store's ACL user needs no SET (its scripts already PSETEX).
MARK_SCRIPT = """#!lua
redis.call('PSETEX', KEYS[1], ARGV[2], ARGV[1])
return 1
"""

#: KEYS[1] a user's index; ARGV: the revoke's time, a page size, then the store ids to keep.
#: Removes and returns up to a page of entries indexed before the revoke (never the kept ones):
#: the caller unlinks those sessions, then asks for the next page, so neither the index nor the
#: reply is ever handled whole, and an entry added meanwhile (a login after the revoke) stays.
POP_SCRIPT = """#!lua
local page, keep = tonumber(ARGV[2]), {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local limit = page + #ARGV - 2
local members = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, limit)
local out = {}
for _, member in ipairs(members) do
  if not keep[member] and #out < page then out[#out + 1] = member end
end
if #out > 0 then redis.call('ZREM', KEYS[1], unpack(out)) end
return out
"""

#: ARGV: session keys (all on the node it runs on, on a cluster); each one's PTTL, in order.
#: One command per page of a listing, however many keys, and a reply hiredis parses in C
#: (per-key commands cost redis-py ~20-60 µs each in Python). The keys are arguments, not
#: declared keys: a cluster refuses declared keys of several slots, and allows a script with
#: allow-cross-slot-keys to read keys of any slot its node serves.
PTTL_SCRIPT = """#!lua flags=no-writes,allow-cross-slot-keys
local out = {}
for i, key in ipairs(ARGV) do out[i] = redis.call('PTTL', key) end
return out
"""

#: KEYS[1] a user's index; ARGV: first and last rank. A page of entries and their scores, as one
#: flat reply (redis-py pairs a ZRANGE WITHSCORES reply in Python, ~2.5 µs an entry).
LIST_SCRIPT = """#!lua flags=no-writes
return redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2], 'WITHSCORES')
"""

#: Index entries handled per round trip when listing or revoking (bounds time and memory per
#: step whatever the index holds).
PAGE = 5000


@dataclass(frozen=True, repr=False)
class Options(StoreOptions):
    backend: ClassVar[str] = REDIS
    VARIABLES: ClassVar[tuple[str, ...]] = (
        REDIS_URL,
        REDIS_SOCKET_TIMEOUT,
        REDIS_CONNECT_TIMEOUT,
        REDIS_SSL_CA_CERTS,
        REDIS_SSL_CHECK_HOSTNAME,
        REDIS_IAM_AUTH,
        REDIS_ALLOW_PLAINTEXT_AUTH,
    )

    url: str | None = None
    #: The longest one command may wait for the server (and so a request, before its 503).
    socket_timeout: float = 2.0
    connect_timeout: float = 2.0
    #: The only CA trusted for ``rediss://`` (Memorystore's server CA): not added to the
    #: system's CAs, which would let any publicly trusted certificate through.
    ssl_ca_certs: str | None = None
    #: False for Memorystore, whose certificate names an IP (only with ``ssl_ca_certs``).
    ssl_check_hostname: bool = True
    #: AUTH with a Google access token (Memorystore IAM authentication) instead of a password.
    iam_auth: bool = False
    #: A deployed app may send a password or token over plaintext ``redis://`` only when this
    #: says so (a private network path the operator vouches for).
    allow_plaintext_auth: bool = False
    #: The app passes its own client (``client=``, ``SESSION_REDIS``): nothing here builds one.
    client_given: bool = False

    @classmethod
    def from_env(cls, env: Env) -> Options:
        values: dict[str, Any] = {
            "url": env.str(REDIS_URL, None) or None,
            "socket_timeout": env.float(REDIS_SOCKET_TIMEOUT, None),
            "connect_timeout": env.float(REDIS_CONNECT_TIMEOUT, None),
            "ssl_ca_certs": env.str(REDIS_SSL_CA_CERTS, None) or None,
            "ssl_check_hostname": env.bool(REDIS_SSL_CHECK_HOSTNAME, None),
            "iam_auth": env.bool(REDIS_IAM_AUTH, None),
            "allow_plaintext_auth": env.bool(REDIS_ALLOW_PLAINTEXT_AUTH, None),
        }
        return cls(**{name: value for name, value in values.items() if value is not None})

    def with_client(self) -> Options:
        return dataclasses.replace(self, client_given=True)

    def problems(self, settings: Settings) -> list[str]:
        if self.client_given:
            # The URL, TLS and timeout settings only build a client; the app's is used as is.
            return []
        problems: list[str] = []
        if not self.url:
            problems.append(
                f"{REDIS_URL} is required when SESSION_STORE_BACKEND=redis; "
                "set it to redis://[:password@]host:port/db (or rediss:// for TLS), or pass "
                "the app's own client (SessionStore(app, client=...) or SESSION_REDIS)."
            )
        else:
            problems += url_problems(self.url)
            if not problems:
                problems += self._transport_problems(parse_url(self.url), settings)
        for var, value in (
            (REDIS_SOCKET_TIMEOUT, self.socket_timeout),
            (REDIS_CONNECT_TIMEOUT, self.connect_timeout),
        ):
            if not 0 < value <= 60:
                problems.append(f"{var} must be a number of seconds above 0 and at most 60.")
        return problems

    def _transport_problems(self, target: Target, settings: Settings) -> list[str]:
        """TLS that verifies what it says, and no secret over plaintext where users are served."""
        problems: list[str] = []
        if self.iam_auth and target.password is not None:
            problems.append(
                f"{REDIS_URL} carries a password and {REDIS_IAM_AUTH}=true: with IAM "
                "authentication the password is an access token; remove it from the URL."
            )
        if not target.tls and self.ssl_ca_certs:
            problems.append(
                f"{REDIS_SSL_CA_CERTS} is set but {REDIS_URL} is plaintext ({target.scheme}://): "
                f"nothing would be encrypted; use {target.scheme.replace('redis', 'rediss', 1)}://."
            )
        if not self.ssl_check_hostname and not self.ssl_ca_certs:
            problems.append(
                f"{REDIS_SSL_CHECK_HOSTNAME}=false needs {REDIS_SSL_CA_CERTS}: without the name "
                "check only a CA of your own keeps another server's certificate out; set "
                f"{REDIS_SSL_CA_CERTS} to the server's CA file (Memorystore: the instance's CA), "
                f"or remove {REDIS_SSL_CHECK_HOSTNAME}."
            )
        sends_secret = target.password is not None or self.iam_auth
        if (
            settings.is_deployed
            and not target.tls
            and sends_secret
            and not self.allow_plaintext_auth
        ):
            secret = f"{REDIS_IAM_AUTH}=true" if self.iam_auth else "a password"
            what = "access token" if self.iam_auth else "password"
            problems.append(
                f"{REDIS_URL} is plaintext ({target.scheme}://) with {secret} "
                f"{settings.where()}: the {what} and every session would cross the network "
                f"unencrypted; use {target.scheme.replace('redis', 'rediss', 1)}:// with "
                f"{REDIS_SSL_CA_CERTS}, or set {REDIS_ALLOW_PLAINTEXT_AUTH}=true if the "
                "network path is private."
            )
        return problems

    def __repr__(self) -> str:  # never the URL's password
        url = CLIENT_GIVEN if self.client_given else redact_url(self.url)
        return f"redis.Options(url={url!r}, iam_auth={self.iam_auth})"

    def redacted(self, settings: Settings) -> dict[str, Any]:
        if self.client_given:
            return {REDIS_URL: CLIENT_GIVEN}
        return {
            REDIS_URL: redact_url(self.url),
            REDIS_SOCKET_TIMEOUT: self.socket_timeout,
            REDIS_CONNECT_TIMEOUT: self.connect_timeout,
            REDIS_SSL_CA_CERTS: self.ssl_ca_certs,
            REDIS_SSL_CHECK_HOSTNAME: self.ssl_check_hostname,
            REDIS_IAM_AUTH: self.iam_auth,
            REDIS_ALLOW_PLAINTEXT_AUTH: self.allow_plaintext_auth,
        }


#: REDIS_URL schemes -> (topology, TLS); the ``+cluster``/``+sentinel`` forms are the ``limits``
#: library's (Flask-Limiter's), which Flask users already write.
SCHEMES: Final = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_EXPECTED = (
    "expected redis://[[user]:password@]host[:port][/db], rediss:// for TLS, "
    "redis+cluster://[[user]:password@]host:port[,host:port...] or "
    "redis+sentinel://[[user]:password@]host:port[,host:port...]/SERVICE_NAME[/db]"
)


@dataclass(frozen=True, repr=False)
class Target:
    """REDIS_URL understood: the topology, where it is, and the credentials (never shown)."""

    mode: str
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    #: As written in REDIS_URL, lowercased (``redis+cluster``).
    scheme: str = "redis"
    username: str | None = None
    password: str | None = None
    db: int = 0
    service: str | None = None

    def __repr__(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.hosts)
        return f"Target({self.mode}, tls={self.tls}, {hosts}, db={self.db}, {self.service})"


def parse_url(url: str) -> Target:
    """Pure: REDIS_URL in, a Target out; ValueError with a message that names the variable and
    never holds the URL (it may hold a password). Hand-rolled: ``urlsplit`` cannot read several
    hosts, and reads a password holding ``/`` as a path."""
    invalid = f"{REDIS_URL} is not a valid Redis URL; {_EXPECTED}."
    if any(c.isspace() for c in url):
        raise ValueError(invalid)
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in SCHEMES:
        raise ValueError(invalid)
    mode, tls = SCHEMES[scheme.lower()]
    userinfo, _, location = rest.rpartition("@")
    if "?" in location or "#" in location:
        raise ValueError(
            f"{REDIS_URL} must not carry options after '?' or '#'; use {REDIS_SOCKET_TIMEOUT}, "
            f"{REDIS_CONNECT_TIMEOUT}, {REDIS_SSL_CA_CERTS} and {REDIS_SSL_CHECK_HOSTNAME}, and "
            "percent-encode a password that contains '/', '?', '#' or '@'."
        )
    netloc, _, path = location.partition("/")
    default_port = 26379 if mode == "sentinel" else 6379
    hosts = tuple(_host(part, default_port, invalid) for part in netloc.split(","))
    if mode == "standalone" and len(hosts) != 1:
        raise ValueError(f"{REDIS_URL}: a redis:// URL names one host; {_EXPECTED}.")
    username, colon, password = userinfo.partition(":")
    segments = path.split("/") if path else []
    service = None
    if mode == "sentinel":
        if not segments or not segments[0]:
            raise ValueError(
                f"{REDIS_URL}: a redis+sentinel:// URL names the service after the hosts "
                "(redis+sentinel://host:26379/mymaster)."
            )
        service, segments = unquote(segments[0]), segments[1:]
    if len(segments) > 1 or (segments and not (segments[0].isascii() and segments[0].isdigit())):
        raise ValueError(invalid)
    db = int(segments[0]) if segments and segments[0] else 0
    if mode == "cluster" and db != 0:
        raise ValueError(f"{REDIS_URL}: a Redis Cluster has only db 0; remove /{db}.")
    return Target(
        mode,
        tls,
        hosts,
        scheme=scheme.lower(),
        username=unquote(username) or None,
        password=unquote(password) if colon else None,
        db=db,
        service=service,
    )


def _host(part: str, default_port: int, invalid: str) -> tuple[str, int]:
    host, port = part, ""
    if part.startswith("["):  # [IPv6]:port
        host, _, after = part[1:].partition("]")
        port = after.removeprefix(":")
    elif part.count(":") == 1:
        host, port = part.split(":")
    if not host or (":" in host and not part.startswith("[")):
        raise ValueError(invalid)
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(invalid)
    return host, int(port) if port else default_port


def url_problems(url: str) -> list[str]:
    try:
        parse_url(url)
    except ValueError as exc:
        return [str(exc)]
    return []


#: What a redis-py client raises when the store fails (RedisClusterException, e.g. "no node
#: reachable" or a slot not covered, is not a RedisError).
STORE_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)


@dataclass(frozen=True)
class ClientErrors:
    """The exceptions of the client library in use: redis-py's, or valkey-py's (a fork with
    its own exception classes)."""

    store: tuple[type[Exception], ...] = STORE_ERRORS
    no_script: type[Exception] = redis.exceptions.NoScriptError
    #: The server did not answer in time (connecting or reading); a refusal comes at once.
    not_answering: tuple[type[Exception], ...] = (redis.exceptions.TimeoutError, TimeoutError)


#: The clients this backend drives: anything else is refused at init, never replaced.
Client = redis.Redis | RedisCluster


class RedisSessionInterface(StoreInterface):
    backend_name = REDIS
    records: RedisRecords

    def __init__(
        self,
        app: Flask,
        client_factory: Callable[[], Client],
        *,
        display_url: str,
        errors: ClientErrors = ClientErrors(),
        **options: Any,
    ) -> None:
        super().__init__(app, **options)
        self.errors = errors
        self._client_factory = client_factory
        self.display_url = display_url
        scripts = (
            WRITE_SCRIPT,
            RETIRE_SCRIPT,
            INDEX_SCRIPT,
            MARK_SCRIPT,
            POP_SCRIPT,
            PTTL_SCRIPT,
            LIST_SCRIPT,
        )
        self.records = RedisRecords(
            lambda: self.client,
            max_bytes=self.max_bytes,
            unavailable=self._unavailable,
            no_script=errors.no_script,
            scripts=scripts,
        )

    @property
    def client(self) -> Client:
        """Built on first use in each process (a RedisCluster reads the slot map then)."""
        try:
            return self.process_client(self._client_factory)
        except self.errors.store as exc:
            raise self._unavailable(exc) from None

    def has_client(self) -> bool:
        return self._client is not None

    def _unavailable(self, exc: Exception) -> SessionStoreUnavailable:
        silent = isinstance(exc, self.errors.not_answering)
        kind = SessionStoreNotAnswering if silent else SessionStoreUnavailable
        return kind(f"Redis session store at {self.display_url} failed: {describe_error(exc)}")

    def _call(self, command: Any, *args: Any, **kwargs: Any) -> Any:
        return self.records.call(command, *args, **kwargs)

    def _script(self, source: str, keys: str | tuple[str, ...], *args: Any) -> Any:
        return self.records.script(source, keys, *args)

    def read(
        self, store_id: str, lifetime: timedelta, user: str | None = None
    ) -> Record | Retired | None:
        """``GETEX``; with ``user``, pipelined with a ``GET`` of that user's revocation mark:
        two commands in one round trip (on a cluster, one to each node, sent before either
        reply is read)."""
        # execute_command skips redis-py's keyword parsing for GETEX (a few µs on every
        # request); the command sent is the same.
        client: Any = self.client
        if user is None:
            data = self._call(client.execute_command, "GETEX", store_id, "EX", _seconds(lifetime))
            mark = None
        else:
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("GETEX", store_id, "EX", _seconds(lifetime))
            pipe.execute_command("GET", self.mark_key(user))
            data, raw_mark = self._call(pipe.execute)
            mark = _time(raw_mark)
        if data is None:
            # No session: a retired id's marker, if any (a second round trip, only for an id
            # with no session: expired, retired or never issued).
            marker = self._call(client.execute_command, "GET", retired_key(store_id))
            if isinstance(marker, bytes) and marker[:2] == RETIRED_MARKER:
                return _retired(marker) if len(marker) >= _RETIRED_HEAD else None
            return None
        if data[:2] != RECORD_MARKER:
            # Stored whole by an earlier release.
            return Record(None, blob=data, mark_user=user, mark=mark)
        try:
            return Record(parse_record(data), mark_user=user, mark=mark)
        except ValueError:
            # Undecodable: decode() discards it with a warning.
            return Record(None, blob=data, mark_user=user, mark=mark)

    def create(self, store_id: str, fields: Mapping[str, bytes], lifetime: timedelta) -> bool:
        return self._apply(store_id, "create", fields, (), lifetime) == b"ok"

    def update(self, store_id: str, changes: Changes, lifetime: timedelta, stored: Record) -> bool:
        mode = "whole" if changes.whole else "merge"
        reply = self._apply(store_id, mode, changes.set, changes.delete, lifetime)
        if reply == b"format":
            # An instance of the previous release rewrote the record in its own layout while
            # this request ran (a rolling deploy): write this request's session whole.
            stored_fields = dict(stored.fields or {})
            stored_fields.update(changes.set)
            for name in changes.delete:
                stored_fields.pop(name, None)
            reply = self._apply(store_id, "whole", stored_fields, (), lifetime)
        return reply == b"ok"

    def _apply(
        self,
        store_id: str,
        mode: str,
        fields: Mapping[str, bytes],
        deleted: tuple[str, ...],
        lifetime: timedelta,
    ) -> bytes:
        milliseconds = max(1000, int(lifetime.total_seconds() * 1000))
        args: list[Any] = [milliseconds, self.max_bytes, mode, len(fields)]
        for name, raw in fields.items():
            args += (name.encode("utf-8", "surrogatepass"), raw)
        args += (name.encode("utf-8", "surrogatepass") for name in deleted)
        reply = self._script(WRITE_SCRIPT, store_id, *args)
        if isinstance(reply, int):
            self.check_size(reply)
        assert isinstance(reply, bytes)
        return reply

    def delete(self, store_id: str) -> bool:
        return bool(self._call(self.client.unlink, store_id))

    def retire(self, store_id: str, marker: Retired) -> bool:
        successor = (marker.successor or "").encode()
        data = RETIRED_MARKER + _UNTIL.pack(marker.until) + successor
        linger = int(RETIRED_LINGER.total_seconds() * 1000)
        keys = (store_id, retired_key(store_id))
        return bool(self._script(RETIRE_SCRIPT, keys, data, linger, successor))

    # -- the user index --------------------------------------------------------------------------

    def index_key(self, user: str) -> str:
        """One sorted set per user; the hash tag keeps it in one slot of a cluster."""
        digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.key_prefix}user:{{{digest}}}"

    def mark_key(self, user: str) -> str:
        """The user's revocation mark, in the slot of their index."""
        return self.index_key(user) + ":revoked"

    def revoked_at(self, user: str) -> float | None:
        return _time(self._call(self.client.get, self.mark_key(user)))

    def mark_revoked(self, user: str, at: float) -> None:
        milliseconds = int(mark_lifetime(self.absolute_lifetime) * 1000)
        self._script(MARK_SCRIPT, self.mark_key(user), repr(at), milliseconds)

    def index(self, store_id: str, user: str) -> None:
        now = time.time()
        absolute = self.absolute_lifetime.total_seconds()
        popped = self._script(
            INDEX_SCRIPT,
            self.index_key(user),
            store_id,
            repr(now),
            repr(now - absolute),
            int(absolute) + 60,
            self.max_per_user,
        )
        if popped:  # beyond SESSION_MAX_PER_USER: the user's oldest sessions end
            self._unlink(popped)

    def unindex(self, store_id: str, user: str) -> None:
        self._call(self.client.zrem, self.index_key(user), store_id)

    def find_user_sessions(self, user: str, lifetime: timedelta) -> dict[str, UserSession]:
        """The index a page at a time: each entry's ``PTTL`` (never the session's data) says
        whether it is live and when it was last used, its score when it began; entries whose
        session is gone are dropped from the index on the way."""
        client: Any = self.client
        index = self.index_key(user)
        found: dict[str, UserSession] = {}
        start = 0
        while True:
            flat = self._script(LIST_SCRIPT, index, start, start + PAGE - 1)
            members, scores = flat[0::2], flat[1::2]
            if not members:
                return found
            lefts = self._pttls(members)
            gone = []
            now, idle = time.time(), lifetime.total_seconds()
            for member, score, left in zip(members, scores, lefts, strict=True):
                if isinstance(left, int) and left > 0:
                    store_id, since = member.decode(), float(score)
                    last_seen = max(since, now - max(0.0, idle - left / 1000))
                    found[store_id] = UserSession(
                        handle_of(store_id),
                        datetime.fromtimestamp(since, UTC),
                        datetime.fromtimestamp(last_seen, UTC),
                    )
                elif left == -2:  # no such key: expired, or deleted
                    gone.append(member)
            if gone:
                self._call(client.zrem, index, *gone)
            if len(members) < PAGE:
                return found
            start += len(members) - len(gone)

    def revoke(self, user: str, keep: Collection[str], before: float) -> int:
        """Pop the index a page at a time (entries indexed before the revoke, but the kept
        ones) and unlink those sessions; the index is never deleted whole, so a login landing
        meanwhile keeps its entry (and the mark decides whether its session lives)."""
        index = self.index_key(user)
        ended = 0
        while True:
            members = self._script(POP_SCRIPT, index, repr(before), PAGE, *keep)
            if not members:
                return ended
            ended += self._unlink(members)

    def _pttls(self, keys: list[bytes]) -> list[object]:
        """Each key's PTTL: one script call (per node of a cluster)."""
        client: Any = self.client
        if not hasattr(client, "get_primaries"):
            return list(self._run(PTTL_SCRIPT, keys))
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for position, key in enumerate(keys):
            node = self._call(client.get_node_from_key, key)
            by_node.setdefault(node.name, (node, []))[1].append(position)
        lefts: list[object] = [None] * len(keys)
        for node, positions in by_node.values():
            replies = self._run(PTTL_SCRIPT, [keys[i] for i in positions], node)
            for position, left in zip(positions, replies, strict=True):
                lefts[position] = left
        return lefts

    def _run(self, source: str, keys: list[bytes], node: Any = None) -> Any:
        """EVALSHA with many keys as arguments (on ``node`` of a cluster), loading the script
        when the server does not know it yet."""
        client: Any = self.client
        target = {} if node is None else {"target_nodes": node}
        command = ("EVALSHA", self.records.shas[source], 0, *keys)
        try:
            try:
                return client.execute_command(*command, **target)
            except self.errors.no_script:
                client.execute_command("SCRIPT LOAD", source, **target)
                return client.execute_command(*command, **target)
        except Exception as exc:
            raise self._unavailable(exc) from None

    def _unlink(self, keys: list[bytes]) -> int:
        """UNLINK many session keys: one command on one node; on a cluster one per key in a
        pipeline (redis-py would otherwise send one command per slot, one after another)."""
        client: Any = self.client
        if not hasattr(client, "get_primaries"):
            return int(self._call(client.unlink, *keys))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("UNLINK", key)
        return sum(int(n) for n in self._call(pipe.execute))

    def ping(self) -> dict[str, object]:
        """The topology, proven to answer: every primary of a cluster (and all 16384 slots
        covered), the current primary of a Sentinel service; and the eviction policy (see
        :meth:`_eviction_facts`)."""
        client: Any = self.client
        if hasattr(client, "get_primaries"):  # RedisCluster, ValkeyCluster
            facts = self._ping_cluster(client)
            return facts | self._eviction_facts(
                lambda: client.info("memory", target_nodes=type(client).PRIMARIES)
            )
        self._call(client.ping)
        pool = getattr(client, "connection_pool", None)
        if isinstance(pool, SentinelConnectionPool):
            host, port = self._call(pool.get_master_address)
            facts = {"topology": "sentinel", "primary": f"{host}:{port}"}
        else:
            facts = {"topology": "standalone"}
        return facts | self._eviction_facts(lambda: client.info("memory"))

    _policy_warned = False

    def _eviction_facts(self, info_memory: Callable[[], Any]) -> dict[str, object]:
        """``maxmemory_policy`` as ``INFO memory`` reports it (INFO needs no CONFIG permission,
        which Memorystore and ACL users lack; a server that refuses INFO too says ``unknown``).
        A policy that may evict signed-in users' sessions while anonymous ones remain (any
        LRU, LFU or random one, Memorystore's default ``volatile-lru`` included) adds a
        ``maxmemory_policy_warning`` and is logged once per process: ``volatile-ttl`` evicts
        the shortest-lived keys first, which are the anonymous sessions."""
        try:
            reply = info_memory()
        except self.errors.store as exc:
            if not _is_refusal(exc):
                raise self._unavailable(exc) from None
            return {"maxmemory_policy": "unknown (INFO refused)"}
        except Exception as exc:
            raise self._unavailable(exc) from None
        # A cluster answers per primary ({node: info}); one server answers its info.
        infos = [reply] if "maxmemory_policy" in reply else list(reply.values())
        policies = sorted({str(info.get("maxmemory_policy", "unknown")) for info in infos})
        facts: dict[str, object] = {"maxmemory_policy": ",".join(policies)}
        risky = [policy for policy in policies if policy.endswith(EVICTS_BY_USE)]
        if risky:
            warning = (
                f"maxmemory-policy {','.join(risky)} may evict signed-in users' sessions (logging "
                "them out) while anonymous ones remain when the store is full; set "
                "maxmemory-policy volatile-ttl (anonymous sessions, the shortest-lived, go first)"
            )
            facts["maxmemory_policy_warning"] = warning
            if not self._policy_warned:
                self._policy_warned = True
                logger.warning("Redis session store at %s: %s", self.display_url, warning)
        return facts

    def _ping_cluster(self, client: Any) -> dict[str, object]:
        primaries = self._call(client.get_primaries)
        answering = 0
        for node in primaries:
            try:
                client.ping(target_nodes=node)
                answering += 1
            except self.errors.store:
                continue
        slots = self._call(client.cluster_slots, target_nodes=type(client).RANDOM)
        covered = sum(int(end) - int(start) + 1 for start, end in slots)
        facts: dict[str, object] = {
            "topology": "cluster",
            "primaries": len(primaries),
            "primaries_answering": answering,
            "slots_covered": covered,
        }
        if answering < len(primaries) or covered < 16384:
            raise SessionStoreUnavailable(
                f"Redis session store at {self.display_url}: cluster degraded "
                f"({answering} of {len(primaries)} primaries answer, {covered} of 16384 slots "
                "covered)"
            )
        return facts


#: Eviction policies that choose by use (or at random), not by expiry: under memory pressure
#: they evict a signed-in user who has been idle a while before a flood of fresh anonymous
#: sessions.
EVICTS_BY_USE: Final = ("-lru", "-lfu", "-random")


def _is_refusal(exc: BaseException) -> bool:
    """The server refused the command (an ACL without it, a managed service that renamed it),
    as opposed to not answering: redis-py's and valkey-py's ResponseError and subclasses."""
    return any(cls.__name__ == "ResponseError" for cls in type(exc).__mro__)


def parse_record(data: bytes) -> dict[str, bytes]:
    """A record in this release's layout: each key's encoded value. ValueError when the
    framing is broken."""
    return parse_fields(data, len(RECORD_MARKER))


def retired_key(store_id: str) -> str:
    """The key of a retired id's marker: in the session key's cluster slot, so one script
    deletes the one and writes the other. A session key hashes whole unless it holds a hash
    tag (a ``{...}`` in ``SESSION_KEY_PREFIX``): then the tag decides both."""
    start = store_id.find("{")
    if start != -1 and store_id.find("}", start + 1) > start + 1:
        return store_id + RETIRED_SUFFIX
    return "{" + store_id + "}" + RETIRED_SUFFIX


_UNTIL = struct.Struct(">d")
_RETIRED_HEAD = len(RETIRED_MARKER) + _UNTIL.size


def _retired(data: bytes) -> Retired:
    (until,) = _UNTIL.unpack_from(data, len(RETIRED_MARKER))
    successor = data[_RETIRED_HEAD:].decode("utf-8", "replace")
    return Retired(successor or None, until)


def _time(raw: object) -> float | None:
    """A stored revocation mark (text of a float); None when absent or not a number."""
    if not isinstance(raw, bytes):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value == value else None  # NaN: no mark a session could be before


def _seconds(lifetime: timedelta) -> int:
    return max(1, int(lifetime.total_seconds()))


def describe_error(exc: BaseException) -> str:
    """The error's class, and the TLS cause when there is one (never the URL or a password)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, IamTokenUnavailable | CaFileUnreadable):
            return f"{type(exc).__name__} ({cause})"
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


def create_client(options: Options) -> Client:
    """A client for REDIS_URL's topology with a bounded wait per call; it connects on first use.

    Standalone: ``redis.Redis``. Cluster: ``RedisCluster`` from the seed nodes (it follows
    MOVED/ASK and a failover's new primaries). Sentinel: the primary of the service, found through
    the sentinels again on every new connection, so a failover is followed without a restart.
    With ``REDIS_SSL_CA_CERTS`` every TLS connection (to nodes and sentinels alike) trusts that
    CA alone: see :class:`PinnedSSLConnection`.
    """
    assert options.url is not None  # guaranteed by Options.problems()
    target = parse_url(options.url)
    common: dict[str, Any] = {
        "socket_timeout": options.socket_timeout,
        "socket_connect_timeout": options.connect_timeout,
        "driver_info": None,
    }
    if options.iam_auth:
        common["credential_provider"] = IamCredentialProvider(google_access_token)
    else:
        common.update(username=target.username, password=target.password)
    pinned = target.tls and options.ssl_ca_certs is not None
    if target.tls:
        # Memorystore's certificate names an IP: verify against its CA, optionally skip the name.
        common.update(
            ssl=True,
            ssl_ca_certs=options.ssl_ca_certs,
            ssl_check_hostname=options.ssl_check_hostname,
        )
    # Only a dropped connection is retried, once, after ~50 ms: a hung server is not asked twice.
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), RETRIES, (redis.ConnectionError,))
    if target.mode == "cluster":
        # The cluster client's own retries re-read the slot map between attempts (a failover).
        cluster_retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), CLUSTER_RETRIES)
        if pinned:
            return _pinned_cluster(target, cluster_retry, common)
        nodes = [ClusterNode(host, port) for host, port in target.hosts]  # type: ignore[no-untyped-call]
        return SessionCluster(startup_nodes=nodes, retry=cluster_retry, **common)
    if target.mode == "sentinel":
        assert target.service is not None
        sentinel_options = {k: v for k, v in common.items() if not k.startswith(("user", "pass"))}
        sentinel_options.pop("credential_provider", None)
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_options, **common)  # type: ignore[no-untyped-call]
        if pinned:
            for sentinel_client in sentinel.sentinels:
                _pin(sentinel_client)
        primary: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            target.service,
            db=target.db,
            retry=retry,
            health_check_interval=0,
            **({"connection_class": PinnedSentinelSSLConnection} if pinned else {}),
        )
        return primary
    host, port = target.hosts[0]
    client = redis.Redis(
        host=host, port=port, db=target.db, retry=retry, health_check_interval=0, **common
    )
    if pinned:
        _pin(client)
    return client


class CaFileUnreadable(OSError):
    """REDIS_SSL_CA_CERTS could not be loaded (missing, unreadable, not PEM); never a 'TLS
    handshake failed' that sends the operator to look at the server."""


class PinnedSSLConnection(SSLConnection):
    """An SSLConnection that trusts REDIS_SSL_CA_CERTS alone.

    redis-py builds its context with ``ssl.create_default_context()`` (the system's CAs) and
    only adds the file: with the hostname check off (Memorystore), a certificate from any
    publicly trusted CA, for any name, would pass and receive the AUTH password. This context
    starts empty; the server must prove a certificate from that CA before anything is sent.
    """

    def _wrap_socket_with_ssl(self, sock: socket.socket) -> ssl.SSLSocket:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies; holds no CA yet
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = bool(self.check_hostname)
        try:
            context.load_verify_locations(cafile=self.ca_certs)
        except (OSError, ValueError) as exc:  # ssl.SSLError (not PEM) is an OSError too
            raise CaFileUnreadable(
                f"{REDIS_SSL_CA_CERTS} cannot be loaded ({type(exc).__name__}); point it at the "
                "server CA's PEM file"
            ) from None
        return context.wrap_socket(sock, server_hostname=self.host)


class PinnedSentinelSSLConnection(SentinelManagedConnection, PinnedSSLConnection):
    """The primary of a Sentinel service, over TLS pinned to REDIS_SSL_CA_CERTS."""


def _pin(client: redis.Redis) -> None:
    """Make ``client``'s pool (which has opened nothing yet) open pinned connections:
    ``redis.Redis`` takes no connection class, and its pool keeps every other setting."""
    assert client.connection_pool.connection_class is SSLConnection
    client.connection_pool.connection_class = PinnedSSLConnection


def _pinned_cluster(target: Target, retry: Retry, common: dict[str, Any]) -> SessionCluster:
    """A cluster whose node connections are pinned. RedisCluster hands a connection class to
    its nodes' pools only when built from a URL (``from_url``): the first seed goes in a
    ``redis://`` URL (which sets no connection class of its own), the others stay seeds."""
    (host, port), *others = target.hosts
    location = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    kwargs = {k: v for k, v in common.items() if k != "ssl"}
    nodes = [ClusterNode(h, p) for h, p in others]  # type: ignore[no-untyped-call]
    return SessionCluster(
        url=f"redis://{location}",
        startup_nodes=nodes,
        retry=retry,
        connection_class=PinnedSSLConnection,
        **kwargs,
    )


class SessionCluster(RedisCluster):
    """RedisCluster, except that a timeout is not retried: a hung primary costs a request one
    REDIS_SOCKET_TIMEOUT, as a hung standalone server does. A dropped connection, a cluster
    that is down or a slot not covered still re-read the slot map and retry (a failover)."""

    ERRORS_ALLOW_RETRY = (redis.ConnectionError, ClusterDownError, SlotNotCoveredError)  # type: ignore[assignment]


class IamCredentialProvider(CredentialProvider):
    """The AUTH password is a Google access token (Memorystore IAM authentication). redis-py asks
    for credentials only when it opens a connection; the token is cached and fetched again 5
    minutes before it expires, so open connections are never touched. A token that cannot be
    had is a ConnectionError (a 503), never logged with the token."""

    def __init__(self, token_source: Callable[[], tuple[str, float]]) -> None:
        self._source = token_source
        self._token: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def get_credentials(self) -> tuple[str]:
        token = self._token
        if token is not None and token[1] - time.time() >= IAM_REFRESH_MARGIN:
            return (token[0],)
        if token is not None and token[1] - time.time() > IAM_MIN_VALIDITY:
            # Refresh in one thread; the others keep using the token that still works.
            if not self._lock.acquire(blocking=False):
                return (token[0],)
            self._lock.release()
        with self._lock:
            now = time.time()
            if self._token is None or self._token[1] - now < IAM_REFRESH_MARGIN:
                try:
                    self._token = self._source()
                except Exception as exc:  # any failure of the token source is the same 503
                    if self._token is not None and self._token[1] - now > IAM_MIN_VALIDITY:
                        # The cached token still works: a hiccup of the token endpoint is no
                        # outage. The next new connection asks again.
                        return (self._token[0],)
                    raise IamTokenUnavailable(
                        f"IAM authentication: no access token ({type(exc).__name__}); check the "
                        "service account's Application Default Credentials and its "
                        "roles/redis.dbConnectionUser role"
                    ) from None
            return (self._token[0],)


class IamTokenUnavailable(redis.ConnectionError):
    """No access token could be had; its message says why, and never holds a token."""


def google_access_token() -> tuple[str, float]:
    """An access token from Application Default Credentials, and when it expires (epoch s)."""
    import google.auth  # only when REDIS_IAM_AUTH is on: ~100 ms of imports
    import google.auth.transport.requests

    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    credentials.refresh(google.auth.transport.requests.Request())  # type: ignore[no-untyped-call]
    expiry = credentials.expiry
    expires_at = expiry.replace(tzinfo=UTC).timestamp() if expiry else time.time() + 3000
    return str(credentials.token), expires_at


def check_client(client: object) -> tuple[Any, ClientErrors]:
    """The caller's client, used as given, and its library's exceptions; anything that is not a
    redis-py or valkey-py client is refused (Flask-Session would silently connect to localhost
    instead)."""
    kwargs: object = getattr(client, "get_connection_kwargs", dict)()
    if isinstance(kwargs, dict) and kwargs.get("decode_responses"):
        raise TypeError(
            "client has decode_responses=True: sessions are bytes; pass a client built without "
            "decode_responses (or with decode_responses=False)."
        )
    if isinstance(client, redis.Redis | RedisCluster):
        return client, ClientErrors()
    if type(client).__module__.partition(".")[0] == "valkey":
        import valkey  # only for a valkey-py client
        import valkey.cluster

        if isinstance(client, valkey.Valkey | valkey.cluster.ValkeyCluster):
            exceptions = valkey.exceptions
            store = (exceptions.ValkeyError, exceptions.ValkeyClusterException)
            silent = (exceptions.TimeoutError, TimeoutError)
            return client, ClientErrors(store, exceptions.NoScriptError, silent)
    raise TypeError(
        f"client={type(client).__name__} cannot back the redis session store; pass a "
        "redis.Redis, redis.cluster.RedisCluster, valkey.Valkey or valkey.cluster.ValkeyCluster "
        "(or a subclass), or no client to connect to REDIS_URL."
    )


def create_interface(
    app: Flask, settings: Settings, client: object | None = None
) -> RedisSessionInterface:
    options = settings.store
    assert isinstance(options, Options)
    if client is None:
        if options.client_given:
            raise TypeError("redis.Options(client_given=True) needs the client: pass client=.")
        return RedisSessionInterface(
            app,
            lambda: create_client(options),
            display_url=redact_url(options.url) or "",
            **interface_options(settings),
        )
    given, errors = check_client(client)
    return RedisSessionInterface(
        app,
        lambda: given,
        display_url=f"({CLIENT_GIVEN})",
        errors=errors,
        **interface_options(settings),
    )
