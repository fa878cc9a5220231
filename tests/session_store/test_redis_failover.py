"""A Redis Cluster primary dies under load, through real gunicorn: 503s only while the cluster
fails over, never a 500, and the service recovers by itself."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from pyloto_corp.session_store.base import hashed_store_id
from tests.conftest import SECRET
from tests.services import Gunicorn, RedisClusterNodes

CLIENTS = 8
TIMEOUT = 1.0
NODE_TIMEOUT = 2.0  # cluster-node-timeout of RedisClusterNodes


def test_a_killed_primary_costs_503s_until_a_replica_takes_over(tmp_path: Path) -> None:
    cluster = RedisClusterNodes(tmp_path / "cluster", primaries=3, replicas=1)
    cluster.start()
    seeds = ",".join(f"127.0.0.1:{port}" for port in cluster.ports[:3])
    server = Gunicorn(
        tmp_path,
        {
            "ENV": "production",
            "SESSION_STORE_BACKEND": "redis",
            "REDIS_URL": f"redis+cluster://{seeds}",
            "REDIS_SOCKET_TIMEOUT": str(TIMEOUT),
            "REDIS_CONNECT_TIMEOUT": str(TIMEOUT),
            "SECRET_KEY": SECRET,
            "GUNICORN_WORKERS": "2",
            "GUNICORN_THREADS": "4",
        },
    )
    try:
        server.start()
        cookies = []
        for _ in range(CLIENTS):
            status, headers, _ = server.request("POST", "/session/counter")
            assert status == 200
            cookies.append(headers["Set-Cookie"].split(";", 1)[0])
        homes = [
            cluster.primary_for(hashed_store_id("session:", c.split("=", 1)[1])) for c in cookies
        ]
        victim = homes[0]
        on_victim = [home == victim for home in homes]
        samples: list[tuple[int, float, float, int]] = []  # client, started, latency, status
        lock = threading.Lock()
        stop = time.monotonic() + 20

        def client(index: int) -> None:
            headers = {"Cookie": cookies[index], "Accept": "application/json"}
            for n in range(2000):
                if time.monotonic() > stop:
                    return
                started = time.monotonic()
                try:
                    method = "POST" if n % 2 else "GET"
                    status = server.request(method, "/session/counter", headers, timeout=10)[0]
                except OSError:
                    status = -1
                with lock:
                    samples.append((index, started, time.monotonic() - started, status))
                time.sleep(0.01)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        killed_at = time.monotonic()
        cluster.kill(victim)
        for thread in threads:
            thread.join(40)
        log = server.stop()
    finally:
        server.stop()
        cluster.stop()

    statuses = [status for _, _, _, status in samples]
    unavailable = [s for s in samples if s[3] == 503]
    after = [s for s in samples if s[1] > killed_at]
    last_503 = max((s[1] + s[2] for s in unavailable), default=killed_at)
    recovered = [s for s in after if s[3] == 200 and s[1] > last_503]
    summary = {
        "requests": len(samples),
        "ok_200": statuses.count(200),
        "unavailable_503": len(unavailable),
        "errors_500": statuses.count(500),
        "other": len([s for s in statuses if s not in (200, 503)]),
        "recovery_s": round(last_503 - killed_at, 2),
        "max_latency_s": round(max(s[2] for s in samples), 2),
        "503s_on_other_shards": len([s for s in unavailable if not on_victim[s[0]]]),
    }
    print("FAILOVER cluster:", json.dumps(summary))
    assert summary["errors_500"] == 0, log
    assert summary["other"] == 0
    assert all(s[1] >= killed_at - TIMEOUT for s in unavailable)  # 503s only once it died
    assert summary["recovery_s"] <= NODE_TIMEOUT + 5
    assert recovered, "no 200 after the last 503: the service did not recover by itself"
    assert summary["max_latency_s"] <= 2 * TIMEOUT + 1
    assert "Traceback" not in log


def test_a_hung_cluster_primary_costs_one_socket_timeout(tmp_path: Path) -> None:
    """A primary that accepts connections but answers nothing (SIGSTOP): the cluster client does
    not retry a timeout, so the request's 503 comes after one REDIS_SOCKET_TIMEOUT."""
    import os
    import signal

    from flask import Flask

    from pyloto_corp.session_store import SessionStore

    cluster = RedisClusterNodes(tmp_path / "cluster", primaries=3)
    cluster.start()
    try:
        app = Flask(__name__)
        app.config.update(
            ENV="production",
            SECRET_KEY=SECRET,
            SESSION_STORE_BACKEND="redis",
            REDIS_URL="redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster.ports),
            REDIS_SOCKET_TIMEOUT=TIMEOUT,
        )
        SessionStore(app)

        @app.post("/count")
        def count() -> dict[str, int]:
            from flask import session

            session["n"] = int(session.get("n", 0)) + 1
            return {"n": session["n"]}

        client = app.test_client(use_cookies=True)
        response = client.post("/count", base_url="https://localhost")
        assert response.status_code == 200
        sid = response.headers["Set-Cookie"].split(";", 1)[0].split("=", 1)[1]
        victim = cluster.primary_for(hashed_store_id("session:", sid))
        process = cluster.processes[cluster.ports.index(victim)]
        os.kill(process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            hung = client.post(
                "/count", base_url="https://localhost", headers={"Accept": "application/json"}
            )
            elapsed = time.monotonic() - started
        finally:
            os.kill(process.pid, signal.SIGCONT)
        print("HUNG cluster primary:", json.dumps({"status": hung.status_code, "s": elapsed}))
        assert hung.status_code == 503
        assert TIMEOUT * 0.9 <= elapsed <= TIMEOUT + 0.5
    finally:
        cluster.stop()
