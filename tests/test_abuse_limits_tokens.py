"""Issue 13: identity tokens that expire and parse strictly, end to end.

A token past its maximum age, one issued before tokens carried their issue time, and one
with a junk character inside all get the answer an invalid token gets: the JSON protocol's
``invalid_token`` error and close 1008, 400 ``invalid_token`` from ``GET /identity`` and
``POST /identities``, close 1008 on the Yjs endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from urllib.parse import urlencode

import httpx
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from presence.core.identity import IdentityFactory
from tests.conftest import FAST, Server
from tests.test_json_protocol import join

pytestmark = pytest.mark.e2e

SECRET = "abuse-limits-secret-of-32-bytes-or-more"
DAY = 24 * 3600.0


def issued(seconds_ago: float) -> str:
    """A token this deployment signed ``seconds_ago``."""
    f = IdentityFactory(SECRET.encode(), seed=3, clock=lambda: time.time() - seconds_ago)
    return f.token(f.create())


def without_issue_time() -> str:
    """A token as servers signed them before tokens carried their issue time."""
    payload = b'{"v":1,"u":"0123456789abcdef","n":"Anonymous Io","c":"#0072B2"}'
    mac = hmac.new(SECRET.encode(), payload, hashlib.sha256).digest()
    return ".".join(base64.urlsafe_b64encode(p).rstrip(b"=").decode() for p in (payload, mac))


def with_junk() -> str:
    payload, mac = issued(0).split(".")
    return f"{payload[:5]}!{payload[5:]}.{mac}"  # '!': skipped by lenient decoding


async def close_code(ws: websockets.ClientConnection) -> int:
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None, "closed without a close frame"
    return info.value.rcvd.code


REFUSED = {
    "expired": lambda: issued(31 * DAY),
    "no_issue_time": without_issue_time,
    "junk": with_junk,
}


@pytest.mark.parametrize("kind", list(REFUSED))
async def test_refused_tokens_get_the_invalid_token_answer_everywhere(
    server_factory,  # type: ignore[no-untyped-def]
    kind: str,
) -> None:
    server: Server = server_factory(*FAST, "--secret", SECRET)
    token = REFUSED[kind]()
    async with httpx.AsyncClient(base_url=server.http) as http:
        got = await http.get("/identity", params={"token": token})
        assert got.status_code == 400 and got.json()["error"] == "invalid_token", got.text
        body = {"scope": "lab", "token": token}
        key = IdentityFactory(SECRET.encode()).scope_key("lab")
        got = await http.post("/identities", json=body, headers={"Authorization": f"Bearer {key}"})
        assert got.status_code == 400 and got.json()["error"] == "invalid_token", got.text
    # Over the JSON protocol: the error, then close 1008 (the client drops the token);
    # on the Yjs endpoint, close 1008.
    query = urlencode({"token": token})
    async with websockets.connect(f"{server.ws}/rooms/doc?{query}") as ws:
        error = orjson.loads(await ws.recv())
        assert (error["type"], error["code"]) == ("error", "invalid_token"), error
        assert await close_code(ws) == 1008
    async with websockets.connect(f"{server.ws}/yjs/doc?{query}") as ws:
        assert await close_code(ws) == 1008
    # ...and connecting without it gets a fresh identity.
    fresh = await join(server)
    assert fresh.welcome["token"] != token
    await fresh.close()


async def test_a_token_within_its_maximum_age_keeps_its_identity(
    server_factory,  # type: ignore[no-untyped-def]
) -> None:
    server: Server = server_factory(*FAST, "--secret", SECRET, "--token-max-age", str(2 * DAY))
    for token, ok in ((issued(DAY), True), (issued(3 * DAY), False)):
        got = httpx.get(server.http + "/identity", params={"token": token})
        assert (got.status_code == 200) is ok, got.text
