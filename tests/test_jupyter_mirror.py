"""The presence mirror: a real ``jupyter server`` (presence.jupyter with
``PresenceJupyter.url``) and a real ``presence serve``.

Collaborators appear in the presence room ``<scope>:<room id>`` with their user and a
small summary, leave it within a second of their socket closing, and presence going away
never slows collaboration down; when it comes back, the mirror catches up.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from harness.processes import Server
from presence.jupyter.extension import default_scope
from presence.jupyter.mirror import room_name, sanitize, summary, yjs_url
from tests.jupyter_helpers import Jupyter, lab_state, start_jupyter
from tests.yjs_client import YClient

pytestmark = pytest.mark.e2e

SCOPE = "mirror-test"


@pytest.fixture(scope="module")
def presence() -> Iterator[Server]:
    # States expire after 4 s here: the mirror renews them every second (see below).
    server = Server(["--seed", "5", "--idle-after", "1", "--expire-after", "4"]).start()
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory: pytest.TempPathFactory, presence: Server) -> Iterator[Jupyter]:
    server = start_jupyter(
        tmp_path_factory.mktemp("jupyter"),
        "--ServerApp.jpserver_extensions=presence.jupyter=True",
        f"--PresenceJupyter.url={presence.http}",
        f"--PresenceJupyter.scope={SCOPE}",
        "--PresenceJupyter.renew_interval=1",
    )
    yield server
    server.stop()


async def members(presence: Server, room: str) -> dict[str, dict[str, Any]]:
    """The presence room's members by name (empty while presence is down)."""
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            body = (await http.get(f"{presence.http}/rooms/{SCOPE}:{room}")).json()
    except httpx.HTTPError:
        return {}
    return {m["user"]["name"]: m for m in body["members"]}


async def until_members(
    presence: Server, room: str, check: Any, timeout: float = 10
) -> tuple[float, dict[str, dict[str, Any]]]:
    started = time.monotonic()
    while True:
        found = await members(presence, room)
        if check(found):
            return time.monotonic() - started, found
        if time.monotonic() - started > timeout:
            raise AssertionError(f"presence room {room}: {found}")
        await asyncio.sleep(0.02)


def selects(found: dict[str, dict[str, Any]], name: str) -> bool:
    return bool(found.get(name, {}).get("state", {}).get("selection"))


async def collaborators(jupyter: Jupyter, *names: str) -> tuple[str, list[YClient]]:
    room, url = jupyter.new_notebook()
    clients = []
    for _ in names:
        client = await YClient.connect(url)
        await client.until(lambda c=client: c.synced)  # type: ignore[misc]
        clients.append(client)
    for client, name in zip(clients, names, strict=True):
        await client.set({**lab_state(name), "secret": "print('SECRET')"})
    return room, clients


async def test_collaborators_are_mirrored_and_leave_with_their_socket(
    jupyter: Jupyter, presence: Server
) -> None:
    room, (a, b) = await collaborators(jupyter, "Ada", "Bob")
    _, found = await until_members(presence, room, lambda m: {"Ada", "Bob"} <= set(m))
    ada = found["Ada"]["state"]
    assert ada["user"]["name"] == "Ada" and ada["user"]["initials"] == "AD"
    assert ada["cursors"] == 1 and ada["selection"] is False
    assert isinstance(ada["active_at"], int)
    assert "SECRET" not in json.dumps(found) and "anchor" not in json.dumps(found)
    # A selection shows; the state stays in presence past its 4 s expiry (renewals).
    a.awareness.set_local_state_field("cursors", lab_state("Ada", selection=True)["cursors"])
    await a.send_update([a.id])
    await until_members(presence, room, lambda m: selects(m, "Ada"))
    await asyncio.sleep(5)
    assert {"Ada", "Bob"} <= set(await members(presence, room)), "expired: no renewals"
    # a's socket dies; b, which has echoed a's state, stays (and does not relay a).
    aborted = time.monotonic()
    a.abort()
    _, found = await until_members(presence, room, lambda m: "Ada" not in m, timeout=5)
    took = time.monotonic() - aborted
    print(f"\nmirror: an aborted collaborator left the presence room after {took * 1000:.1f} ms")
    assert took < 1.0
    assert "Bob" in found
    await asyncio.sleep(0.3)
    assert set(await members(presence, room)) == {"Bob"}
    closed = time.monotonic()
    await b.ws.close()
    await until_members(presence, room, lambda m: not m, timeout=5)
    took = time.monotonic() - closed
    print(f"mirror: a closed collaborator left the presence room after {took * 1000:.1f} ms")
    assert took < 1.0


