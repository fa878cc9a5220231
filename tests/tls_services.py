"""TLS for the Redis tests: a throwaway CA with server certificates, and a Redis Cluster that
speaks only TLS (clients and cluster bus), each node on a free loopback port.

A test that needs these and cannot start them fails (it never skips).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis

from tests.services import _free_cluster_port, free_port, wait_until

#: What the certificate of a Memorystore-like server names instead of the address dialled.
MISMATCHED_NAME = "redis.memorystore.invalid"
MISMATCHED_IP = "10.128.0.3"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    #: A CA that signed nothing the servers present (the "wrong CA").
    other_ca: Path
    #: Names IP 127.0.0.1: verifies with hostname checking on.
    cert: Path
    key: Path
    #: Signed by the same CA, but names neither 127.0.0.1 nor localhost (Memorystore's case).
    mismatched_cert: Path
    mismatched_key: Path
    #: Names 127.0.0.1, signed by ``other_ca`` (a "publicly trusted" CA when a test puts
    #: ``other_ca`` in SSL_CERT_FILE, the system trust store's stand-in).
    foreign_cert: Path
    foreign_key: Path


def _authority(name: str) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_certificate(ca_key: Any, ca_cert: Any, common_name: str, names: list[Any]) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_tls_files(directory: Path) -> TlsFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_key, ca_cert = _authority("pyloto test CA")
    other_key, other_ca = _authority("some other CA")
    key, cert = _server_certificate(
        ca_key, ca_cert, "127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    bad_key, bad_cert = _server_certificate(
        ca_key,
        ca_cert,
        MISMATCHED_NAME,
        [x509.DNSName(MISMATCHED_NAME), x509.IPAddress(ipaddress.ip_address(MISMATCHED_IP))],
    )
    foreign_key, foreign_cert = _server_certificate(
        other_key, other_ca, "127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    pem = serialization.Encoding.PEM
    files = TlsFiles(
        ca=directory / "ca.pem",
        other_ca=directory / "other-ca.pem",
        cert=directory / "server.pem",
        key=directory / "server.key",
        mismatched_cert=directory / "mismatched.pem",
        mismatched_key=directory / "mismatched.key",
        foreign_cert=directory / "foreign.pem",
        foreign_key=directory / "foreign.key",
    )
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.other_ca.write_bytes(other_ca.public_bytes(pem))
    certificates = (files.cert, cert), (files.mismatched_cert, bad_cert)
    for path, certificate in (*certificates, (files.foreign_cert, foreign_cert)):
        path.write_bytes(certificate.public_bytes(pem))
    keys = (files.key, key), (files.mismatched_key, bad_key), (files.foreign_key, foreign_key)
    for path, private in keys:
        path.write_bytes(
            private.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return files


class TlsRedisCluster:
    """``primaries`` redis-server processes with TLS only (``--port 0 --tls-port P``), the
    cluster bus over TLS too (``--tls-cluster yes``, bus port = TLS port + 10000), requiring
    ``password``; joined by ``redis-cli --tls --cluster create``. Clients present no
    certificate (``--tls-auth-clients no``); nodes present theirs to each other."""

    def __init__(
        self,
        workdir: Path,
        files: TlsFiles,
        *,
        password: str,
        mismatched: bool = False,
        primaries: int = 3,
    ) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            raise RuntimeError("redis-server/redis-cli are not installed; run `make test`.")
        self.binary, self.cli = binary, cli
        self.workdir = workdir
        self.files = files
        self.password = password
        self.cert = files.mismatched_cert if mismatched else files.cert
        self.key = files.mismatched_key if mismatched else files.key
        self.ports = [_free_cluster_port() for _ in range(primaries)]
        self.processes: list[subprocess.Popen[bytes]] = []

    def url(self, seeds: int = 2) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports[:seeds])
        return f"rediss+cluster://:{self.password}@{hosts}"

    def node_client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client of one node, over TLS, for admin and counting."""
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            password=self.password,
            ssl=True,
            ssl_ca_certs=str(self.files.ca),
            ssl_check_hostname=False,
            socket_timeout=2,
        )

    def start(self) -> TlsRedisCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        for port in self.ports:
            node_dir = self.workdir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            args = [self.binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
            args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
            args += ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)]
            args += ["--tls-ca-cert-file", str(self.files.ca), "--tls-auth-clients", "no"]
            args += ["--requirepass", self.password, "--masterauth", self.password]
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "2000", "--dir", str(node_dir)]
            args += ["--save", "", "--appendonly", "no"]
            log = (node_dir / "redis.log").open("wb")
            self.processes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        for port, process in zip(self.ports, self.processes, strict=True):
            client = self.node_client(port)

            def ready(
                client: redis.Redis = client,
                process: subprocess.Popen[bytes] = process,
                port: int = port,
            ) -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"redis-server with TLS exited: {self._log(port)}")
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    return False

            try:
                wait_until(ready, 10, f"TLS cluster node on port {port}")
            finally:
                client.close()
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        command = [self.cli, "--tls", "--cacert", str(self.files.ca), "--cluster", "create"]
        command += [*nodes, "--cluster-replicas", "0", "--cluster-yes"]
        # REDISCLI_AUTH, not -a: the password stays off the command line.
        env = {**os.environ, "REDISCLI_AUTH": self.password}
        created = subprocess.run(
            command, capture_output=True, text=True, timeout=60, env=env, check=False
        )
        if created.returncode != 0 or "[OK] All 16384 slots covered" not in created.stdout:
            raise RuntimeError(
                f"redis-cli --cluster create failed: {created.stdout}\n{created.stderr}"
            )
        probes = [self.node_client(port) for port in self.ports]

        def cluster_ok() -> bool:
            for probe in probes:
                info = cast(Any, probe).execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
            return True

        try:
            wait_until(cluster_ok, 20, "TLS Redis Cluster state ok")
        finally:
            for probe in probes:
                probe.close()

    def _log(self, port: int) -> str:
        path = self.workdir / str(port) / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            process.wait(timeout=10)
        self.processes = []


