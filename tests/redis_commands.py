"""Counting Redis round trips on the real server with ``INFO commandstats``.

Redis counts the commands a script runs as well as the script call itself; a round trip is a
command a client sent. The session scripts use only the commands in :data:`SCRIPT_INTERNAL`,
and the backend never sends those itself, nor do the apps the benchmark compares (they GET and
SET), so what remains is one entry per round trip. Shared by the Redis tests and the benchmark.
"""

from __future__ import annotations

from typing import Any

#: Commands the session scripts run inside Redis (not round trips of their own).
SCRIPT_INTERNAL = frozenset(
    {
        "exists",
        "strlen",
        "getrange",
        "psetex",
        "del",
        "expire",
        "zadd",
        "zremrangebyscore",
        "zcard",
        "zpopmin",
        "pttl",
        "zrange",
    }
)
#: Connection set-up and the measurement itself, not work done for a request.
#: (A cluster client reads the slot map and the command table once, when it is built.)
HANDSHAKE = frozenset(
    {"hello", "client|setinfo", "ping", "info", "config|resetstat", "cluster|slots", "command"}
)


def commands(client: Any, *, ours: bool = True) -> dict[str, int]:
    """Calls per command since the last ``CONFIG RESETSTAT``; with ``ours``, only round trips."""
    stats = client.info("commandstats")
    counts = {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}
    excluded = HANDSHAKE | (SCRIPT_INTERNAL if ours else frozenset())
    return {name: calls for name, calls in counts.items() if name not in excluded}


def round_trips(client: Any, *, ours: bool = True) -> int:
    return sum(commands(client, ours=ours).values())
