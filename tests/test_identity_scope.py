"""POST /identities: identities unique within a scope, on one replica and across replicas
sharing a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from harness.processes import SECRET, RedisProcess
from presence.core.colors import PALETTE
from presence.core.identity import IdentityFactory
from tests.conftest import Server

pytestmark = pytest.mark.e2e

ServerFactory = Callable[..., Server]


def key_of(scope: str) -> dict[str, str]:
    """The header that opens ``scope``: its key, made with the service's secret."""
    return {"Authorization": f"Bearer {IdentityFactory(SECRET.encode()).scope_key(scope)}"}


async def claim(http: httpx.AsyncClient, base: str, **body: Any) -> dict[str, Any]:
    response = await http.post(f"{base}/identities", json=body, headers=key_of(body["scope"]))
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
            response = await http.post(url, json=body, headers=key_of("ok"))
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
        keys = scope_keys("hub:lab")
        assert client.hlen(keys["live"]) == 40 and client.zcard(keys["expiry"]) == 40
        assert_indexed(client, "hub:lab")
        # Abandoned scopes vanish: the keys expire with their last identity.
        for key in keys.values():
            assert 3500_000 < client.pttl(key) <= 3600_000, key


async def test_expired_identities_leave_redis_and_an_abandoned_scope_vanishes(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1 = server_factory("--redis-url", redis_server.url)
    async with httpx.AsyncClient() as http:
        for _ in range(3):
            await claim(http, r1.http, scope="brief", ttl=1)
    with redis_server.client() as client:
        assert client.hlen(scope_keys("brief")["live"]) == 3
        deadline = time.monotonic() + 5
        while client.exists(*scope_keys("brief").values()):
            assert time.monotonic() < deadline, "the scope's keys did not expire"
            await asyncio.sleep(0.1)


def scope_keys(scope: str) -> dict[str, str]:
    kinds = ("live", "expiry", "renewed", "names", "initials", "colors")
    return {k: f"presence:scope2:{{{scope}}}:{k}" for k in kinds}


def assert_indexed(client: Any, scope: str) -> None:
    """Redis's indexes of the scope name exactly what its live identities show."""
    import json

    keys = scope_keys(scope)
    live = {u.decode(): json.loads(r) for u, r in client.hgetall(keys["live"]).items()}
    names = {n.decode(): u.decode() for n, u in client.hgetall(keys["names"]).items()}
    initials = {i.decode(): u.decode() for i, u in client.hgetall(keys["initials"]).items()}
    colors = {c.decode(): int(n) for c, n in client.hgetall(keys["colors"]).items()}
    assert names == {r["n"]: u for u, r in live.items()}
    assert initials == {r["i"]: u for u, r in live.items()}
    shown: dict[str, int] = {}
    for r in live.values():
        shown[r["c"]] = shown.get(r["c"], 0) + 1
    assert colors == shown
    assert set(client.zrange(keys["renewed"], 0, -1)) == {u.encode() for u in live}


async def test_claims_need_the_scope_key(server: Server) -> None:
    """Anyone could claim before: 2,150 claims locked a scope's logins out for 7 days."""
    async with httpx.AsyncClient(base_url=server.http) as http:
        body = {"scope": "lab1-8888", "ttl": 604800}
        for headers in (
            {},
            {"Authorization": "Bearer not-the-key"},
            key_of("lab2-8888"),  # another scope's key
            {"Authorization": key_of("lab1-8888")["Authorization"].replace("Bearer", "Basic")},
        ):
            response = await http.post("/identities", json=body, headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "presence scope-key" in response.json()["message"]
        ok = await http.post("/identities", json=body, headers=key_of("lab1-8888"))
        assert ok.status_code == 200


@pytest.mark.parametrize("backplane", ["memory", "redis"])
async def test_a_flood_of_claims_reclaims_its_own_and_never_locks_a_scope_out(
    server_factory: ServerFactory, redis_server: RedisProcess, backplane: str
) -> None:
    """More new identities than the scope keeps: every claim is answered, the scope keeps
    its bound, and those renewed longest ago are let go (renewed, they come back)."""
    redis = ("--redis-url", redis_server.url) if backplane == "redis" else ()
    server = server_factory("--max-identities-per-scope", "40", *redis)
    scope = f"flood-{backplane}"
    async with httpx.AsyncClient(timeout=30) as http:
        first = await claim(http, server.http, scope=scope)
        for _ in range(3):
            await asyncio.gather(*(claim(http, server.http, scope=scope) for _ in range(20)))
        kept = await claim(http, server.http, scope=scope)
        for _ in range(3):  # twice the bound more: every one answered 200 (claim() checks)
            await asyncio.gather(*(claim(http, server.http, scope=scope) for _ in range(20)))
            await claim(http, server.http, scope=scope, token=kept["token"])  # kept renewed
        latest = [(await claim(http, server.http, scope=scope))["identity"] for _ in range(38)]
        assert_distinct(latest)
        # The first was let go long ago: its renewal is answered all the same (it may show
        # another name now), never refused. The 38, it and kept make 40: all live.
        back = await claim(http, server.http, scope=scope, token=first["token"])
        assert back["identity"]["username"] == first["identity"]["username"]
        # Kept live all along: its name is still its own (its initials may have come back
        # to the name's own, freed meanwhile).
        renewed = await claim(http, server.http, scope=scope, token=kept["token"])
        assert renewed["identity"]["name"] == kept["identity"]["name"]
    if backplane == "redis":
        with redis_server.client() as client:
            assert client.hlen(scope_keys(scope)["live"]) == 40
            assert_indexed(client, scope)


async def test_claims_of_a_scope_past_its_rate_get_429_and_other_scopes_do_not(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--identity-claim-rate", "1")
    async with httpx.AsyncClient(base_url=server.http) as http:

        async def post(scope: str) -> httpx.Response:
            return await http.post("/identities", json={"scope": scope}, headers=key_of(scope))

        burst = [(await post("busy")).status_code for _ in range(12)]
        assert burst[:10] == [200] * 10 and burst[10:] == [429, 429]  # 10 s worth of 1/s
        refused = await post("busy")
        assert refused.json()["error"] == "rate_limited"
        assert refused.headers["retry-after"] == "1"
        assert (await post("quiet")).status_code == 200


async def test_redis_claims_agree_with_the_rule_the_memory_backplane_applies(
    redis_server: RedisProcess,
) -> None:
    """The same claims, made in the same order, against Redis's script and against
    presence.core.distinct (the memory store's): the same answers, the same live
    identities, through clashes, renewals with new looks, and evictions past the bound."""
    import random

    from presence.core.distinct import Claim, LiveIdentities
    from presence.core.identity import Identity
    from presence.scopes.redis import RedisScopes

    rng = random.Random(7)
    palette = PALETTE[:4]  # few colours: shared and freed ones come often
    store = RedisScopes(redis_server.url)
    live, keep, now = LiveIdentities(), 8, 0.0
    try:
        for step in range(300):
            user = f"u{rng.randrange(14)}"
            name = f"N{rng.randrange(10)}"
            identity = Identity(user, name, f"I{rng.randrange(10)}", rng.choice(palette))
            claim = Claim(identity, palette)
            expected = live.claim(claim, now, 3600, keep)
            got = await store.claim_identity("agree", claim, 3600, keep)
            assert (got is None) == (expected is None), (step, claim, got, expected)
            if got is not None:
                assert got == expected, step
            assert await store.scope_identities("agree") == live.held(now), step
            now += 1
            await asyncio.sleep(0.002)  # the order of renewals, in Redis's milliseconds
    finally:
        await store.close()
    with redis_server.client() as client:
        assert_indexed(client, "agree")
