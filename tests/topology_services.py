"""Real Redis topologies beyond one redis-server, on free loopback ports: a Sentinel group (one
primary, one replica, three sentinels) and a valkey-server.

Like tests/services.py, a test that needs one of these and cannot start it fails (it never skips).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, cast

import redis

from tests.services import free_port, wait_until

#: The service name the sentinels monitor, and their failover settings.
SERVICE = "sessions"
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def _binary(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        raise RuntimeError(f"{name} is not installed; run `make services` (it installs it).")
    return binary


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    return client.info(section)


class RedisSentinelGroup:
    """One primary and one replica (``--replicaof``) redis-server, and three ``redis-sentinel``
    processes monitoring them as service ``sessions`` (quorum 2, down after 1 s, failover
    timeout 3 s). Each sentinel has its own config file in ``workdir``: sentinel rewrites it."""

    def __init__(self, workdir: Path) -> None:
        self.server_binary = _binary("redis-server")
        self.sentinel_binary = _binary("redis-sentinel")
        self.workdir = workdir
        self.primary_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.servers: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def _log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def _start_server(self, port: int, *extra: str) -> None:
        node_dir = self.workdir / f"redis-{port}"
        node_dir.mkdir(parents=True, exist_ok=True)
        args = [self.server_binary, "--port", str(port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(node_dir)]
        # No 5 s wait for more replicas before a full sync (the default diskless-sync delay).
        args += ["--repl-diskless-sync-delay", "0"]
        args += ["--logfile", str(self._log(f"redis-{port}")), *extra]
        self.servers[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _sentinel_config(self, port: int) -> Path:
        path = self.workdir / f"sentinel-{port}.conf"
        path.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.workdir}\n"
            f"logfile {self._log(f'sentinel-{port}')}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} {QUORUM}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        return path

    def start(self) -> None:
        """Start every process; return once each sentinel names the primary, knows the replica
        and the two other sentinels, and the replica's link to the primary is up."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_server(self.primary_port)
        self._start_server(self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
        for port in (self.primary_port, self.replica_port):
            with contextlib.closing(redis.Redis(port=port, socket_timeout=2)) as client:
                wait_until(lambda c=client: _answers(c), 10, f"redis-server on port {port}")
        with contextlib.closing(redis.Redis(port=self.replica_port, socket_timeout=2)) as replica:
            wait_until(
                lambda: _info(replica, "replication").get("master_link_status") == "up",
                15,
                f"replica on port {self.replica_port} linked to its primary",
            )
        for port in self.sentinel_ports:
            config = self._sentinel_config(port)
            self.sentinels.append(
                subprocess.Popen(
                    [self.sentinel_binary, str(config)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.sentinel_ports:
            with contextlib.closing(redis.Redis(port=port, socket_timeout=2)) as sentinel:
                wait_until(
                    lambda s=sentinel: self._sentinel_ready(s),
                    20,
                    f"sentinel on port {port} agreeing on the primary",
                )

    def _sentinel_ready(self, sentinel: redis.Redis) -> bool:
        try:
            state = cast(Any, sentinel).sentinel_master(SERVICE)
        except redis.RedisError:
            return False
        return bool(
            state.get("port") == self.primary_port
            and state.get("is_master")
            and not state.get("is_odown")
            and not state.get("is_sdown")
            and state.get("num-slaves") == 1
            and state.get("num-other-sentinels") == 2
        )

    def primary_address(self) -> tuple[str, int]:
        """The primary as the sentinels name it now (the first sentinel that answers)."""
        for port in self.sentinel_ports:
            with contextlib.closing(redis.Redis(port=port, socket_timeout=1)) as sentinel:
                try:
                    address = cast(Any, sentinel).sentinel_get_master_addr_by_name(SERVICE)
                except redis.RedisError:
                    continue
                if address:
                    host, port_text = address
                    return _text(host), int(port_text)
        raise RuntimeError(f"no sentinel of {self.url} names a primary for {SERVICE}")

    def kill_primary(self) -> int:
        """SIGKILL the current primary (no shutdown, no last replication); return its port."""
        _, port = self.primary_address()
        process = self.servers.pop(port)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        return port

    def logs(self) -> str:
        """Every process's log file, for a failure message."""
        return "\n".join(
            f"== {path.name}\n{path.read_text(errors='replace')}"
            for path in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        for process in self.sentinels:
            _stop(process)
        for process in self.servers.values():
            _stop(process)
        self.sentinels, self.servers = [], {}


class ValkeyServer:
    """One ``valkey-server`` process, as :class:`tests.services.RedisServer` runs redis-server;
    driven with redis-py (the protocol is the same)."""

    def __init__(self, workdir: Path) -> None:
        self.binary = _binary("valkey-server")
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def version(self) -> str:
        with contextlib.closing(self.client()) as client:
            return str(_info(client, "server").get("valkey_version", ""))

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with contextlib.closing(self.client()) as client:
            wait_until(lambda: _answers(client), 10, f"valkey-server on port {self.port}")

    def stop(self) -> None:
        _stop(self.process)
        self.process = None
