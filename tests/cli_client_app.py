"""A Flask-Session app migrating as the README says, for the CLI tests: its own client
(``SESSION_REDIS``) and no REDIS_URL anywhere (``flask --app tests.cli_client_app``)."""

from __future__ import annotations

import os

import redis
from flask import Flask

from pyloto_corp import SessionStore

app = Flask(__name__)
app.config.update(
    SECRET_KEY="cli-client-app-own-secret-of-forty-chars",
    SESSION_TYPE="redis",
    SESSION_REDIS=redis.Redis(port=int(os.environ["CLI_APP_REDIS_PORT"]), socket_timeout=2),
)
SessionStore(app)
