"""One process of the multi-process keyed-state tests (another Cloud Run instance): its own
app, its own connection pool, built from the environment.

``python -m tests.state_worker turns N ID``: N turns, each adding 1 to ``counter``.
``python -m tests.state_worker opens N ID PREFIX``: N opens, each setting its own key.
It waits for the file named by STATE_WORKER_GO before starting, so both processes overlap.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

from pyloto_corp.app import create_app
from pyloto_corp.state import KeyedState

conversations = KeyedState("conversations", lifetime=timedelta(hours=2))


def main(mode: str, count: int, sender: str, prefix: str = "") -> None:
    app = create_app()
    go = Path(os.environ["STATE_WORKER_GO"])
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    with app.app_context():
        for n in range(count):
            if mode == "turns":
                with conversations.turn(sender, wait=timedelta(seconds=30)) as state:
                    state["counter"] = state.get("counter", 0) + 1
                    time.sleep(0.002)  # some work while holding the turn
            else:
                with conversations.open(sender) as state:
                    state[f"{prefix}{n}"] = n


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
