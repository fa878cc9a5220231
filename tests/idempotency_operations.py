"""What idempotency costs, measured on the real services: Redis round trips and Firestore
document operations per step of claim() and of an @idempotent view.

Shared by tests/test_idempotency_costs.py (which pins the numbers) and the benchmark (which
prints them). The benchmark runs the Firestore count as ``python -m tests.idempotency_operations
firestore``, with the app's configuration in the environment.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from flask import Flask

from pyloto_corp.errors import StateBusy
from pyloto_corp.idempotency import claim, idempotent
from tests.redis_commands import commands

#: The namespace of the claims measured, and a message id's shape.
NAMESPACE = "wa-message"
#: The steps measured, in order (each finds what the previous ones left).
STEPS = (
    "claim",
    "complete",
    "replay",
    "claim, held elsewhere",
    "claim, left without complete",
    "view, first request",
    "view, replay",
)

#: Reads the operations sent since it was last called (and starts counting again).
Take = Callable[[], dict[str, int]]


def _view_app(app: Flask) -> Flask:
    """``app`` with an @idempotent view at /orders (once per app)."""
    if "idempotent_orders" not in app.view_functions:

        @app.post("/orders", endpoint="idempotent_orders")
        @idempotent()
        def orders() -> dict[str, bool]:
            return {"ok": True}

    return app


def _steps(app: Flask, take: Take) -> dict[str, dict[str, int]]:
    """Each step once, on fresh ids and keys; what each sent. The request of a view step
    carries no session cookie: what it sends is the idempotency record's alone."""
    id, other, key = (f"wamid.{secrets.token_hex(8)}" for _ in range(3))
    counts: dict[str, dict[str, int]] = {}
    client = _view_app(app).test_client()
    with app.app_context():
        take()
        with claim(NAMESPACE, id) as job:
            counts["claim"] = take()
            job.complete({"answered": "oi"})
        counts["complete"] = take()
        with claim(NAMESPACE, id) as job:
            assert job.completed
        counts["replay"] = take()
        with claim(NAMESPACE, other):
            take()
            try:
                with claim(NAMESPACE, other):
                    raise AssertionError("a claim held by this block was taken again")
            except StateBusy:
                counts["claim, held elsewhere"] = take()
        take()  # the release of the block above
        with claim(NAMESPACE, other) as job:
            assert not job.completed
        counts["claim, left without complete"] = take()
    headers = {"Idempotency-Key": key}
    for label in ("view, first request", "view, replay"):
        response = client.post("/orders", json={"item": 1}, headers=headers)
        assert response.status_code == 200, response.status_code
        counts[label] = take()
    return counts


def redis_round_trips(app: Flask, nodes: Sequence[Any]) -> dict[str, dict[str, int]]:
    """Commands sent per step, summed over ``nodes`` (the server, or a cluster's primaries),
    as tests/redis_commands.py counts them. The steps run once first, so the server knows the
    scripts (a NOSCRIPT answer costs a SCRIPT LOAD once)."""

    def take() -> dict[str, int]:
        total: Counter[str] = Counter()
        for node in nodes:
            total.update(commands(node))
            node.config_resetstat()
        return dict(total)

    _steps(app, take)
    return _steps(app, take)


def firestore_operations(app: Flask) -> dict[str, dict[str, int]]:
    """Document operations per step (``get`` a read; ``create``, ``set``, ``update``,
    ``delete`` writes)."""
    from tests.firestore_operations import counting_document_operations

    with counting_document_operations() as operations:

        def take() -> dict[str, int]:
            sent = dict(operations)
            operations.clear()
            return sent

        return _steps(app, take)


def total(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """Round trips (or document operations) per step."""
    return {label: sum(sent.values()) for label, sent in counts.items()}


def main(argv: list[str]) -> None:
    from pyloto_corp import create_app

    match argv:
        case ["firestore"]:
            result = firestore_operations(create_app())
        case _:
            raise SystemExit(__doc__)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
