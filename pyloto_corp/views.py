"""A minimal route set that proves sessions work end to end, plus liveness."""

from __future__ import annotations

from flask import Blueprint, session

bp = Blueprint("pyloto_corp", __name__)


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers; it does not touch the session store."""
    return {"status": "ok"}


@bp.get("/session/counter")
def read_counter() -> dict[str, int]:
    return {"counter": int(session.get("counter", 0))}


@bp.post("/session/counter")
def increment_counter() -> dict[str, int]:
    session["counter"] = int(session.get("counter", 0)) + 1
    return {"counter": session["counter"]}


@bp.delete("/session")
def clear_session() -> dict[str, bool]:
    """Logout: the stored session is deleted and the cookie removed."""
    session.clear()
    return {"cleared": True}
