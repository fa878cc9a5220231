"""The app of the key-rotation drill (``tests/test_key_rotation.py``), served by gunicorn as
``tests.rotation_app:app``: configured by the environment alone (``SECRET_KEY``,
``SECRET_KEY_FALLBACKS``, the store), with Flask-Login's remember-me, Flask-WTF's CSRF
protection and a keyed state namespace: everything a rotation touches."""

from __future__ import annotations

from datetime import timedelta

from flask import Flask, request
from flask_login import LoginManager, UserMixin, current_user, login_user
from flask_wtf.csrf import CSRFProtect, generate_csrf

from pyloto_corp.session_store import SessionStore
from pyloto_corp.session_store.lifecycle import rotate_session_id
from pyloto_corp.state import KeyedState

conversations = KeyedState("conversations", lifetime=timedelta(hours=2))


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


app = Flask(__name__)
SessionStore(app)
login_manager = LoginManager(app)
csrf = CSRFProtect(app)


@login_manager.user_loader
def load_user(user_id: str) -> User:
    return User(user_id)


@app.get("/healthz")
def healthz() -> str:
    return "ok"


@app.get("/form")
def form() -> str:
    """A page with a form: its CSRF token."""
    return generate_csrf()


@app.post("/login")
def login() -> dict[str, str]:
    rotate_session_id()
    login_user(User(request.form["user"]), remember=True)
    return {"user": request.form["user"]}


@app.get("/me")
def me() -> dict[str, str]:
    return {"user": current_user.id if current_user.is_authenticated else "anonymous"}


@app.post("/submit")
def submit() -> dict[str, bool]:
    """A form post (CSRF-protected, as every POST here but the webhook)."""
    return {"ok": True}


@app.post("/webhook/<sender>")
@csrf.exempt
def webhook(sender: str) -> dict[str, int]:
    """A message from ``sender``: its conversation's counter goes up by one."""
    with conversations.turn(sender) as state:
        state["messages"] = state.get("messages", 0) + 1
        return {"messages": state["messages"]}


@app.get("/conversation/<sender>")
def conversation(sender: str) -> dict[str, object]:
    return {"state": conversations.get(sender)}
