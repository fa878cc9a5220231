"""The few exceptions this package raises on purpose.

They subclass built-ins so callers that only know ``ValueError``, ``TypeError`` or
``RuntimeError`` still catch them; their messages name the variable (or the session key) and the
fix, never a secret value.
"""

from __future__ import annotations

from collections.abc import Iterable

from .config.settings import ENVIRONMENTS


class ConfigurationError(ValueError):
    """The settings cannot run in this environment; raised once, at app init, with every problem."""

    def __init__(self, environment: str, problems: Iterable[str]) -> None:
        # ENV may hold anything, a secret pasted into the wrong variable included: only a known
        # environment's name is repeated.
        known = environment in ENVIRONMENTS
        self.environment = environment if known else "unknown"
        self.problems: tuple[str, ...] = tuple(problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        where = f"environment '{environment}'" if known else "an unknown environment"
        lines = [f"Invalid configuration for {where} ({count} {noun}):"]
        lines += [f"  - {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[type[ConfigurationError], tuple[str, tuple[str, ...]]]:
        return (type(self), (self.environment, self.problems))


class SessionStoreUnavailable(RuntimeError):
    """The session store did not answer in time; the request is answered with 503, not 500."""


class SessionStoreNotAnswering(SessionStoreUnavailable):
    """The store did not answer within its timeout (a hung server, an unreachable host): the
    requests queued behind this one would wait as long, so the process answers 503 at once for a
    short cool-down (``SESSION_STORE_COOLDOWN``). A failure that comes at once (a refused
    connection, an error the store answered such as out of memory) raises the parent class: it
    costs no one a wait, and fails only the sessions it concerns (one shard of a cluster)."""


class SessionTooLarge(ValueError):
    """The encoded session exceeds what the backend may store; the stored copy is left intact."""


class UnstorableValue(TypeError):
    """A session value the format cannot round-trip exactly (a set, a custom object, a non-str
    key); refused when the session is written, before the store is touched."""


class SessionGone(LookupError):
    """The stored session ended (a logout, a login elsewhere) while this request ran: its write
    is dropped instead of bringing the session back."""


class StateBusy(RuntimeError):
    """Another caller holds the turn of this keyed-state id (``KeyedState.turn``) past the wait:
    a webhook answers 503 with ``Retry-After`` (the sender retries), a worker's task is retried.
    ``retry_after``: seconds until the holder's lease runs out, at most."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LeaseLost(RuntimeError):
    """A ``turn()`` outlived its lease and another caller took the turn: this turn's changes
    were not written (the other holder's state stands)."""
