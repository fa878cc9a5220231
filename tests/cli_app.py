"""An app configured in code (not by the service's variables), for the CLI tests:
``flask --app tests.cli_app session-store info`` must show this app's store."""

from __future__ import annotations

import os

from flask import Flask

from pyloto_corp import SessionStore

app = Flask(__name__)
app.config.update(
    SECRET_KEY="cli-app-own-secret-key-of-forty-characters",
    SESSION_STORE_BACKEND="redis",
    REDIS_URL=os.environ["CLI_APP_REDIS_URL"],
    SESSION_KEY_PREFIX="cliapp:",
)
SessionStore(app)
