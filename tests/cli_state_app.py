"""An app that creates keyed state at module level, as a webhook service does, for the CLI
tests: ``flask --app tests.cli_state_app session-store state get conversations ID``. Its store
is configured by the environment (the test's redis-server or Firestore emulator)."""

from __future__ import annotations

from datetime import timedelta

from flask import Flask

from pyloto_corp import SessionStore
from pyloto_corp.state import KeyedState

app = Flask(__name__)
SessionStore(app)

conversations = KeyedState("conversations", lifetime=timedelta(hours=2))
reminders = KeyedState("reminders", lifetime=timedelta(days=30))
