"""gunicorn settings for Cloud Run; every value can be overridden by its environment variable."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

from gunicorn.glogging import Logger as _GunicornLogger

from pyloto_corp.config.settings import Settings
from pyloto_corp.logs import logging_config

_settings = Settings.from_env()

# Cloud Run says which port to listen on in $PORT (8080 by default), on all interfaces.
bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"

# Few processes, several threads: Cloud Run scales by instances, a request mostly waits on the
# session store, and threads share one store connection pool per process.
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))

# Cloud Run enforces the request timeout itself (300 s by default); gunicorn's worker timeout is
# a heartbeat, kept just above it so a stuck worker is still replaced.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "310"))

# Cloud Run sends SIGKILL 10 s after SIGTERM: finish in-flight requests within 8 s
# (gunicorn's default of 30 s would be cut off).
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "8"))
keepalive = 5

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
    project=_settings.firestore_project,
    level=os.environ.get("LOG_LEVEL", "INFO"),
)
