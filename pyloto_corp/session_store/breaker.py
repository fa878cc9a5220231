"""Fail fast together: one process's circuit breaker in front of the session store.

Each request bounds its own wait on a hung store (the socket timeout), but requests queued
behind a busy thread pool wait for the timeouts of the ones ahead of them: with the store hung,
16 clients on 2 workers x 4 threads waited up to 3.1 s for their 503 here (8 s in the report of
issue 19); with the breaker, 1.1-1.3 s.
Once the store did not answer a call in time (:class:`SessionStoreNotAnswering`: a hung server,
an unreachable host), the breaker *opens*: the process answers 503 at once for
``SESSION_STORE_COOLDOWN`` seconds; then one request at a time (the *probe*) may use the store
again. The first store call that gets an answer closes it. A failure that comes at once (a
refused connection, an error the store answered) costs no one a wait and is a 503 for that
request alone: opening on refusals turned a cluster failover's 2 503s for sessions on the
healthy shards into 989.

Every store failure of the request path passes through :meth:`Breaker.guard`, so it is logged
there: one that answered with an error, each time; one that did not answer, once per opening.

Per process and per interface, no shared state: a worker forked after ``preload_app`` starts
closed (the state is keyed on ``os.getpid()``, as :meth:`StoreInterface.process_client` is).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType

from ..errors import SessionStoreNotAnswering, SessionStoreUnavailable

logger = logging.getLogger("pyloto_corp.session_store")

#: Seconds of fail-fast after a store failure, unless SESSION_STORE_COOLDOWN says otherwise.
DEFAULT_COOLDOWN = 1.0
#: The longest cool-down accepted: beyond it a recovered store would sit unused for too long.
MAX_COOLDOWN = 60.0


class _State:
    """One process's view of the store. ``opened_at`` None means closed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened_at: float | None = None
        #: No probe before this time (the end of the current cool-down).
        self.retry_at = 0.0
        self.probing = False
        #: Requests answered at once since the breaker opened (for the recovery log line).
        self.refused = 0


