"""Building the redis client for REDIS_URL's topology (standalone, Cluster, Sentinel), with TLS
pinned to one CA, Memorystore IAM tokens, and bounded waits; and accepting an app's own client
(redis-py or valkey-py) as given.

A hung server must cost a request no more than ``REDIS_SOCKET_TIMEOUT``: a timeout is never
retried (the server is not answering; a retry doubles the wait), no idle-connection health check
adds its own PING, and the connection handshake sends nothing when no password or db needs it.
Only a dropped connection is retried, once, after a short backoff.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection
from redis.credentials import CredentialProvider
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from .options import REDIS_SSL_CA_CERTS, Options, Target, parse_url

#: A dropped connection is retried once (after ~50 ms); a timeout is not retried at all.
RETRIES = 1
#: A cluster command is tried this many more times, the slot map read again in between.
CLUSTER_RETRIES = 2
#: An IAM access token is fetched again this many seconds before it expires.
IAM_REFRESH_MARGIN = 300
#: A cached token this close to its expiry is not used any more, even when no new one comes.
IAM_MIN_VALIDITY = 30


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


#: redis-py's (the default client's).
REDIS_PY_ERRORS = ClientErrors()

#: The clients this backend drives: anything else is refused at init, never replaced.
Client = redis.Redis | RedisCluster


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
