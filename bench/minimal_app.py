"""The cold-start baseline: a minimal Flask + Flask-Session app on Redis, built at import."""

from __future__ import annotations

import os

import redis
from flask import Flask
from flask_session import Session

app = Flask(__name__)
app.config.update(
    SECRET_KEY=os.environ["SECRET_KEY"],
    SESSION_TYPE="redis",
    SESSION_REDIS=redis.Redis.from_url(os.environ["REDIS_URL"]),
)
Session(app)
