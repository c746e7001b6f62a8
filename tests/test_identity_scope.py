"""POST /identities: identities unique within a scope, on one replica and across replicas
sharing a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from harness.processes import RedisProcess
from presence.core.colors import PALETTE
from tests.conftest import Server

pytestmark = pytest.mark.e2e

ServerFactory = Callable[..., Server]


async def claim(http: httpx.AsyncClient, base: str, **body: Any) -> dict[str, Any]:
    response = await http.post(f"{base}/identities", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def assert_distinct(identities: list[dict[str, Any]]) -> None:
    assert len({i["name"] for i in identities}) == len(identities)
    assert len({i["initials"] for i in identities}) == len(identities)
    assert all(i["color"] in PALETTE for i in identities)


async def test_identities_of_a_scope_are_distinct_and_renewed_unchanged(server: Server) -> None:
    async with httpx.AsyncClient() as http:
        got = [await claim(http, server.http, scope="lab-1") for _ in range(20)]
        identities = [g["identity"] for g in got]
        assert_distinct(identities)
        assert {i["color"] for i in identities[:16]} == set(PALETTE)
        for key in ("username", "name", "display_name", "initials", "avatar_url", "color"):
            assert key in identities[0]
        # Renewal: the same identity, the same token.
        again = await claim(http, server.http, scope="lab-1", token=got[3]["token"])
        assert again["identity"] == identities[3] and again["token"] == got[3]["token"]
        # The token is the service's own: GET /identity reads it back.
        read = (await http.get(f"{server.http}/identity", params={"token": got[3]["token"]})).json()
        assert read["identity"]["username"] == identities[3]["username"]


async def test_a_name_held_in_the_scope_is_given_back_when_its_holder_expires(
    server: Server,
) -> None:
    async with httpx.AsyncClient() as http:
        # Two tokens of one name (names are drawn from 57 moons: they meet soon).
        by_name: dict[str, str] = {}
        for _ in range(300):
            fresh = (await http.get(f"{server.http}/identity")).json()
            name = fresh["identity"]["name"]
            if name in by_name:
                first, second = by_name[name], fresh["token"]
                break
            by_name[name] = fresh["token"]
        else:
            raise AssertionError("no two fresh identities shared a name")
        a = await claim(http, server.http, scope="s", token=first, ttl=1)
        b = await claim(http, server.http, scope="s", token=second, ttl=30)
        assert a["identity"]["name"] == name
        assert b["identity"]["name"] == f"{name} 2"
        assert b["identity"]["initials"] != a["identity"]["initials"]
        assert b["token"] == second  # the token still wants the plain name
        # Another scope is another set of people.
        elsewhere = await claim(http, server.http, scope="t", token=second)
        assert elsewhere["identity"]["name"] == name
        await asyncio.sleep(1.2)  # a was not renewed: it expires, and b gets its name
        b = await claim(http, server.http, scope="s", token=second, ttl=30)
        assert b["identity"]["name"] == name


async def test_bad_requests_get_a_400_that_says_why(server: Server) -> None:
    async with httpx.AsyncClient() as http:
        url = f"{server.http}/identities"
        cases = [
            ({"scope": "has space"}, "invalid_scope"),
            ({"scope": "x" * 129}, "invalid_scope"),
            ({}, "invalid_scope"),
            ({"scope": "ok", "ttl": 0}, "invalid_ttl"),
            ({"scope": "ok", "ttl": True}, "invalid_ttl"),
            ({"scope": "ok", "token": "abc.def"}, "invalid_token"),
            ([1, 2], "invalid_request"),
        ]
        for body, code in cases:
            response = await http.post(url, json=body)
            assert response.status_code == 400, body
            assert response.json()["error"] == code, body
        invalid_scope = (await http.post(url, json={"scope": "a b"})).json()["message"]
        assert "letters, digits" in invalid_scope
        json_type = {"content-type": "application/json"}
        response = await http.post(url, content=b"{nope", headers=json_type)
        assert response.status_code == 400 and response.json()["error"] == "invalid_json"
        # What a cross-origin page can send without a preflight is refused.
        plain = {"content-type": "text/plain"}
        response = await http.post(url, content=b'{"scope": "ok"}', headers=plain)
        assert response.status_code == 415
        big = b'{"scope": "ok", "pad": "' + b"x" * 5000 + b'"}'
        response = await http.post(url, content=big, headers=json_type)
        assert response.status_code == 413 and response.json()["error"] == "too_large"
        assert (await http.get(url)).status_code == 405


async def test_replicas_on_one_redis_hand_out_unique_identities_within_a_scope(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1, r2 = (server_factory("--redis-url", redis_server.url) for _ in range(2))
    async with httpx.AsyncClient(timeout=10) as http:
        # Claims made at once on both replicas race for the same first choices.
        first = await asyncio.gather(
            *(claim(http, (r1, r2)[i % 2].http, scope="hub:lab") for i in range(16))
        )
        identities = [g["identity"] for g in first]
        assert_distinct(identities)
        assert {i["color"] for i in identities} == set(PALETTE)
        more = await asyncio.gather(
            *(claim(http, (r1, r2)[i % 2].http, scope="hub:lab") for i in range(24))
        )
        assert_distinct(identities + [g["identity"] for g in more])
        # A token from one replica is renewed unchanged by the other.
        again = await claim(http, r2.http, scope="hub:lab", token=first[0]["token"])
        assert again["identity"] == identities[0]
    with redis_server.client() as client:
        live, expiry = "presence:scope:{hub:lab}:live", "presence:scope:{hub:lab}:expiry"
        assert client.hlen(live) == 40 and client.zcard(expiry) == 40
        # Abandoned scopes vanish: both keys expire with their last identity.
        assert 3500_000 < client.pttl(live) <= 3600_000
        assert 3500_000 < client.pttl(expiry) <= 3600_000


async def test_expired_identities_leave_redis_and_an_abandoned_scope_vanishes(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1 = server_factory("--redis-url", redis_server.url)
    async with httpx.AsyncClient() as http:
        for _ in range(3):
            await claim(http, r1.http, scope="brief", ttl=1)
    with redis_server.client() as client:
        assert client.hlen("presence:scope:{brief}:live") == 3
        deadline = time.monotonic() + 5
        while client.exists("presence:scope:{brief}:live", "presence:scope:{brief}:expiry"):
            assert time.monotonic() < deadline, "the scope's keys did not expire"
            await asyncio.sleep(0.1)
