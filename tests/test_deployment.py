"""docker-compose.yml, the Dockerfile and nginx.conf agree with the code; and the same
topology (Redis, three replicas, a load balancer) runs here as local processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.processes import RedisProcess, free_port
from presence.cli import build_parser
from presence.config import Settings
from presence.server.app import create_app
from tests.conftest import Client, Server

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def replica_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items() if name.startswith("presence")}


def substitute(value: object) -> str:
    """Compose's ${VAR:?message} / ${VAR:-default} with a stand-in value (long enough for
    a secret: what .env gets from `openssl rand -hex 32`)."""
    return re.sub(r"\$\{[A-Z_]+(:[?-][^}]*)?\}", "stand-in-" + "0" * 55, str(value))


@pytest.mark.unit
def test_compose_sets_only_settings_the_service_accepts() -> None:
    known = {var for _, var, *_ in Settings.options()}
    services = replica_services()
    assert len(services) == 3
    for name, service in services.items():
        env = {k: substitute(v) for k, v in service["environment"].items()}
        unknown = set(env) - known
        assert not unknown, f"{name} sets variables the service ignores: {unknown}"
        settings = Settings.load(env=env)  # raises on any bad value
        assert settings.redis_url.startswith("redis://redis:")
        assert settings.host == "0.0.0.0"
        if "command" in service:
            build_parser().parse_args(service["command"])


@pytest.mark.unit
def test_nginx_balances_over_every_replica_with_websocket_upgrade() -> None:
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    upstream = set(re.findall(r"server (presence-\d+):(\d+);", nginx))
    expected = {
        (name, substitute(svc["environment"]["PRESENCE_PORT"]))
        for name, svc in replica_services().items()
    }
    assert upstream == expected
    assert "proxy_set_header Upgrade $http_upgrade;" in nginx
    assert "proxy_http_version 1.1;" in nginx
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in compose()["services"]["lb"]["volumes"]


@pytest.mark.unit
def test_dockerfile_runs_as_non_root_with_a_real_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert "FROM python:3.11-slim" in dockerfile
    port = re.search(r"^EXPOSE (\d+)", dockerfile, re.M)
    assert port and f"PRESENCE_PORT={port.group(1)}" in dockerfile
    paths = {getattr(r, "path", None) for r in create_app(Settings()).routes}
    checked = re.search(r"127\.0\.0\.1:[^/]+(/\w+)", dockerfile)
    assert checked and checked.group(1) in paths
    assert 'CMD ["presence", "serve"]' in dockerfile


def healthcheck() -> list[str]:
    """The Dockerfile's HEALTHCHECK command, as the container would run it here."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    found = re.search(r"^HEALTHCHECK .*\\\n\s*CMD (\[.*\])$", dockerfile, re.M)
    assert found, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    return [sys.executable if arg == "python" else arg for arg in json.loads(found.group(1))]


@pytest.mark.e2e
def test_healthcheck_follows_presence_port(server_factory: Callable[..., Server]) -> None:
    def healthy(port: int) -> bool:
        """The check's verdict in a container whose PRESENCE_PORT is ``port``."""
        env = {**os.environ, "PRESENCE_PORT": str(port)}
        result = subprocess.run(healthcheck(), env=env, capture_output=True, timeout=10)
        return result.returncode == 0

    server = server_factory()
    assert server.port != 8000
    assert healthy(server.port)
    assert not healthy(free_port())  # nothing listens there
    unready = server_factory("--redis-url", "redis://127.0.0.1:1/0", ready=False)
    assert not healthy(unready.port)  # answers /readyz with 503


@pytest.mark.unit
def test_compose_keeps_its_secret_in_an_untracked_env_file() -> None:
    # A secret made on every `up` would invalidate every identity token at each restart.
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    for name in ("docker-compose.yml", "README.md"):
        text = (ROOT / name).read_text()
        assert "> .env" in text, name
        assert "PRESENCE_SECRET=$(openssl rand -hex 32) docker compose" not in text, name


class RoundRobinProxy:
    """A TCP load balancer for the test: each new connection goes to the next replica."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.next = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = self.ports[self.next % len(self.ports)]
        self.next += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
def topology(server_factory: Callable[..., Server]) -> Iterator[tuple[RedisProcess, list[Server]]]:
    redis = RedisProcess().start()
    service = next(iter(replica_services().values()))
    env = {k: substitute(v) for k, v in service["environment"].items()}
    env.update(
        PRESENCE_REDIS_URL=redis.url,
        PRESENCE_HOST="127.0.0.1",
        PRESENCE_SECRET="shared-secret-of-the-compose-replicas",
    )
    del env["PRESENCE_PORT"]  # each local replica gets a free port
    yield redis, [server_factory(env=env) for _ in range(3)]
    redis.stop()


@pytest.mark.e2e
async def test_compose_topology_as_local_processes(
    topology: tuple[RedisProcess, list[Server]],
) -> None:
    _redis, replicas = topology
    proxy = RoundRobinProxy([r.port for r in replicas])
    port = await proxy.start()
    try:
        clients = [await Client.connect(f"ws://127.0.0.1:{port}/rooms/hub") for _ in range(6)]
        # Round-robin put two members on each replica; everyone sees everyone.
        for c in clients:
            await c.until(lambda m, c=c: len(c.members) == 5, timeout=5)
        await clients[0].update(cursor={"x": 1, "y": 1})
        for c in clients[1:]:
            await c.until(
                lambda m, c=c: c.members[clients[0].id]["state"].get("cursor") == {"x": 1, "y": 1}
            )
        # Identities survive a reconnect through the balancer to another replica.
        token, user = clients[1].welcome["token"], clients[1].user
        await clients[1].close()
        again = await Client.connect(f"ws://127.0.0.1:{port}/rooms/hub?token={token}")
        # It may arrive before its old connection's leave does ("… 2" for a moment);
        # the name comes back as soon as the old member is gone.
        await again.until(lambda m: again.user == user, timeout=5)
        # A replica dies: its members (clients 2 and 5) vanish everywhere else.
        killed = time.monotonic()
        replicas[2].stop(signal.SIGKILL)
        survivor = clients[0]
        await survivor.until(
            lambda m: (
                clients[2].id not in survivor.members and clients[5].id not in survivor.members
            ),
            timeout=10,
        )
        assert time.monotonic() - killed <= 5  # PRESENCE_REPLICA_TIMEOUT
    finally:
        await proxy.stop()
