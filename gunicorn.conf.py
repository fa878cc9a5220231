"""gunicorn settings for Cloud Run; every value can be overridden by its environment variable."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, NamedTuple

from gunicorn.glogging import Logger as _GunicornLogger

from pyloto_corp.config.server import ServerSettings
from pyloto_corp.config.settings import Settings
from pyloto_corp.logs import logging_config

# Check every variable this file reads before gunicorn uses any: a bad one stops the start with
# one line per problem and exit status 1. gunicorn's config loader catches Exception (and prints
# a traceback) but not SystemExit, whose message goes to stderr as is.
_server, _problems = ServerSettings.from_env()
if _problems:
    raise SystemExit(
        "Error: invalid gunicorn configuration:\n" + "\n".join(f"  - {p}" for p in _problems)
    )

_settings = Settings.from_env()

# Cloud Run says which port to listen on in $PORT (8080 by default), on all interfaces.
bind = f"0.0.0.0:{_server.port}"

# Few processes, several threads: Cloud Run scales by instances, a request mostly waits on the
# session store, and threads share one store connection pool per process.
workers = _server.workers
worker_class = "gthread"
threads = _server.threads

# Cloud Run enforces the request timeout itself (300 s by default); gunicorn's worker timeout is
# a heartbeat, kept just above it so a stuck worker is still replaced.
timeout = _server.timeout

# Cloud Run sends SIGKILL 10 s after SIGTERM: finish in-flight requests within 8 s
# (gunicorn's default of 30 s would be cut off).
graceful_timeout = _server.graceful_timeout
keepalive = 5

# gunicorn trusts no peer's forwarding headers. By default it would take X-Forwarded-Proto (and
# -Protocol, -Ssl) from loopback peers and set the request's scheme to https whatever
# TRUSTED_PROXY_HOPS says; an empty list (not "*", which trusts everyone) trusts no IP address.
# The app's ProxyFix, set from TRUSTED_PROXY_HOPS, is then the one place that decides which
# X-Forwarded-* headers count. This file overrides the FORWARDED_ALLOW_IPS variable; a
# --forwarded-allow-ips flag (or GUNICORN_CMD_ARGS) would override this file.
forwarded_allow_ips = ""

# Load the app in the master before opening the socket: a configuration error fails once, with
# its one-paragraph message, and gunicorn exits 1 (without preload it would listen first and
# die later with "Worker failed to boot"). Store clients connect lazily, in the workers.
preload_app = True

# gunicorn 25.1+ opens a control socket (for gunicornc) under $XDG_RUNTIME_DIR or
# $HOME/.gunicorn: nothing on Cloud Run uses it, and it is one more way into a running server.
# Older releases ignore a setting they do not know in this file.
control_socket_disable = True


#: What gunicorn's fixed access-log atoms (h, u, r, m, U, q, H, f, a ...) read from the environ.
_ATOM_ENVIRON = (
    "REMOTE_ADDR",
    "HTTP_AUTHORIZATION",
    "REQUEST_METHOD",
    "RAW_URI",
    "SERVER_PROTOCOL",
    "PATH_INFO",
    "QUERY_STRING",
    "HTTP_REFERER",
    "HTTP_USER_AGENT",
)


class _Response(NamedTuple):
    """What the fixed atoms read from gunicorn's response, without its headers."""

    status: Any
    sent: Any
    headers: tuple[()] = ()


class Logger(_GunicornLogger):  # type: ignore[misc]
    """gunicorn's logger, with a cheaper access log.

    Off, or above INFO (LOG_LEVEL=WARNING), no field is built: gunicorn would build them for
    every request, because a logging config is given (about 7 % of a worker's CPU time). On,
    with a format that names no header or environ atom (``{name}i``, ``{name}o``, ``{name}e``;
    gunicorn's default names none), only the fixed atoms are built: gunicorn would add and
    escape every request header, response header and environ entry (about 50) on each line.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        # Once per (re)load, not per request. A --access-logfile flag sets cfg.accesslog too.
        self._writes_access_log = bool(cfg.accesslog)
        self._names_variables = "{" in cfg.access_log_format

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> None:
        if self._writes_access_log and self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)

    def atoms(
        self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta
    ) -> dict[str, Any]:
        if self._names_variables:
            return super().atoms(resp, req, environ, request_time)  # type: ignore[no-any-return]
        fixed = {name: environ[name] for name in _ATOM_ENVIRON if name in environ}
        response = _Response(resp.status, getattr(resp, "sent", None))
        return super().atoms(response, (), fixed, request_time)  # type: ignore[no-any-return]


logger_class = Logger

# Logs to stdout/stderr, as JSON lines for Cloud Logging when deployed, plain text otherwise.
# No access log on Cloud Run (its request log has every request already) unless
# GUNICORN_ACCESS_LOG=true; one line per request elsewhere unless GUNICORN_ACCESS_LOG=false.
accesslog = "-" if _server.access_log else None
errorlog = "-"
logconfig_dict = logging_config(
    structured=_settings.is_deployed,
    project=_settings.trace_project,
    level=_server.log_level,
)