class Breaker:
    """Open after a store failure, closed again by the first store call that succeeds.

    ``cooldown`` 0 turns it off: every request tries the store (and each failure is logged).
    ``clock`` is monotonic seconds (tests may pass a fake one).
    """

    def __init__(
        self, cooldown: float = DEFAULT_COOLDOWN, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (cooldown == 0 or 0 < cooldown <= MAX_COOLDOWN):
            raise ValueError(
                f"cooldown={cooldown!r}: SESSION_STORE_COOLDOWN must be 0 (off) or more than 0 "
                f"and at most {MAX_COOLDOWN:g} seconds."
            )
        self.cooldown = cooldown
        self.clock = clock
        #: Called once per opening (telemetry counts them).
        self.on_open: Callable[[], None] | None = None
        self._held: tuple[int, _State] | None = None

    def _state(self) -> _State:
        """This process's state; a fresh, closed one in a forked child (a lock held by another
        thread of the parent at fork time would never be released there)."""
        held = self._held
        pid = os.getpid()
        if held is None or held[0] != pid:
            held = (pid, _State())
            self._held = held
        return held[1]

    @property
    def state(self) -> str:
        """``closed``, ``open`` (answering 503 at once) or ``half-open`` (a probe may go, or
        is on its way)."""
        state = self._state()
        if state.opened_at is None:
            return "closed"
        return "half-open" if state.probing or self.clock() >= state.retry_at else "open"

    def reason(self) -> str | None:
        """Why requests are answered 503 at once, for anyone to read (nothing of the store's
        whereabouts); None while closed."""
        state = self._state()
        opened_at = state.opened_at
        if opened_at is None:
            return None
        now = self.clock()
        waited = now - opened_at
        if state.probing:
            then = "a request is probing it now"
        else:
            then = f"the next request probes it in {max(0.0, state.retry_at - now):.1f} s"
        return (
            f"the session store failed {waited:.1f} s ago; requests are answered 503 at once "
            f"until it answers again ({then})"
        )

    def guard(self, *, admit: bool = True, opens: bool = True) -> _Guard:
        """A context manager around one request's store calls.

        While open, raise :class:`SessionStoreUnavailable` at once (nothing logged: the opening
        was), unless the cool-down is over and no other request is probing: this one is the
        probe. A :class:`SessionStoreNotAnswering` from the block opens the breaker (logged once
        per opening); a block that ends normally, or with an error the store answered, closes
        it.

        ``admit=False``: never refused (the caller already holds data read from the store and
        only a side write is left); its failures still count, its success does not.
        ``opens=False``: a failure keeps an open breaker open but does not open a closed one
        (``/readyz``: a degraded cluster fails the ping while sessions still work); nor is it
        logged here (the caller logs it).
        """
        state = self._state()
        probe = bool(self.cooldown) and admit and state.opened_at is not None
        if probe:
            probe = self._admit(state)
        return _Guard(self, state, admit, opens, probe)

    def _exit(self, guard: _Guard, exc: BaseException | None) -> None:
        """What the block's outcome does to the breaker (see :meth:`guard`)."""
        state = guard.state
        if exc is None:
            if guard.admit and state.opened_at is not None:
                self._succeeded(state)
        elif not isinstance(exc, SessionStoreUnavailable):
            if guard.probe:
                self._release(state)
        elif not self.cooldown:
            if guard.opens:
                logger.error("%s", exc)  # off: every failure is logged, as without a breaker
        elif isinstance(exc, SessionStoreNotAnswering):
            self._failed(state, exc, guard.probe, guard.opens)
        else:
            if guard.opens:
                logger.error("%s", exc)
            if guard.admit:
                self._succeeded(state)  # it answered, if only with an error

    def _admit(self, state: _State) -> bool:
        """True: this request probes the store; raises while the others must wait."""
        with state.lock:
            if state.opened_at is None:
                return False  # closed meanwhile
            if state.probing or self.clock() < state.retry_at:
                state.refused += 1
                left = math.ceil(max(0.0, state.retry_at - self.clock()))
                raise SessionStoreUnavailable(
                    "The session store failed moments ago; answered 503 at once "
                    f"(next try within {left} s)."
                )
            state.probing = True
            return True

    def _failed(
        self, state: _State, exc: SessionStoreUnavailable, probe: bool, opens: bool
    ) -> None:
        with state.lock:
            now = self.clock()
            if probe:
                state.probing = False
                state.retry_at = now + self.cooldown
                return
            if state.opened_at is not None or not opens:
                return  # a request already under way when the breaker opened
            state.opened_at = now
            state.retry_at = now + self.cooldown
            state.refused = 0
        logger.error(
            "%s; answering 503 at once for %g s (SESSION_STORE_COOLDOWN), then one request at "
            "a time tries the store until it answers",
            exc,
            self.cooldown,
        )
        if self.on_open is not None:
            self.on_open()

    def _succeeded(self, state: _State) -> None:
        if state.opened_at is None:
            return
        closed = self._close(state)
        if closed is None:
            return  # another request closed it meanwhile
        opened_at, refused = closed
        logger.warning(
            "The session store answers again after %.1f s; %d requests were answered 503 at "
            "once meanwhile",
            self.clock() - opened_at,
            refused,
        )

    @staticmethod
    def _close(state: _State) -> tuple[float, int] | None:
        """Close the breaker; when it opened and how many requests it refused (None: it was
        closed already)."""
        with state.lock:
            opened_at, refused = state.opened_at, state.refused
            state.opened_at = None
            state.probing = False
            state.refused = 0
        return None if opened_at is None else (opened_at, refused)

    def _release(self, state: _State) -> None:
        """The probe ended without a verdict (an error of the session's own, before or after
        the store answered): the next request may probe."""
        with state.lock:
            state.probing = False


class _Guard:
    """One use of :meth:`Breaker.guard` (a plain class: this runs twice per request)."""

    __slots__ = ("admit", "breaker", "opens", "probe", "state")

    def __init__(
        self, breaker: Breaker, state: _State, admit: bool, opens: bool, probe: bool
    ) -> None:
        self.breaker = breaker
        self.state = state
        self.admit = admit
        self.opens = opens
        self.probe = probe

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.breaker._exit(self, exc)
