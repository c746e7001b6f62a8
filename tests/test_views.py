"""REST and Server-Sent Events views, end to end, on one replica and across two."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest

from harness.processes import RedisProcess
from tests.conftest import FAST, Server
from tests.test_json_protocol import join
from tests.test_replicas import published

pytestmark = pytest.mark.e2e

ServerFactory = Callable[..., Server]
ADMIN = ("--admin-token", "let-me-in")


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    kind = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, orjson.loads(line[6:])


async def until_json(
    http: httpx.AsyncClient, path: str, predicate: Callable[[Any], bool], timeout: float = 5
) -> Any:
    """GET ``path`` until its JSON body satisfies ``predicate``; return that body."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        body = (await http.get(path)).json()
        if predicate(body) or asyncio.get_running_loop().time() > deadline:
            return body
        await asyncio.sleep(0.02)


async def test_room_members_and_room_list(server_factory: ServerFactory) -> None:
    server = server_factory(*FAST, *ADMIN)
    a = await join(server, room="alpha")
    await a.update(cursor={"x": 1, "y": 2})
    await join(server, room="beta")
    await join(server, room="beta")
    async with httpx.AsyncClient(base_url=server.http) as http:
        # The update reaches the room on the server's next tick.
        body = await until_json(http, "/rooms/alpha", lambda b: b["members"][0]["state"] != {})
        assert body["room"] == "alpha"
        [member] = body["members"]
        assert member["id"] == a.id and member["user"]["name"] == a.user["name"]
        assert member["state"] == {"cursor": {"x": 1, "y": 2}}
        assert (await http.get("/rooms/nobody-here")).json()["members"] == []
        assert (await http.get("/rooms/bad%20name")).status_code == 400
        # Listing every room is for admins.
        assert (await http.get("/rooms")).status_code == 401
        wrong = await http.get("/rooms", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        rooms = (await http.get("/rooms", headers={"Authorization": "Bearer let-me-in"})).json()
        assert rooms == {"rooms": [{"room": "alpha", "members": 1}, {"room": "beta", "members": 2}]}


async def test_room_list_accepts_only_a_bearer_credential(server_factory: ServerFactory) -> None:
    # Issue 13: the bare token (no scheme) was accepted.
    server = server_factory(*FAST, *ADMIN)
    async with httpx.AsyncClient(base_url=server.http) as http:
        for header, status in [
            ("let-me-in", 401),
            ("Basic let-me-in", 401),
            ("Bearer", 401),
            ("Bearer let-me-in extra", 401),
            ("Bearer  let-me-in", 401),
            ("Bearerlet-me-in", 401),
            ("Bearer let-me-inx", 401),
            ("Bearer let-me-in", 200),
            ("bearer let-me-in", 200),  # the scheme is case-insensitive (RFC 7235)
            ("BEARER let-me-in", 200),
        ]:
            got = await http.get("/rooms", headers={"Authorization": header})
            assert got.status_code == status, header
            if status == 401:
                assert got.headers["WWW-Authenticate"] == "Bearer"


async def test_room_list_is_off_without_an_admin_token(server: Server) -> None:
    response = httpx.get(server.http + "/rooms")
    assert response.status_code == 403 and "--admin-token" in response.json()["message"]


async def test_event_stream(server: Server) -> None:
    a = await join(server)
    async with (
        httpx.AsyncClient(base_url=server.http, timeout=10) as http,
        http.stream("GET", "/rooms/doc/events") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
        kind, snapshot = await anext(events)
        assert kind == "snapshot" and [m["id"] for m in snapshot["members"]] == [a.id]
        await a.update(cursor={"x": 3, "y": 4})
        kind, update = await anext(events)
        assert kind == "update" and update["updates"] == [
            {"id": a.id, "state": {"cursor": {"x": 3, "y": 4}}}
        ]
        kind, idle = await anext(events)
        assert kind == "idle" and idle["ids"] == [a.id]
        b = await join(server)
        kind, joined = await anext(events)
        assert kind == "join" and joined["members"][0]["id"] == b.id
        await b.close()
        kind, left = await anext(events)
        assert kind == "leave" and left["ids"] == [b.id]
    # The stream's subscription goes away with it: no room is left behind.
    await a.close()
    for _ in range(50):
        if server.metrics()["presence_rooms"] == 0:
            break
        await asyncio.sleep(0.05)
    assert server.metrics()["presence_rooms"] == 0


async def test_views_across_two_replicas(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1 = server_factory(*FAST, *ADMIN, "--redis-url", redis_server.url)
    r2 = server_factory(*FAST, *ADMIN, "--redis-url", redis_server.url)
    a = await join(r1, room="shared")
    b = await join(r2, room="shared")
    c = await join(r1, room="only-r1")
    await a.until(lambda m: b.id in a.members)
    await published(redis_server, "only-r1")
    async with httpx.AsyncClient(timeout=10) as http:
        # r2 has never seen room only-r1: it reads it from Redis.
        body = (await http.get(f"{r2.http}/rooms/only-r1")).json()
        assert [m["id"] for m in body["members"]] == [c.id]
        body = (await http.get(f"{r2.http}/rooms/shared")).json()
        assert {m["id"] for m in body["members"]} == {a.id, b.id}
        rooms = (
            await http.get(f"{r2.http}/rooms", headers={"Authorization": "Bearer let-me-in"})
        ).json()
        assert rooms == {
            "rooms": [{"room": "only-r1", "members": 1}, {"room": "shared", "members": 2}]
        }
        # A stream on r2 of a room whose only member is on r1.
        async with http.stream("GET", f"{r2.http}/rooms/only-r1/events") as response:
            events = sse_events(response)
            kind, snapshot = await anext(events)
            assert [m["id"] for m in snapshot["members"]] == [c.id]
            await c.update(cursor={"x": 7, "y": 7})
            kind, update = await anext(events)
            while kind in ("join", "idle"):
                # c went idle on r1 (after 0.5 s) while the hash still said active, so r2 may
                # first hear of that: as the idle itself, or as r1's answer to r2's request for
                # its members re-announcing c (a join that replaces it).
                ids = update["ids"] if kind == "idle" else [m["id"] for m in update["members"]]
                assert ids == [c.id]
                kind, update = await anext(events)
            assert kind == "update" and update["updates"][0]["state"] == {
                "cursor": {"x": 7, "y": 7}
            }
            await c.close()
            async for kind, message in events:
                if kind == "leave":
                    assert message["ids"] == [c.id]
                    break


def test_client_modules_load_from_other_origins(server: Server) -> None:
    for path in ("/static/presence.js", "/static/overlay.js"):
        response = httpx.get(server.http + path, headers={"Origin": "https://notebooks.example"})
        assert response.status_code == 200
        assert "javascript" in response.headers["content-type"]
        assert response.headers["access-control-allow-origin"] == "*"
    page = httpx.get(server.http + "/")
    assert page.status_code == 200 and 'src="static/demo.js"' in page.text


async def test_no_page_may_frame_a_view(server_factory: ServerFactory) -> None:
    """A room's views are data: a page of the same origin (another user's server on a
    hub) must not load them in a frame and read what the viewer's cookie lets in."""
    server = server_factory(*FAST, "--allowed-origins", "https://ok.example")
    async with httpx.AsyncClient(timeout=10) as http:
        answers = [
            await http.get(f"{server.http}/rooms/doc"),
            await http.get(f"{server.http}/rooms/bad%00name"),  # 400
            # A stream refused by --allowed-origins (403), and one let in.
            await http.get(
                f"{server.http}/rooms/doc/events", headers={"Origin": "https://evil.example"}
            ),
        ]
        async with http.stream("GET", f"{server.http}/rooms/doc/events") as stream:
            answers.append(stream)
    assert [a.status_code for a in answers] == [200, 400, 403, 200]
    for answer in answers:
        assert answer.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert answer.headers["x-content-type-options"] == "nosniff"
