"""What KeyedState costs, measured on the real services: Redis round trips and Firestore
document operations per operation, and turns per second on one id from two processes.

Shared by tests/test_state_costs.py (which pins the numbers) and the benchmark (which prints
them). The benchmark runs the Firestore count and the turn-taking processes as
``python -m tests.state_operations firestore``, ``... turns ID SECONDS`` and ``... get ID``,
with the app's configuration in the environment.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from flask import Flask

from pyloto_corp.errors import StateBusy
from pyloto_corp.state import KeyedState
from tests.redis_commands import commands

#: The namespace measured (any other costs the same).
costs = KeyedState("costs")
#: The id measured: a phone number, as a bot's sender id is.
ID = "5511987654321"
#: The counter each turn increments.
COUNTER = "n"


def _new_entry() -> None:
    with costs.open(ID) as state:
        state["step"] = "ask_cpf"
        state["lang"] = "pt"


def _change_key() -> None:
    with costs.open(ID) as state:
        state["step"] = "ask_name"


def _delete_key() -> None:
    with costs.open(ID) as state:
        del state["lang"]


def _open_unchanged() -> None:
    with costs.open(ID) as state:
        state.get(COUNTER)


def _turn(change: bool) -> Callable[[], None]:
    def block() -> None:
        with costs.turn(ID) as state:
            if change:
                state[COUNTER] = state.get(COUNTER, 0) + 1

    return block


def _operations() -> list[tuple[str, Callable[[], object]]]:
    """Each operation measured, in order, on one id (each finds what the previous ones left)."""
    return [
        ("open, new entry", _new_entry),
        ("open, a key changed", _change_key),
        ("open, a key deleted", _delete_key),
        ("open, nothing changed", _open_unchanged),
        ("get", lambda: costs.get(ID)),
        ("exists", lambda: costs.exists(ID)),
        ("turn, a key changed", _turn(True)),
        ("turn, nothing changed", _turn(False)),
        ("delete", lambda: costs.delete(ID)),
    ]


def redis_round_trips(app: Flask, nodes: Sequence[Any]) -> dict[str, dict[str, int]]:
    """Commands sent per operation, summed over ``nodes`` (the server, or a cluster's
    primaries), as tests/redis_commands.py counts them: the commands KeyedState's scripts run
    inside Redis (EXISTS, GETRANGE, PSETEX, DEL) are not round trips. Every operation runs once
    first, so the server knows the scripts (a NOSCRIPT answer costs a SCRIPT LOAD once)."""
    with app.app_context():
        for _, operation in _operations():
            operation()
        counts: dict[str, dict[str, int]] = {}
        for label, operation in _operations():
            for node in nodes:
                node.config_resetstat()
            operation()
            total: Counter[str] = Counter()
            for node in nodes:
                total.update(commands(node))
            counts[label] = dict(total)
    return counts


def firestore_operations(app: Flask) -> dict[str, dict[str, int]]:
    """Document operations per operation (``get`` a read; ``create``, ``set``, ``update``,
    ``delete`` writes), on entries fresh enough that a load does not slide their expiry."""
    from tests.firestore_operations import counting_document_operations

    counts: dict[str, dict[str, int]] = {}
    with app.app_context(), counting_document_operations() as operations:
        for label, operation in _operations():
            operations.clear()
            operation()
            counts[label] = dict(operations)
    return counts


def total(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """Round trips per operation."""
    return {label: sum(sent.values()) for label, sent in counts.items()}


def take_turns(app: Flask, id: str, seconds: float) -> dict[str, int]:
    """turn()s incrementing the counter of ``id`` for ``seconds`` after a "go" line on stdin
    (announced by "ready" on stdout, once connected); how many were done and how many found
    the turn busy past their wait."""
    done = busy = 0
    with app.app_context():
        costs.exists(id)  # connected, as a running worker is
        print("ready", flush=True)
        sys.stdin.readline()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with costs.turn(id) as state:
                    state[COUNTER] = state.get(COUNTER, 0) + 1
            except StateBusy:
                busy += 1
                continue
            done += 1
    return {"turns": done, "busy": busy}


def main(argv: list[str]) -> None:
    from pyloto_corp import create_app

    app = create_app()
    match argv:
        case ["firestore"]:
            result: object = firestore_operations(app)
        case ["turns", id, seconds]:
            result = take_turns(app, id, float(seconds))
        case ["get", id]:
            with app.app_context():
                result = costs.get(id)
        case _:
            raise SystemExit(__doc__)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
