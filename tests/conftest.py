"""Fixtures: real servers on real ports (``presence serve`` processes), real Redis, and a
JSON-protocol client that keeps the room as a frontend would."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
import websockets

from harness.processes import ARTIFACTS, RedisProcess, Server

__all__ = ["ARTIFACTS", "Server"]  # tests import these from here

KINDS = ("unit", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # `pytest -m unit` must mean "the fast ones": every test says which kind it is.
    for item in items:
        kinds = [k for k in KINDS if item.get_closest_marker(k) is not None]
        if len(kinds) != 1:
            raise pytest.UsageError(
                f"{item.nodeid} is marked {kinds or 'neither'}: mark it exactly one of "
                "unit or e2e (pytestmark = pytest.mark.unit in its module, say)"
            )


@pytest.fixture
def server_factory() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(*args: str, env: dict[str, str] | None = None, ready: bool = True) -> Server:
        server = Server(list(args), env or {}).start(ready=ready)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(signal.SIGKILL)


# Short timings so that idle is observable in a test run; expiry long enough that a slow
# run does not expire members that a test is still using.
FAST = ("--idle-after", "0.5", "--expire-after", "6", "--seed", "1")
# For the tests of expiry itself.
EXPIRING = ("--idle-after", "0.5", "--expire-after", "2", "--seed", "1")


@pytest.fixture
def server(server_factory: Callable[..., Server]) -> Server:
    return server_factory(*FAST)


class Client:
    """A JSON-protocol client that keeps what it was told, like a frontend would."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        self.members: dict[str, dict[str, Any]] = {}
        self.log: list[tuple[float, dict[str, Any]]] = []

    @classmethod
    async def connect(cls, url: str, **kw: Any) -> Client:
        client = cls(await websockets.connect(url, **kw))
        client.welcome = await client.recv()
        assert client.welcome["type"] == "welcome", client.welcome
        for m in client.welcome["members"]:
            client.members[m["id"]] = m
        return client

    @property
    def id(self) -> str:
        return str(self.welcome["you"]["id"])

    @property
    def user(self) -> dict[str, Any]:
        return dict(self.welcome["you"]["user"])

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        message: dict[str, Any] = orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.log.append((time.monotonic(), message))
        self._apply(message)
        return message

    def _apply(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "join":
            for m in message["members"]:
                if m["id"] == self.id:
                    self.welcome["you"] = m  # our own member re-announced (e.g. renamed)
                else:
                    self.members[m["id"]] = m
        elif kind == "update":
            for u in message["updates"]:
                member = self.members.get(u["id"])
                if member is not None:
                    for k, v in u["state"].items():
                        if v is None:
                            member["state"].pop(k, None)
                        else:
                            member["state"][k] = v
        elif kind in ("idle", "active"):
            for i in message["ids"]:
                if i in self.members:
                    self.members[i]["idle"] = kind == "idle"
        elif kind == "leave":
            for i in message["ids"]:
                self.members.pop(i, None)

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5
    ) -> dict[str, Any]:
        """Receive until a message satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if predicate(message):
                return message

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(message).decode())

    async def update(self, **state: Any) -> None:
        await self.send({"type": "update", "state": state})

    async def close(self) -> None:
        await self.ws.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for c in opened:
        await c.ws.close()


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    server.stop()
