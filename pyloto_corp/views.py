"""A minimal route set that proves sessions work end to end, plus liveness."""

from __future__ import annotations

import logging

from flask import Blueprint, abort, request, session

from .errors import SessionStoreUnavailable
from .session_store import SessionStore, end_session, rotate_session_id

bp = Blueprint("pyloto_corp", __name__)
#: What /readyz may tell anyone who asks: shape, not whereabouts.
PUBLIC_FACTS = frozenset(
    {
        "topology",
        "primaries",
        "primaries_answering",
        "slots_covered",
        "maxmemory_policy",
        "maxmemory_policy_warning",
    }
)
logger = logging.getLogger("pyloto_corp.session_store")


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers; it does not touch the session store."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> tuple[dict[str, object], int]:
    """Readiness: the session store answers a ping. The public body names the backend and its
    topology (a cluster's primaries and slots), never an address; the reason of a failure
    (host, error) goes to the log.

    While requests are answered 503 at once after a store failure (the breaker is open), so is
    this, with that reason; once the cool-down is over the ping is the probe that closes it, so
    an instance taken out of rotation by this check can come back without traffic. A failed
    ping alone does not open it (a degraded cluster still serves most sessions)."""
    state = SessionStore.state()
    backend = state.settings.session_store_backend
    breaker = state.interface.breaker
    try:
        with breaker.guard(opens=False):
            facts = state.interface.records.ping()
    except SessionStoreUnavailable as exc:
        reason = breaker.reason()
        if reason is not None:
            return {"status": "unavailable", "session_store": backend, "reason": reason}, 503
        logger.error("Readiness check failed: %s", exc)
        return {"status": "unavailable", "session_store": backend}, 503
    public = {key: value for key, value in facts.items() if key in PUBLIC_FACTS}
    return {"status": "ready", "session_store": backend, **public}, 200


@bp.get("/session/counter")
def read_counter() -> dict[str, int]:
    return {"counter": int(session.get("counter", 0))}


@bp.post("/session/counter")
def increment_counter() -> dict[str, int]:
    session["counter"] = int(session.get("counter", 0)) + 1
    return {"counter": session["counter"]}


@bp.post("/session/login")
def login() -> dict[str, str]:
    """A stand-in login: rotates the session id, then records the user."""
    payload = request.get_json(silent=True)
    user = payload.get("user") if isinstance(payload, dict) else None
    if not isinstance(user, str) or not 0 < len(user) <= 100:
        abort(400, description='Send JSON {"user": "<name>"} (1 to 100 characters).')
    rotate_session_id()
    session["user"] = user
    return {"user": user}


@bp.delete("/session")
def clear_session() -> dict[str, bool]:
    """Logout: the stored session is deleted and the cookie removed."""
    end_session()
    return {"cleared": True}