class TlsRedisServer:
    """One redis-server speaking only TLS (``--port 0 --tls-port P``), requiring ``password``,
    presenting ``cert`` (signed by ``ca``). Clients present no certificate."""

    def __init__(self, workdir: Path, *, cert: Path, key: Path, ca: Path, password: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; run `make test`.")
        self.binary = binary
        self.workdir = workdir
        self.cert, self.key, self.ca = cert, key, ca
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/0"

    def admin(self) -> redis.Redis:
        """A client trusting the server's own CA, for admin and counting."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            ssl=True,
            ssl_ca_certs=str(self.ca),
            ssl_check_hostname=False,
            socket_timeout=2,
        )

    def start(self) -> TlsRedisServer:
        args = [self.binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)]
        args += ["--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"]
        args += ["--requirepass", self.password, "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir)]
        log = (self.workdir / "redis.log").open("wb")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = self.admin()

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server with TLS exited: {self._log()}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_until(ready, 10, f"redis-server with TLS on port {self.port}")
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()
        return self

    def _log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


class TlsSentinel:
    """One ``redis-sentinel`` speaking only TLS, monitoring ``primary`` (a TlsRedisServer) as
    service ``service`` over TLS (``tls-replication yes``), quorum 1. It presents ``cert``
    (signed by ``ca``); ``trusted`` is the CA bundle it verifies the primary with."""

    def __init__(
        self,
        workdir: Path,
        primary: TlsRedisServer,
        *,
        cert: Path,
        key: Path,
        ca: Path,
        trusted: Path,
        service: str = "tlsmaster",
    ) -> None:
        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise RuntimeError("redis-sentinel is not installed; run `make test`.")
        self.binary = binary
        self.workdir = workdir
        self.primary = primary
        self.cert, self.key, self.ca, self.trusted = cert, key, ca, trusted
        self.service = service
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self) -> str:
        password = self.primary.password
        return f"rediss+sentinel://:{password}@127.0.0.1:{self.port}/{self.service}"

    def start(self) -> TlsSentinel:
        config = self.workdir / f"sentinel-{self.port}.conf"
        config.write_text(
            f"port 0\ntls-port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"logfile {self.workdir / 'sentinel.log'}\n"
            f"tls-cert-file {self.cert}\ntls-key-file {self.key}\n"
            f"tls-ca-cert-file {self.trusted}\ntls-auth-clients no\ntls-replication yes\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel auth-pass {self.service} {self.primary.password}\n"
        )
        self.process = subprocess.Popen(
            [self.binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        probe = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            ssl=True,
            ssl_ca_certs=str(self.ca),
            ssl_check_hostname=False,
            socket_timeout=2,
        )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                log = self.workdir / "sentinel.log"
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-sentinel with TLS exited: {text}")
            try:
                state = cast(Any, probe).sentinel_master(self.service)
            except redis.RedisError:
                return False
            return bool(
                state.get("port") == self.primary.port
                and state.get("is_master")
                and not state.get("is_sdown")
            )

        try:
            wait_until(ready, 20, f"TLS sentinel on port {self.port} seeing its primary")
        except BaseException:
            self.stop()
            raise
        finally:
            probe.close()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None
