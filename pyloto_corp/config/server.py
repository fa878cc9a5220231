"""The variables gunicorn.conf.py reads, parsed and checked before gunicorn starts.

gunicorn would otherwise meet ``GUNICORN_WORKERS=abc`` as a traceback from ``int()``, and
``PORT=70000`` or ``LOG_LEVEL=loud`` as an error naming no variable. ``ServerSettings.from_env``
is pure and never raises: it returns the settings (a default where a value is bad) and one line
per problem, naming the variable and what it accepts but never the value given.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Final


class ServerVar:
    """Every environment variable gunicorn.conf.py reads, named in one place."""

    PORT: Final = "PORT"
    GUNICORN_WORKERS: Final = "GUNICORN_WORKERS"
    GUNICORN_THREADS: Final = "GUNICORN_THREADS"
    GUNICORN_TIMEOUT: Final = "GUNICORN_TIMEOUT"
    GUNICORN_GRACEFUL_TIMEOUT: Final = "GUNICORN_GRACEFUL_TIMEOUT"
    LOG_LEVEL: Final = "LOG_LEVEL"
    GUNICORN_ACCESS_LOG: Final = "GUNICORN_ACCESS_LOG"
    #: Set by Cloud Run; read here only for the access log's default.
    K_SERVICE: Final = "K_SERVICE"


LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The spellings GUNICORN_ACCESS_LOG takes (any case), as the app's other switches do.
TRUE_WORDS: Final = ("true", "1", "yes", "on")
FALSE_WORDS: Final = ("false", "0", "no", "off")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """gunicorn's process settings; the defaults suit Cloud Run (see gunicorn.conf.py for why)."""

    port: int = 8080
    workers: int = 2
    threads: int = 4
    #: Seconds; kept above Cloud Run's own 300 s request timeout.
    timeout: int = 310
    #: Seconds; Cloud Run sends SIGKILL 10 s after SIGTERM.
    graceful_timeout: int = 8
    log_level: str = "INFO"
    #: One line per request. Off by default on Cloud Run (K_SERVICE set), whose own request
    #: log already has every request: a second line is paid for twice in Cloud Logging and
    #: costs 12-15 % of the throughput of a read-only session request.
    access_log: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> tuple[ServerSettings, list[str]]:
        """Parse ``environ`` (``os.environ`` when None): the settings and every problem, in order.

        An unset variable takes its default; a set but empty one is a problem, because it is
        almost always a deployment mistake (``--set-env-vars GUNICORN_THREADS=``).
        """
        source = os.environ if environ is None else environ
        problems: list[str] = []
        default = cls()

        def whole_number(name: str, low: int, high: int, fallback: int) -> int:
            raw = source.get(name)
            if raw is None:
                return fallback
            value = _parse_int(raw)
            if value is None or not low <= value <= high:
                got = "a non-number" if value is None else "a number out of range"
                if not raw.strip():
                    got = "an empty value"
                problems.append(f"{name} must be a whole number from {low} to {high} (got {got}).")
                return fallback
            return value

        port = whole_number(ServerVar.PORT, 1, 65535, default.port)
        workers = whole_number(ServerVar.GUNICORN_WORKERS, 1, 64, default.workers)
        threads = whole_number(ServerVar.GUNICORN_THREADS, 1, 256, default.threads)
        timeout = whole_number(ServerVar.GUNICORN_TIMEOUT, 1, 3600, default.timeout)
        graceful_timeout = whole_number(
            ServerVar.GUNICORN_GRACEFUL_TIMEOUT, 0, 3600, default.graceful_timeout
        )

        log_level = default.log_level
        raw_level = source.get(ServerVar.LOG_LEVEL)
        if raw_level is not None:
            level = raw_level.strip().upper()
            if level in LOG_LEVELS:
                log_level = level
            else:
                got = "an empty value" if not level else "an unknown level"
                problems.append(
                    f"{ServerVar.LOG_LEVEL} must be one of {', '.join(LOG_LEVELS)} "
                    f"(any case; got {got})."
                )

        access_log = not source.get(ServerVar.K_SERVICE)
        raw_access = source.get(ServerVar.GUNICORN_ACCESS_LOG)
        if raw_access is not None:
            word = raw_access.strip().lower()
            if word in TRUE_WORDS or word in FALSE_WORDS:
                access_log = word in TRUE_WORDS
            else:
                got = "an empty value" if not word else "something else"
                problems.append(
                    f"{ServerVar.GUNICORN_ACCESS_LOG} must be true or false (also 1/0, yes/no, "
                    f"on/off, any case; got {got})."
                )

        settings = cls(
            port=port,
            workers=workers,
            threads=threads,
            timeout=timeout,
            graceful_timeout=graceful_timeout,
            log_level=log_level,
            access_log=access_log,
        )
        return settings, problems


def _parse_int(raw: str) -> int | None:
    """A plain decimal integer (surrounding spaces allowed), else None.

    Stricter than ``int()``, which also takes ``1_000`` and non-ASCII digits (Arabic-Indic
    ones, say), and which raises for more than 4,300 digits: those become a huge value here.
    """
    text = raw.strip()
    sign = -1 if text[:1] == "-" else 1
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits.isascii() or not digits.isdigit():
        return None
    if len(digits.lstrip("0")) > 18:
        return sign * 10**18
    return sign * int(digits)
