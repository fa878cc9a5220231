"""gunicorn settings for Cloud Run; every value can be overridden by its environment variable."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

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


class Logger(_GunicornLogger):  # type: ignore[misc]
    """gunicorn's logger, except that a request's access-log fields are built only when the
    access log would write them. gunicorn formats them for every request once any logging
    config is given, even when LOG_LEVEL=WARNING (say, on Cloud Run, which logs every request
    itself) drops the line: that was about 7 % of a worker's CPU time."""

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> None:
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)


logger_class = Logger

# Logs to stdout/stderr, as JSON lines for Cloud Logging when deployed, plain text otherwise.
accesslog = "-"
errorlog = "-"
logconfig_dict = logging_config(
    structured=_settings.is_deployed,
    project=_settings.trace_project,
    level=_server.log_level,
)
