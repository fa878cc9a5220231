"""One process of the claim() tests (another instance's message worker): its own app, its own
connection pool, built from the environment.

``python -m tests.idempotency_worker COUNT`` claims the message ids ``wamid.0`` ..
``wamid.COUNT-1`` in order, as a task queue hands them out. The work of an id is an INCR of
``work:<id>`` on the test redis-server at ``RUNS_REDIS_URL`` (a client of its own, shared by
both processes: the work's commit), then ``job.complete()``. An id held by the other process
(StateBusy) goes back to the end of the queue after a short sleep, as a task queue retries it.
Two ids fail once, whichever process gets there first (a SET NX decides): ``FAILS_BEFORE`` before
its work committed, ``FAILS_AFTER`` after (then before ``complete()``); they are retried too.
It waits for the file named by IDEMPOTENCY_WORKER_GO before starting, so both processes
overlap, and prints what it did as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from datetime import timedelta
from pathlib import Path

import redis

from pyloto_corp.app import create_app
from pyloto_corp.errors import StateBusy
from pyloto_corp.idempotency import claim

NAMESPACE = "wa-message"
WORK, ATTEMPTS, FAILED = "work:", "attempts:", "failed:"
FAILS_BEFORE, FAILS_AFTER = "wamid.7", "wamid.31"


class WorkFailed(Exception):
    """The work of an id failed (an upstream call, say): the task is retried."""


def message_ids(count: int) -> list[str]:
    return [f"wamid.{n}" for n in range(count)]


def _fail_once(counts: redis.Redis, id: str, where: str) -> None:
    if (id, where) in ((FAILS_BEFORE, "before"), (FAILS_AFTER, "after")) and counts.set(
        FAILED + id, 1, nx=True
    ):
        raise WorkFailed(id)


def main(count: int) -> None:
    app = create_app()
    counts = redis.Redis.from_url(os.environ["RUNS_REDIS_URL"], socket_timeout=5)
    go = Path(os.environ["IDEMPOTENCY_WORKER_GO"])
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    queue = deque(message_ids(count))
    done: list[str] = []
    skipped: list[str] = []
    busy = failed = 0
    with app.app_context():
        while queue:
            id = queue.popleft()
            try:
                with claim(NAMESPACE, id, lease=timedelta(seconds=30)) as job:
                    if job.completed:
                        skipped.append(id)
                        continue
                    counts.incr(ATTEMPTS + id)
                    time.sleep(0.01)  # the work, before it commits
                    _fail_once(counts, id, "before")
                    counts.incr(WORK + id)  # the work commits
                    _fail_once(counts, id, "after")
                    job.complete({"by": os.getpid()})
                    done.append(id)
            except StateBusy:
                busy += 1
                queue.append(id)
                time.sleep(0.005)
            except WorkFailed:
                failed += 1
                queue.append(id)
    print(json.dumps({"done": done, "skipped": skipped, "busy": busy, "failed": failed}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
