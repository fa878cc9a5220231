"""Another caller, as another instance would be: work run in its own thread (its own context,
so no turn or claim of this thread's is seen as its own)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from flask import Flask


def elsewhere(app: Flask, work: Callable[[], object]) -> BaseException | None:
    """Run ``work`` in another thread, in an app context; what it raised, if anything."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            with app.app_context():
                work()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return raised[0] if raised else None
