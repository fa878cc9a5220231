"""The redis backend's settings: its variables, REDIS_URL's forms (standalone, ``+cluster``,
``+sentinel``, ``rediss`` for TLS), and their rules for each environment (pure, no IO)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import unquote

from ...config.settings import REDIS, Settings, redact_url
from ..base import CLIENT_GIVEN, StoreOptions

if TYPE_CHECKING:
    from environs import Env

REDIS_URL = "REDIS_URL"
REDIS_SOCKET_TIMEOUT = "REDIS_SOCKET_TIMEOUT"
REDIS_CONNECT_TIMEOUT = "REDIS_CONNECT_TIMEOUT"
REDIS_SSL_CA_CERTS = "REDIS_SSL_CA_CERTS"
REDIS_SSL_CHECK_HOSTNAME = "REDIS_SSL_CHECK_HOSTNAME"
REDIS_IAM_AUTH = "REDIS_IAM_AUTH"
REDIS_ALLOW_PLAINTEXT_AUTH = "REDIS_ALLOW_PLAINTEXT_AUTH"


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
