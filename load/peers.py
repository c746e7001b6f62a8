"""What the stock-client runs compare (``python -m load compare``): presence, Hocuspocus
(two servers on one Redis, as it runs replicas) and the reference y-websocket server (one
process: it has no replicas), all driven by the same stock Yjs clients in Node
(``load/node/stock.mjs``). Their npm packages come from ``load/node/package-lock.json``:
the first run installs them (``npm ci``), as does ``scripts/install-test-deps.sh``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from harness.processes import SECRET as LOAD_SECRET
from harness.processes import RedisProcess, Server, die_with_parent, free_port, wait_until_up

NODE = Path(__file__).resolve().parent / "node"
TARGETS = ("presence", "hocuspocus", "ywebsocket")


@cache  # once per run: every server and worker start asks
def node() -> str:
    """Node, with load/node's packages as locked (installed when missing or older than
    the lockfile)."""
    found, npm = shutil.which("node"), shutil.which("npm")
    if found is None or npm is None:
        raise SystemExit(
            "the stock clients need Node.js and npm: scripts/install-test-deps.sh installs them"
        )
    installed = NODE / "node_modules" / ".package-lock.json"
    lock = NODE / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        print("installing load/node's packages from its lockfile (npm ci)", file=sys.stderr)
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE,
            stdout=sys.stderr,  # stdout carries the result
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"npm ci in {NODE} failed (exit {done.returncode})")
    return found


@dataclass
class NodeServer:
    """A peer's server process on a free port."""

    kind: str  # "hocuspocus" or "ywebsocket"
    redis_port: int | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> NodeServer:
        if self.kind == "hocuspocus":
            cmd = [node(), str(NODE / "hocuspocus.mjs"), str(self.port), str(self.redis_port or 0)]
        else:
            cmd = [node(), str(NODE / "node_modules/@y/websocket-server/src/server.js")]
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        # Both answer 200 over plain HTTP on their WebSocket port.
        url = f"http://127.0.0.1:{self.port}/"
        if not wait_until_up(self.proc, url, self.kind, "its output, discarded", timeout, 0.1):
            raise RuntimeError(f"{self.kind} did not listen within {timeout} s")
        return self

    @property
    def base(self) -> str:
        """What the clients are given: the URL they append the room to (y-websocket), or
        connect to and name the document in (Hocuspocus)."""
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class PresenceServer:
    """A presence replica, as the stock clients see it: y-websocket on /yjs."""

    server: Server

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.server.proc

    @property
    def base(self) -> str:
        return f"{self.server.ws}/yjs"

    def stop(self) -> None:
        self.server.stop()


Target = NodeServer | PresenceServer


def start_presence(n: int, extra: list[str]) -> tuple[list[Server], RedisProcess | None]:
    """``n`` presence replicas (and the Redis they share if more than one)."""
    redis = RedisProcess().start() if n > 1 else None
    args = [
        *("--log-level", "warning", "--rate-limit", "100"),
        # Every client of the generator comes from 127.0.0.1.
        *("--max-connections-per-ip", "100000", "--connection-rate-per-ip", "100000"),
        *extra,
    ]
    if redis is not None:
        args += ["--redis-url", redis.url]
    return [Server(args, {"PRESENCE_SECRET": LOAD_SECRET}).start() for _ in range(n)], redis


def start_target(
    target: str, replicas: int, presence_args: list[str]
) -> tuple[list[Target], RedisProcess | None]:
    """``replicas`` servers of ``target`` (one for the y-websocket server), and the Redis
    they share if more than one."""
    if target == "presence":
        servers, redis = start_presence(replicas, presence_args)
        return [PresenceServer(s) for s in servers], redis
    if target == "ywebsocket":
        replicas = 1
    redis = RedisProcess().start() if replicas > 1 else None
    port = redis.port if redis is not None else None
    return [NodeServer(target, port).start() for _ in range(replicas)], redis


def run_stock_workers(
    members: list[dict[str, Any]], plan: dict[str, Any], workers: int
) -> list[subprocess.Popen[bytes]]:
    """Start ``workers`` Node processes, each running its share of ``members``; read
    their results with :func:`results`."""
    procs = []
    for w in range(workers):
        proc = subprocess.Popen(
            [node(), str(NODE / "stock.mjs")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=die_with_parent,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({**plan, "members": members[w::workers]}).encode())
        proc.stdin.close()  # the plan, whole: the worker reads its stdin to the end
        proc.stdin = None  # for results()'s communicate(), which would flush it
        procs.append(proc)
    return procs


def results(procs: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    parts = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"a stock client worker failed (exit {proc.returncode})")
        parts.append(json.loads(out))
    return parts