async def test_collaboration_goes_on_while_presence_is_down_and_the_mirror_catches_up(
    jupyter: Jupyter, presence: Server
) -> None:
    room, (a, b) = await collaborators(jupyter, "Ada", "Bob")
    await until_members(presence, room, lambda m: {"Ada", "Bob"} <= set(m))
    presence.stop(signal.SIGKILL)
    try:
        lags = []
        for i in range(30):
            a.awareness.set_local_state_field("n", i)
            sent = time.monotonic()
            await a.send_update([a.id])
            await b.until(lambda i=i: b.states.get(a.id, {}).get("n") == i, timeout=2)  # type: ignore[misc]
            lags.append(time.monotonic() - sent)
            await asyncio.sleep(0.1)
        a.awareness.set_local_state_field("cursors", lab_state("Ada", selection=True)["cursors"])
        await a.send_update([a.id])
    finally:
        presence.start()
    print(
        f"\npresence down: Ada's updates reached Bob in {max(lags) * 1000:.1f} ms at most, "
        f"{sorted(lags)[len(lags) // 2] * 1000:.1f} ms median"
    )
    assert max(lags) < 0.5
    took, _ = await until_members(
        presence,
        room,
        lambda m: "Bob" in m and selects(m, "Ada"),
        timeout=20,
    )
    print(f"presence restarted: the mirror caught up {took:.1f} s after it answered")
    out = jupyter.output()
    assert out.count("is unreachable") == 1, "an outage is logged once"
    assert out.count("is back; mirroring resumed") == 1
    await a.ws.close()
    await b.ws.close()


def test_room_names_and_summaries() -> None:
    assert room_name("myhost-8888", "json:notebook:6f1c-9") == "myhost-8888:json:notebook:6f1c-9"
    assert sanitize("ada@example.org/x y") == "ada_example.org_x_y"
    long = room_name("s" * 100, "json:notebook:" + "f" * 40)
    assert len(long) == 128 and long == room_name("s" * 100, "json:notebook:" + "f" * 40)
    assert long != room_name("s" * 100, "json:notebook:" + "e" * 40)
    assert yjs_url("https://p.example/base/", "a:b") == "wss://p.example/base/yjs/a:b"
    assert yjs_url("http://127.0.0.1:8000", "r") == "ws://127.0.0.1:8000/yjs/r"
    with pytest.raises(ValueError):
        yjs_url("ftp://p.example", "r")
    state = {
        "user": {"name": "Ada", "color": "#123456", "avatar_url": None, "token": 1},
        "cursors": [{"anchor": {"item": 1}, "head": {"item": 2}, "empty": False}],
        "current": "notebook:analysis.ipynb",
        "code": "import os",
    }
    assert summary(state) == {
        "user": {"name": "Ada", "color": "#123456"},
        "current": "notebook:analysis.ipynb",
        "cursors": 1,
        "selection": True,
    }
    assert summary({}) == {}


def test_default_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    class App:
        port = 8888

    monkeypatch.delenv("JUPYTERHUB_USER", raising=False)
    monkeypatch.delenv("JUPYTERHUB_SERVER_NAME", raising=False)
    assert default_scope(App()).endswith("-8888")
    monkeypatch.setenv("JUPYTERHUB_USER", "ada@uni.edu")
    assert default_scope(App()) == "ada_uni.edu"
    monkeypatch.setenv("JUPYTERHUB_SERVER_NAME", "gpu")
    assert default_scope(App()) == "ada_uni.edu~gpu"
