"""Real services for the tests: redis-server and the Firestore emulator on free loopback ports.

A test that needs a service and cannot start it fails (it never skips).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

import redis
import redis.cluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready within {timeout:.0f} s")


class RedisServer:
    """One ``redis-server`` process; ``stop()``/``start()`` simulate an outage on the same port."""

    def __init__(
        self, workdir: Path, *, password: str | None = None, persistent: bool = False
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed; run `make test` (it installs the Debian package)."
            )
        self.binary = binary
        self.workdir = workdir
        self.password = password
        self.persistent = persistent
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        # Persistent: every acknowledged write is fsynced to the append-only file first.
        appendonly = ["--appendonly", "yes", "--appendfsync", "always"]
        args += ["--save", "", "--dir", str(self.workdir)]
        args += appendonly if self.persistent else ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(ready, 10, f"redis-server on port {self.port}")
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class RedisClusterNodes:
    """A Redis Cluster of ``primaries`` redis-server processes (``cluster-enabled yes``, one data
    dir each) joined by ``redis-cli --cluster create``; no replicas unless asked."""

    def __init__(self, workdir: Path, *, primaries: int = 3, replicas: int = 0) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            raise RuntimeError("redis-server/redis-cli are not installed; run `make test`.")
        self.binary, self.cli = binary, cli
        self.workdir = workdir
        self.replicas = replicas
        self.ports = [_free_cluster_port() for _ in range(primaries * (1 + replicas))]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        for port in self.ports:
            node_dir = self.workdir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            args = [self.binary, "--port", str(port), "--bind", "127.0.0.1"]
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "2000", "--dir", str(node_dir)]
            args += ["--save", "", "--appendonly", "no"]
            self.processes.append(
                subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=2)

            def ready(client: redis.Redis = client) -> bool:
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    return False

            wait_until(ready, 10, f"cluster node on port {port}")
            client.close()
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        probe = redis.Redis(port=self.ports[0], socket_timeout=2)

        def cluster_ok() -> bool:
            info = cast(Any, probe).execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            return "cluster_state:ok" in text

        try:
            wait_until(cluster_ok, 20, "Redis Cluster state ok")
        finally:
            probe.close()
        if self.replicas:
            # A replica must be in sync before its primary dies, or none takes over.
            wait_until(self._replicas_linked, 30, "Redis Cluster replicas in sync")

    def _replicas_linked(self) -> bool:
        linked = 0
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=2)
            try:
                info = client.info("replication")
            finally:
                client.close()
            linked += info.get("role") == "slave" and info.get("master_link_status") == "up"
        return linked == len(self.ports) // (1 + self.replicas) * self.replicas

    def primary_for(self, key: str) -> int:
        """The port of the primary that holds ``key`` now."""
        client: Any = self.client()
        try:
            node = client.get_node_from_key(key)
            assert node is not None
            return int(node.port)
        finally:
            client.close()

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port`` (a crash: no goodbye to the cluster)."""
        process = self.processes[self.ports.index(port)]
        process.kill()
        process.wait(timeout=10)

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster.from_url(self.url, socket_timeout=2)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            process.wait(timeout=10)
        self.processes = []


class FirestoreEmulator:
    """The Cloud Firestore emulator from the Google Cloud CLI (``gcloud emulators firestore``).

    The gcloud wrapper starts a Java child: both run in their own process group, stopped together.
    """

    project = "demo-test"

    def __init__(self) -> None:
        binary = shutil.which("gcloud")
        if binary is None:
            raise RuntimeError(
                "gcloud is not installed: the Firestore tests need the Cloud Firestore emulator "
                "(Debian package google-cloud-cli-firestore-emulator, with Java 17+)."
            )
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def start(self) -> None:
        args = [self.binary, "emulators", "firestore", "start", f"--host-port={self.host}"]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_until(self._answers, 60, f"Firestore emulator on {self.host}")
        self._warm_up()

    def _documents_url(self) -> str:
        return (
            f"http://{self.host}/emulator/v1/projects/{self.project}/databases/(default)/documents"
        )

    def _warm_up(self) -> None:
        """Write a few documents through the REST API, then clear them. Answering ``/`` is not
        yet serving fast: the JVM's first writes take seconds on a loaded machine, longer than
        a session store's timeout, so the first request a test or benchmark makes would time out."""
        base = f"http://{self.host}/v1/projects/{self.project}/databases/(default)/documents"
        for number in range(5):
            body = json.dumps({"fields": {"n": {"integerValue": str(number)}}}).encode()
            request = urllib.request.Request(
                f"{base}/warm-up?documentId=d{number}",
                data=body,
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.status == 200
        self.clear()

    def clear(self) -> None:
        """Delete every document (the emulator's own reset endpoint)."""
        request = urllib.request.Request(self._documents_url(), method="DELETE")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
            wait_until(lambda: not self._answers(), 15, "Firestore emulator shutdown")
            self.process = None


ROOT = Path(__file__).resolve().parents[1]


class Gunicorn:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` on a free loopback port; output goes to a file
    (a pipe would fill up under load and block the server). ``app`` names another WSGI app
    (``module:variable``) served with the same configuration, such as a test-only app."""

    def __init__(self, workdir: Path, environ: dict[str, str], *, app: str = "wsgi:app") -> None:
        self.app = app
        self.port = free_port()
        self.log = workdir / f"gunicorn-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("ENV", "SESSION_STORE_BACKEND")}
        env.update(FLASK_SKIP_DOTENV="1", GUNICORN_WORKERS="1", GUNICORN_THREADS="4")
        env.update(environ, PORT=str(self.port))
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Gunicorn:
        command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", self.app]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.output()}")
            try:
                return self.request("GET", "/healthz")[0] == 200
            except OSError:
                return False

        wait_until(up, 30, f"gunicorn on port {self.port}")
        return self

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, timeout: float = 10
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> str:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)
        return self.output()
