"""An app with @idempotent views, served by real gunicorn in tests/test_idempotency_processes.py
(``tests.idempotent_app:create()``), on whatever store the environment configures.

Every run of a view is counted with INCR on the test redis-server at ``RUNS_REDIS_URL`` (a
client of its own, not the app's store, which may be Firestore): the count is shared by every
worker process, so "the view ran once" is checked across processes, not per worker.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from typing import Any

import redis
from flask import Flask, request

from pyloto_corp import create_app
from pyloto_corp.idempotency import idempotent

#: The counter of each view's runs: ``runs:<view>``.
RUNS = "runs:"
#: The lease of /dies: short, so the test waits little for a dead worker's claim to run out.
SHORT_LEASE = timedelta(seconds=2)


def create() -> Flask:
    app = create_app()  # it serves /healthz already
    # Connects on first use, in the worker (redis-py's pool starts over in a forked child).
    runs = redis.Redis.from_url(os.environ["RUNS_REDIS_URL"], socket_timeout=5)

    @app.post("/orders")
    @idempotent()
    def orders() -> tuple[dict[str, Any], int]:
        run = runs.incr(RUNS + "orders")
        time.sleep(0.3)  # the work: long enough for every concurrent repeat to find it running
        return {"order": run, "pid": os.getpid(), "got": request.get_json()}, 201

    @app.post("/fails")
    @idempotent()
    def fails() -> dict[str, int]:
        run = runs.incr(RUNS + "fails")
        if run == 1:
            raise RuntimeError("the first run fails (a 500; the key is released)")
        return {"run": run}

    @app.post("/dies")
    @idempotent(lease=SHORT_LEASE)
    def dies() -> dict[str, int]:
        run = runs.incr(RUNS + "dies")
        if run == 1:
            # The instance dies mid-request: no exception handler, no release, no response.
            os.kill(os.getpid(), signal.SIGKILL)
        return {"run": run}

    return app
