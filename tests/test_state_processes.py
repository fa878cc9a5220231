"""Two processes (two Cloud Run instances: separate pools, separate clocks of the same host)
writing one conversation at once: no turn and no key is lost."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flask import Flask

from pyloto_corp.state import KeyedState
from tests.conftest import MakeApp
from tests.services import ROOT

SENDER = "5511987654321"
conversations = KeyedState("conversations")


@pytest.fixture(params=["redis", "redis_cluster", "firestore"])
def environ(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "firestore":
        return dict(request.getfixturevalue("firestore_env"))
    if request.param == "redis":
        return dict(request.getfixturevalue("redis_env"))
    nodes = request.getfixturevalue("redis_cluster")
    client = nodes.client()
    for node in client.get_primaries():
        client.flushall(target_nodes=node)
    client.close()
    seeds = ",".join(f"127.0.0.1:{port}" for port in nodes.ports[:2])
    redis_env = request.getfixturevalue("redis_env")
    return {**redis_env, "REDIS_URL": f"redis+cluster://{seeds}"}


def _run_two(environ: dict[str, str], tmp_path: Path, *args: str) -> None:
    go = tmp_path / "go"
    env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "FIRESTORE_EMULATOR_HOST")},
        **environ,
        "PYTHONPATH": str(ROOT),
        "STATE_WORKER_GO": str(go),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.state_worker", *args, f"p{n}-"],
            env=env,
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    time.sleep(2)  # both built their app and wait
    go.touch()
    for worker in workers:
        _, errors = worker.communicate(timeout=120)
        assert worker.returncode == 0, errors


def test_two_processes_taking_turns_lose_no_increment(
    environ: dict[str, str], tmp_path: Path, make_app: MakeApp
) -> None:
    _run_two(environ, tmp_path, "turns", "20", SENDER)
    app: Flask = make_app(**environ)
    with app.app_context():
        assert conversations.get(SENDER) == {"counter": 40}


def test_two_processes_opening_one_entry_lose_no_key(
    environ: dict[str, str], tmp_path: Path, make_app: MakeApp
) -> None:
    _run_two(environ, tmp_path, "opens", "100", SENDER)
    app: Flask = make_app(**environ)
    with app.app_context():
        stored = conversations.get(SENDER)
    assert stored is not None
    expected = {f"p{p}-{n}": n for p in range(2) for n in range(100)}
    assert len(stored) == 200
    assert stored == expected
