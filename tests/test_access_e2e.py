"""``--auth token`` and ``--allowed-origins`` against real servers: WebSockets (JSON and
Yjs), the REST and SSE views, tokens expiring while in use, ``presence token``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import FAST, Client, Server
from tests.test_views import sse_events
from tests.yjs_client import YClient

pytestmark = pytest.mark.e2e

ServerFactory = Callable[..., Server]
SECRET = "e2e-access-secret-at-least-32-bytes-long"
ENV = {"PRESENCE_SECRET": SECRET}


def token(room: str = "doc", ttl: float = 3600, secret: str = SECRET, **claims: Any) -> str:
    key = "room_prefix" if claims.pop("prefix", False) else "room"
    return jwt.encode({key: room, "exp": time.time() + ttl, **claims}, secret, algorithm="HS256")


def guarded(server_factory: ServerFactory, *args: str) -> Server:
    return server_factory(*FAST, "--auth", "token", *args, env=ENV)


async def refusal(url: str, **kw: Any) -> tuple[int, str, list[dict[str, Any]]]:
    """Connect, read until the server closes: its close code, reason, and messages."""
    messages = []
    async with websockets.connect(url, **kw) as ws:
        with pytest.raises(ConnectionClosed) as info:
            while True:
                messages.append(orjson.loads(await asyncio.wait_for(ws.recv(), 10)))
    rcvd = info.value.rcvd
    assert rcvd is not None, "closed without a close frame"
    return rcvd.code, rcvd.reason, messages


async def test_sockets_need_a_valid_token_for_their_room(server_factory: ServerFactory) -> None:
    server = guarded(server_factory)
    url = f"{server.ws}/rooms/doc"
    code, reason, messages = await refusal(url)
    assert (code, messages[0]["code"]) == (4401, "missing_token"), reason
    for bad, expected in [
        (token(secret="another-service-secret-of-32-bytes!!"), "bad signature"),
        (token(ttl=-10), "expired"),
        ("garbage", "invalid access token"),
    ]:
        code, reason, _ = await refusal(f"{url}?access_token={bad}")
        assert code == 4401 and expected in reason, reason
    code, reason, messages = await refusal(f"{url}?access_token={token('other')}")
    assert (code, messages[0]["code"]) == (4403, "other_room"), reason
    # Yjs sockets alike (no JSON message: the close code and reason say it).
    code, _, _ = await refusal(f"{server.ws}/yjs/doc")
    assert code == 4401
    code, _, _ = await refusal(f"{server.ws}/yjs/doc?access_token={token('other')}")
    assert code == 4403
    # The right room, by name or prefix, with or without an identity token.
    a = await Client.connect(f"{url}?access_token={token()}")
    identity = a.welcome["token"]
    b = await Client.connect(f"{url}?access_token={token('do', prefix=True)}&token={identity}")
    assert b.user["username"] == a.user["username"]
    y = await YClient.connect(f"{server.ws}/yjs/doc?access_token={token()}", {"cursor": None})
    await a.until(lambda m: m["type"] == "join" and f"y{y.id}" in [j["id"] for j in m["members"]])
    for c in (a, b):
        await c.ws.close()
    await y.ws.close()


async def test_views_need_a_token_and_viewers_only_view(server_factory: ServerFactory) -> None:
    server = guarded(server_factory, "--admin-token", "let-me-in")
    member = await Client.connect(f"{server.ws}/rooms/doc?access_token={token()}")
    viewer = token(role="viewer")
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        r = await http.get("/rooms/doc")
        assert (r.status_code, r.json()["error"]) == (401, "missing_token")
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await http.get("/rooms/doc", headers={"Authorization": f"Bearer {token(ttl=-5)}"})
        assert (r.status_code, r.json()["error"]) == (401, "token_expired")
        r = await http.get("/rooms/doc", params={"access_token": token("other")})
        assert (r.status_code, r.json()["error"]) == (403, "other_room")
        for credentials in (
            {"headers": {"Authorization": f"Bearer {viewer}"}},
            {"params": {"access_token": viewer}},
            {"params": {"access_token": token()}},  # a member may view too
        ):
            r = await http.get("/rooms/doc", **credentials)  # type: ignore[arg-type]
            assert r.status_code == 200 and [m["id"] for m in r.json()["members"]] == [member.id]
        # An auth proxy's own Authorization (not Bearer) leaves the query parameter in use.
        r = await http.get(
            "/rooms/doc",
            params={"access_token": viewer},
            headers={"Authorization": "Basic dXNlcjpwYXNz"},
        )
        assert r.status_code == 200, r.text
        r = await http.get("/rooms/doc", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert (r.status_code, r.json()["error"]) == (401, "missing_token")
        r = await http.get("/rooms/doc/events")
        assert r.status_code == 401
        async with http.stream("GET", "/rooms/doc/events", params={"access_token": viewer}) as s:
            assert s.status_code == 200
            kind, data = await anext(sse_events(s))
            assert kind == "snapshot" and [m["id"] for m in data["members"]] == [member.id]
        # The admin listing keeps its own token.
        r = await http.get("/rooms", headers={"Authorization": "Bearer let-me-in"})
        assert r.json()["rooms"] == [{"room": "doc", "members": 1}]
    # A viewer may not join, on either protocol.
    code, reason, messages = await refusal(f"{server.ws}/rooms/doc?access_token={viewer}")
    assert (code, messages[0]["code"]) == (4403, "read_only"), reason
    code, reason, _ = await refusal(f"{server.ws}/yjs/doc?access_token={viewer}")
    assert code == 4403 and "viewer" in reason
    await member.ws.close()


async def test_the_token_identity_is_shown(server_factory: ServerFactory) -> None:
    server = guarded(server_factory)
    claims = {"name": "Ada Lovelace", "color": "#AA3377", "username": "ada"}
    a = await Client.connect(f"{server.ws}/rooms/doc?access_token={token(**claims)}")
    assert a.user["name"] == "Ada Lovelace" and a.user["initials"] == "AL"
    assert (a.user["color"], a.user["username"]) == ("#aa3377", "ada")
    b = await Client.connect(f"{server.ws}/rooms/doc?access_token={token(name='Bob')}")
    assert b.user["name"] == "Bob" and b.user["username"] != "ada"
    assert b.members[a.id]["user"]["name"] == "Ada Lovelace"
    # A Yjs client's state without a user gets the token's identity.
    y = await YClient.connect(
        f"{server.ws}/yjs/doc?access_token={token(name='Yves')}", {"cursor": None}
    )
    await b.until(
        lambda m: m["type"] == "join" and "Yves" in [j["user"]["name"] for j in m["members"]]
    )
    for c in (a, b):
        await c.ws.close()
    await y.ws.close()


async def test_a_yjs_client_shows_the_identity_its_token_claims(
    server_factory: ServerFactory,
) -> None:
    """Stock clients always send a ``user``: the parts the token claims override it (for
    Yjs and JSON peers alike), the rest of it is kept."""
    server = guarded(server_factory)
    claimed = token(name="Mallory Claimed", color="#117733", username="mallory")
    own = {
        "name": "Eve",
        "display_name": "Eve",
        "initials": "EV",
        "color": "#ff0000",
        "colorLight": "#ff000033",
        "username": "eve",
        "avatar_url": "https://example.com/eve.png",
    }
    y = await YClient.connect(
        f"{server.ws}/yjs/doc?access_token={claimed}", {"user": own, "cursor": 1}
    )
    watcher = await YClient.connect(f"{server.ws}/yjs/doc?access_token={token()}", {"x": 1})
    j = await Client.connect(f"{server.ws}/rooms/doc?access_token={token()}")
    shown = {
        "name": "Mallory Claimed",
        "display_name": "Mallory Claimed",
        "initials": "MC",
        "color": "#117733",
        "colorLight": "#11773333",
        "username": "mallory",
        "avatar_url": "https://example.com/eve.png",  # not claimed: the client's
    }
    await watcher.until(lambda: watcher.states.get(y.id, {}).get("user") == shown)
    assert watcher.states[y.id]["cursor"] == 1
    member = j.members[f"y{y.id}"]
    assert member["user"]["name"] == "Mallory Claimed" and member["user"]["initials"] == "MC"
    assert (member["user"]["color"], member["user"]["username"]) == ("#117733", "mallory")
    assert member["state"]["user"]["name"] == "Mallory Claimed"
    # A later state cannot rename it either; a user that is no object gives way.
    await y.set({"user": {**own, "name": "Eve again", "display_name": "Eve again"}, "cursor": 2})
    await watcher.until(lambda: watcher.states.get(y.id, {}).get("cursor") == 2)
    assert watcher.states[y.id]["user"] == shown
    await j.until(lambda m: m["type"] == "update")
    assert j.members[f"y{y.id}"]["state"]["user"]["name"] == "Mallory Claimed"
    other = await YClient.connect(
        f"{server.ws}/yjs/doc?access_token={token(color='#332288')}", {"user": "Eve"}
    )
    await watcher.until(lambda: isinstance(watcher.states.get(other.id, {}).get("user"), dict))
    assert watcher.states[other.id]["user"]["color"] == "#332288"
    for c in (y, watcher, other):
        await c.ws.close()
    await j.ws.close()


async def test_a_token_that_expires_closes_its_socket_and_stream(
    server_factory: ServerFactory,
) -> None:
    server = guarded(server_factory)
    short = token(ttl=2)
    expires = jwt.decode(short, options={"verify_signature": False})["exp"]
    a = await Client.connect(f"{server.ws}/rooms/doc?access_token={short}")
    y = await YClient.connect(f"{server.ws}/yjs/doc?access_token={short}", {"cursor": None})
    params = {"access_token": short}
    async with (
        httpx.AsyncClient(base_url=server.http, timeout=15) as http,
        http.stream("GET", "/rooms/doc/events", params=params) as s,
    ):
        assert s.status_code == 200
        kinds = [kind async for kind, _ in sse_events(s)]  # until the server ends it
        ended = time.time()
    assert kinds[0] == "snapshot"
    assert expires - 0.1 <= ended < expires + 5
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await a.recv(timeout=10)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4401, "token expired")
    assert time.time() >= expires - 0.1
    await asyncio.wait_for(asyncio.shield(y.reader), 10)
    rcvd = y.ws.protocol.close_rcvd
    assert rcvd is not None and (rcvd.code, rcvd.reason) == (4401, "token expired")


async def test_origins(server_factory: ServerFactory) -> None:
    server = guarded(server_factory, "--allowed-origins", "https://app.example.com")
    url = f"{server.ws}/rooms/doc?access_token={token()}"
    for path in ("/rooms/doc", "/yjs/doc"):
        with pytest.raises(InvalidStatus) as info:
            await websockets.connect(
                f"{server.ws}{path}?access_token={token()}", origin="https://evil.example"
            )
        assert info.value.response.status_code == 403
    allowed = await Client.connect(url, origin="https://app.example.com")
    no_origin = await Client.connect(url)  # not a browser
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        params = {"access_token": token()}
        r = await http.get("/rooms/doc/events", params=params, headers={"Origin": "https://x.y"})
        assert (r.status_code, r.json()["error"]) == (403, "origin")
        async with http.stream(
            "GET", "/rooms/doc/events", params=params, headers={"Origin": "https://app.example.com"}
        ) as s:
            assert s.status_code == 200
            assert s.headers["access-control-allow-origin"] == "https://app.example.com"
    for c in (allowed, no_origin):
        await c.ws.close()


async def test_auth_none_lets_anyone_in_from_any_origin(server_factory: ServerFactory) -> None:
    server = server_factory(*FAST)
    a = await Client.connect(f"{server.ws}/rooms/doc", origin="https://anywhere.example")
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        r = await http.get("/rooms/doc", headers={"Origin": "https://anywhere.example"})
        assert r.status_code == 200 and len(r.json()["members"]) == 1
    await a.ws.close()


async def test_presence_token_prints_a_token_that_works(server_factory: ServerFactory) -> None:
    server = guarded(server_factory)
    cli = [sys.executable, "-m", "presence", "token"]
    env = {**os.environ, "PRESENCE_SECRET": SECRET}
    out = subprocess.run(
        [*cli, "--room", "team.", "--prefix", "--ttl", "1h", "--name", "Operator"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    printed = out.stdout.strip()
    claims = jwt.decode(printed, SECRET, algorithms=["HS256"])
    assert claims["room_prefix"] == "team." and claims["role"] == "member"
    assert 3590 < claims["exp"] - time.time() <= 3600
    a = await Client.connect(f"{server.ws}/rooms/team.doc?access_token={printed}")
    assert a.user["name"] == "Operator"
    await a.ws.close()
    viewer = subprocess.run(
        [*cli, "--room", "team.doc", "--role", "viewer", "--ttl", "5m"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    code, _, _ = await refusal(f"{server.ws}/rooms/team.doc?access_token={viewer}")
    assert code == 4403
    env.pop("PRESENCE_SECRET")
    failed = subprocess.run([*cli, "--room", "r"], env=env, capture_output=True, text=True)
    assert failed.returncode == 2 and "PRESENCE_SECRET" in failed.stderr
