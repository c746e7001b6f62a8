"""A rolling upgrade, as Kubernetes makes one: a replica of the previous version and one
of this version share rooms on one Redis, then the old one goes and its members come
back on the new one. The previous version's code runs in a venv of its own, built from
this clone's git history."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.processes import RedisProcess, Server
from tests.conftest import FAST, Client
from tests.test_json_protocol import join
from tests.test_replicas import logged, published, sees

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
# What deployments run before this version: main before hardening round 3 (its
# heartbeats carry no protocol version). Move it to the last release's tag once tagged.
PREVIOUS = "c3b1bbc022d9e69e31572538720e2dc75d2c6b07"
ARGS = (*FAST, "--replica-timeout", "2", "--expire-after", "60")


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv whose ``presence`` is the previous version's (its dependencies are this
    venv's); returns its directory, which is also where it must run from."""
    root = tmp_path_factory.mktemp("previous")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS, "presence"], capture_output=True
    )
    assert archive.returncode == 0, (
        f"the previous version ({PREVIOUS[:7]}) is not in this clone's history "
        f"({archive.stderr.decode().strip()}): the test needs a clone with its history"
    )
    (root / "src").mkdir()
    subprocess.run(["tar", "-x", "-C", str(root / "src")], input=archive.stdout, check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = str(root / "venv" / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(purelib, "previous.pth").write_text(
        f"{root / 'src'}\nimport site; site.addsitedir({ours!r})\n"
    )
    found = subprocess.run(
        [python, "-c", "import presence; print(presence.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout.strip()
    assert found.startswith(str(root / "src")), found
    return root


@pytest.fixture
def old_replica(previous: Path, redis_server: RedisProcess) -> Iterator[Callable[[], Server]]:
    started: list[Server] = []

    def start() -> Server:
        server = Server(
            [*ARGS, "--redis-url", redis_server.url],
            python=str(previous / "venv" / "bin" / "python"),
            cwd=str(previous),
        ).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


async def test_a_replica_of_the_previous_version_and_one_of_this_version_share_rooms(
    server_factory: Callable[..., Server],
    redis_server: RedisProcess,
    old_replica: Callable[[], Server],
) -> None:
    old = old_replica()
    new = server_factory(*ARGS, "--redis-url", redis_server.url)
    a = await join(old)
    await published(redis_server)
    b = await join(new)
    assert [m["id"] for m in b.welcome["members"]] == [a.id]
    await a.until(lambda m: b.id in a.members, timeout=5)
    # Both ways, several times: events, numbering, full states.
    for i in range(5):
        await a.update(cursor={"x": i, "y": 0})
        await b.until(sees(b, a, cursor={"x": i, "y": 0}), timeout=5)
        await b.update(cursor={"x": 0, "y": i})
        await a.until(sees(a, b, cursor={"x": 0, "y": i}), timeout=5)
    deadline = time.monotonic() + 5  # the old one's next heartbeat says what it speaks
    while not any(e.get("protocol") == 1 and "relaying with it" in e["msg"] for e in logged(new)):
        assert time.monotonic() < deadline, logged(new, "replica ")
        await asyncio.sleep(0.1)
    # The old replica is replaced: SIGTERM, its member reconnects to the new one with its
    # identity token, as a browser does after the close.
    token = a.welcome["token"]
    old.stop(signal.SIGTERM)  # graceful: it says goodbye
    await b.until(lambda m: a.id not in b.members, timeout=10)
    back: Client = await join(new, token=token)
    assert back.welcome["you"]["user"] == a.welcome["you"]["user"]
    await b.until(lambda m: back.id in b.members, timeout=5)
    # A second replica of this version, as the rollout goes on: everyone, once.
    late = await join(server_factory(*ARGS, "--redis-url", redis_server.url))
    assert sorted(m["id"] for m in late.welcome["members"]) == sorted([back.id, b.id])
    await back.update(cursor={"x": 9, "y": 9})
    await late.until(sees(late, back, cursor={"x": 9, "y": 9}), timeout=5)
    await b.until(lambda m: set(b.members) == {back.id, late.id}, timeout=5)
