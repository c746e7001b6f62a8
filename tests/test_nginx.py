"""deploy/nginx.conf and deploy/nginx-tls.conf, run by a real nginx in front of real
replicas: a room's JSON and Yjs sockets land on one replica (room affinity), rooms
spread over the replicas, and the TLS example serves wss:// and redirects http://.

The replicas here share no Redis, so members see each other only when nginx put them
on the same replica: that is what affinity means, measured rather than assumed."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from harness.processes import RedisProcess, free_port
from tests.conftest import Client, Server
from tests.yjs_client import YClient

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UPSTREAM = re.compile(r"^\s*server presence-\d+:\d+;\n", re.M)


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    assert found, "nginx is missing: scripts/install-test-deps.sh installs it"
    return found


class Nginx:
    """One of deploy/'s configurations, with the replicas, ports and certificate of this
    test in place of the containers' names, ports and paths."""

    def __init__(self, conf: str, tmp: Path, replicas: list[int], cert_dir: Path | None) -> None:
        self.http_port, self.https_port = free_port(), free_port()
        text = (DEPLOY / conf).read_text()
        servers = "".join(f"    server 127.0.0.1:{port};\n" for port in replicas)
        text = UPSTREAM.sub("", text, count=len(UPSTREAM.findall(text)) - 1)
        text = UPSTREAM.sub(servers, text)
        text = text.replace("listen 80;", f"listen 127.0.0.1:{self.http_port};")
        text = text.replace("listen 443 ", f"listen 127.0.0.1:{self.https_port} ")
        if cert_dir is not None:
            text = text.replace("/etc/nginx/tls/fullchain.pem", str(cert_dir / "server.crt"))
            text = text.replace("/etc/nginx/tls/privkey.pem", str(cert_dir / "server.key"))
        self.conf = tmp / conf
        self.conf.write_text(text)
        self.prefix = tmp
        self.args = [nginx_binary(), "-p", str(tmp), "-c", str(self.conf)]
        self.args += ["-g", f"daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log;"]

    def check(self) -> str:
        done = subprocess.run([*self.args, "-t"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stderr

    def __enter__(self) -> Nginx:
        self.check()
        self.process = subprocess.Popen(self.args, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{self.http_port}/", timeout=2)
                return self
            except httpx.TransportError:
                assert self.process.poll() is None, self.process.stderr
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A throw-away CA and a certificate for 127.0.0.1 (the Redis TLS tests' own)."""
    redis = RedisProcess(tls=True)  # makes them; the server itself is never started
    yield Path(redis.dir)


@pytest.fixture
def replicas(server_factory: Callable[..., Server]) -> list[Server]:
    # Each replica in memory: no Redis joins rooms split over two replicas.
    return [server_factory("--seed", str(n)) for n in range(3)]


def block(text: str, start: str) -> str:
    """From ``start`` to the end of its brace block."""
    at = text.index(start)
    depth, end = 0, at
    for end in range(text.index("{", at), len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            break
    return text[at : end + 1]


def test_the_tls_example_proxies_exactly_as_the_compose_configuration() -> None:
    plain, tls = (DEPLOY / "nginx.conf").read_text(), (DEPLOY / "nginx-tls.conf").read_text()
    for start in ("map $uri", "upstream presence", "map $http_upgrade", "location / "):
        assert block(plain, start) == block(tls, start), start


async def test_a_room_lands_on_one_replica_and_rooms_spread(
    replicas: list[Server], tmp_path: Path
) -> None:
    with Nginx("nginx.conf", tmp_path, [r.port for r in replicas], None) as nginx:
        base = f"ws://127.0.0.1:{nginx.http_port}"
        clients: list[Client] = []
        for n in range(12):
            room = f"course/notebook-{n}"
            first = await Client.connect(f"{base}/rooms/{room}")
            second = await Client.connect(f"{base}/rooms/{room}")
            # A Yjs client of the same room, by its other path.
            yjs = await YClient.connect(f"{base}/yjs/{room}", {"cursor": n})
            await second.until(lambda m, s=second: len(s.members) == 2, timeout=5)
            await yjs.until(lambda y=yjs: len(y.states) == 2, timeout=5)
            clients += [first, second]
            await yjs.close()
        hosting = [
            [n for n in range(12) if httpx.get(f"{r.http}/rooms/course/notebook-{n}").json()[
                "members"]]
            for r in replicas
        ]  # fmt: skip
        assert sorted(room for rooms in hosting for room in rooms) == list(range(12))
        assert sum(1 for rooms in hosting if rooms) >= 2, hosting  # hashing spreads rooms
        for client in clients:
            await client.close()


async def test_the_tls_example_serves_wss_and_redirects_http(
    replicas: list[Server], certificates: Path, tmp_path: Path
) -> None:
    ports = [r.port for r in replicas]
    with Nginx("nginx-tls.conf", tmp_path, ports, certificates) as nginx:
        redirect = httpx.get(f"http://127.0.0.1:{nginx.http_port}/rooms/x", timeout=5)
        assert redirect.status_code == 301
        assert redirect.headers["location"] == "https://127.0.0.1/rooms/x"
        context = ssl.create_default_context(cafile=str(certificates / "ca.crt"))
        page = httpx.get(f"https://127.0.0.1:{nginx.https_port}/healthz", verify=context)
        assert page.status_code == 200
        assert page.headers["strict-transport-security"] == "max-age=31536000"
        url = f"wss://127.0.0.1:{nginx.https_port}/rooms/secure"
        a = await Client.connect(url, ssl=context)
        b = await Client.connect(url, ssl=context)
        await a.until(lambda m: b.id in a.members, timeout=5)
        await a.close()
        await b.close()
