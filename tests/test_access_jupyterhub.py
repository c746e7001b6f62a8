"""``--auth jupyterhub`` against a real JupyterHub (harness/jupyterhub.py): presence runs
as a hub service behind the hub's proxy. The owner of a server and those it is shared
with (themselves or through a group) get into its rooms, others are refused, a revoked
share closes what it had opened, and browsers log in through the hub's OAuth."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from harness.jupyterhub import PASSWORD, SECRET, JupyterHub
from presence.core.identity import hub_face
from tests.conftest import Client
from tests.test_views import sse_events
from tests.yjs_client import YClient

pytestmark = pytest.mark.e2e

ROOM = "alice/:notebook.ipynb"


@pytest.fixture(scope="module")
def hub() -> Iterator[JupyterHub]:
    hub = JupyterHub().start()
    try:
        hub.api("POST", "/users", json={"usernames": ["alice", "bob", "carol", "dave"]})
        hub.api("POST", "/groups/team", json={"users": ["dave"]})
        yield hub
    finally:
        hub.stop()


def ws_url(hub: JupyterHub, path: str) -> str:
    return hub.presence.replace("http://", "ws://") + path


async def closed(ws: websockets.ClientConnection, timeout: float) -> tuple[int, str]:
    """Read until the server closes the socket: its close code and reason."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    assert info.value.rcvd is not None, "closed without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


async def join(hub: JupyterHub, token: str, room: str = ROOM) -> Client:
    return await Client.connect(
        ws_url(hub, f"/rooms/{room}"), additional_headers={"Authorization": f"token {token}"}
    )


async def test_the_owner_and_whoever_it_is_shared_with_get_in_until_revoked(
    hub: JupyterHub,
) -> None:
    alice, bob, carol, dave = (hub.user_token(u) for u in ("alice", "bob", "carol", "dave"))
    hub.api("POST", "/shares/alice/", json={"user": "bob"})
    hub.api("POST", "/shares/alice/", json={"group": "team"})  # dave is in it

    owner = await join(hub, alice)
    assert owner.welcome["room"] == ROOM
    assert (owner.user["name"], owner.user["username"]) == ("alice", "alice")
    shared = await join(hub, bob)
    assert shared.user["name"] == "bob"
    await owner.until(lambda m: shared.id in owner.members)
    assert owner.members[shared.id]["user"]["name"] == "bob"  # the hub's name, nobody's claim
    via_group = await join(hub, dave)
    assert via_group.user["name"] == "dave"

    # Refused: no share, no token, a token that is no hub token, a room of no server.
    async with websockets.connect(
        ws_url(hub, f"/rooms/{ROOM}"), additional_headers={"Authorization": f"token {carol}"}
    ) as ws:
        code, reason = await closed(ws, 10)
    assert (code, reason) == (4403, "the server alice/ is not shared with the hub user carol")
    for headers, expected in [
        ({}, 4401),
        ({"Authorization": "token not-a-hub-token"}, 4401),
    ]:
        async with websockets.connect(
            ws_url(hub, f"/rooms/{ROOM}"), additional_headers=headers
        ) as ws:
            assert (await closed(ws, 10))[0] == expected
    async with websockets.connect(
        ws_url(hub, "/rooms/lobby"), additional_headers={"Authorization": f"token {bob}"}
    ) as ws:
        code, reason = await closed(ws, 10)
    assert code == 4403 and "<owner>/<server>:<room>" in reason
    # The REST view: the same rule, hub token as Bearer or "token".
    async with httpx.AsyncClient(base_url=hub.presence, timeout=10) as http:
        members = await http.get(f"/rooms/{ROOM}", headers={"Authorization": f"Bearer {bob}"})
        assert members.status_code == 200
        assert {m["user"]["name"] for m in members.json()["members"]} == {"alice", "bob", "dave"}
        refused = await http.get(f"/rooms/{ROOM}", headers={"Authorization": f"token {carol}"})
        assert (refused.status_code, refused.json()["error"]) == (403, "not_shared")

    # A Yjs client of bob's cannot show itself as alice: the hub's name replaces its own.
    yjs = await YClient.connect(
        ws_url(hub, f"/yjs/{ROOM}?access_token={bob}"),
        {"user": {"name": "alice", "color": "#ff0000"}, "cursor": 1},
    )
    await owner.until(lambda m: f"y{yjs.id}" in owner.members)
    shown = owner.members[f"y{yjs.id}"]
    # bob's second connection: "bob 2" in the room, as any second tab.
    assert (shown["user"]["username"], shown["user"]["name"]) == ("bob", "bob 2")
    assert shown["state"]["user"]["name"] == "bob"

    # Revoked: bob's share and the group's. Their sockets (JSON, Yjs) and bob's SSE
    # stream close within 30 s; alice's stays open.
    async with (
        httpx.AsyncClient(base_url=hub.presence, timeout=60) as http,
        http.stream(
            "GET", f"/rooms/{ROOM}/events", headers={"Authorization": f"token {bob}"}
        ) as stream,
    ):
        assert stream.status_code == 200
        events = sse_events(stream)
        assert (await anext(events))[0] == "snapshot"
        hub.api("DELETE", "/users/bob/shared/alice/")
        hub.api("DELETE", "/groups/team/shared/alice/")
        revoked = time.monotonic()

        async def stream_ends() -> float:
            async for _ in events:
                pass
            return time.monotonic() - revoked

        async def socket_closes(ws: websockets.ClientConnection) -> tuple[int, str, float]:
            code, reason = await closed(ws, 40)
            return code, reason, time.monotonic() - revoked

        async def yjs_closes() -> tuple[int, str, float]:
            await asyncio.wait_for(yjs.ws.wait_closed(), 40)  # YClient reads itself
            assert yjs.ws.close_code is not None
            return yjs.ws.close_code, yjs.ws.close_reason or "", time.monotonic() - revoked

        stream_after, *sockets = await asyncio.gather(
            stream_ends(),
            socket_closes(shared.ws),
            socket_closes(via_group.ws),
            yjs_closes(),
        )
    for code, reason, after in sockets:
        assert code == 4403 and reason.startswith("access revoked: "), reason
        assert after < 30
    assert stream_after < 30
    print(
        f"\nrevoked shares closed their sockets after "
        f"{', '.join(f'{s[2]:.1f}' for s in sockets)} s and the stream after "
        f"{stream_after:.1f} s (--jupyterhub-recheck 10)"
    )
    # The owner's socket is still open and served: it hears the others leave.
    await owner.until(lambda m: not {shared.id, via_group.id} & owner.members.keys())
    async with websockets.connect(
        ws_url(hub, f"/rooms/{ROOM}"), additional_headers={"Authorization": f"token {bob}"}
    ) as ws:
        assert (await closed(ws, 10))[0] == 4403  # and bob cannot come back
    await owner.close()


def hub_login(hub: JupyterHub, http: httpx.Client, user: str) -> None:
    """Log in at the hub's login page, as a browser does."""
    page = http.get(f"{hub.url}/hub/login")
    found = re.search(r'name="_xsrf"\s+value="([^"]+)"', page.text)
    assert found, "the hub's login form has an _xsrf field"
    form = {"username": user, "password": PASSWORD, "_xsrf": found.group(1)}
    # Not on to the hub's home (it would start alice's server): the cookie is enough.
    response = http.post(f"{hub.url}/hub/login", data=form, follow_redirects=False)
    assert response.status_code == 302, response.text[:300]


@pytest.fixture
def browser_of_alice(hub: JupyterHub) -> Iterator[httpx.Client]:
    with httpx.Client(follow_redirects=True, timeout=30) as http:
        hub_login(hub, http, "alice")
        yield http


async def test_a_browser_logs_in_with_the_hub_and_its_cookie_opens_its_pages_not_its_sockets(
    hub: JupyterHub, browser_of_alice: httpx.Client
) -> None:
    http = browser_of_alice
    # presence's page sends a browser without its cookie to the hub's OAuth, and back.
    page = http.get(f"{hub.presence}/")
    assert page.status_code == 200 and 'src="static/demo.js"' in page.text
    hops = [str(r.url.path) for r in page.history]
    assert "/hub/api/oauth2/authorize" in hops and "/services/presence/oauth_callback" in hops
    cookie = http.cookies.get("service-presence")
    assert cookie, "the login left presence's cookie"
    headers = {"Cookie": f"service-presence={cookie}", "Origin": hub.url}
    # This hub serves every user's pages on its one origin: a page of another user's
    # server sends this cookie too, so WebSockets do not take it (4403, on both
    # endpoints); the same token sent by the page itself opens alice's rooms.
    for path in ("/rooms/alice/:scratch", "/yjs/alice/:scratch"):
        async with websockets.connect(ws_url(hub, path), additional_headers=headers) as ws:
            code, reason = await closed(ws, 10)
            assert (code, reason) == (
                4403,
                "this service takes no login cookie on WebSockets: send a hub token",
            )
    bearer = {"Authorization": f"Bearer {cookie}", "Origin": hub.url}
    async with websockets.connect(
        ws_url(hub, "/rooms/alice/:scratch"), additional_headers=bearer
    ) as ws:
        welcome = orjson.loads(await ws.recv())
        assert welcome["you"]["user"]["name"] == "alice"
    # A page on another origin cannot use the browser's cookie.
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(
            ws_url(hub, "/rooms/alice/:scratch"),
            additional_headers={**headers, "Origin": "http://evil.example"},
        )
    assert info.value.response.status_code == 403
    # Someone else's server stays closed to alice's token.
    async with websockets.connect(
        ws_url(hub, "/rooms/carol/:scratch"), additional_headers=bearer
    ) as ws:
        assert (await closed(ws, 10))[0] == 4403
    # The views take the cookie from a person opening them, not from a page's script
    # (other users' servers serve pages of the hub's origin too).
    view = f"{hub.presence}/rooms/alice/:scratch"
    assert http.get(view, headers={"Sec-Fetch-Mode": "navigate"}).status_code == 200
    assert http.get(view, headers={"Sec-Fetch-Mode": "cors"}).status_code == 401
    # A forged state is no login.
    forged = http.get(f"{hub.presence}/oauth_callback?code=x&state=y")
    assert forged.status_code == 400
    # A stale cookie (a token the hub no longer knows) is sent to log in again, not
    # given a page whose every socket would be refused.
    stale = httpx.get(f"{hub.presence}/", headers={"Cookie": "service-presence=stale"}, timeout=30)
    assert stale.status_code == 302
    assert "/hub/api/oauth2/authorize" in stale.headers["location"]


@pytest.fixture(scope="module")
def anonymous_hub() -> Iterator[JupyterHub]:
    hub = JupyterHub(anonymous=True).start()
    try:
        hub.api("POST", "/users", json={"usernames": ["alice", "bob"]})
        yield hub
    finally:
        hub.stop()


async def test_anonymous_hub_users_get_the_same_presence_name_every_time(
    anonymous_hub: JupyterHub,
) -> None:
    hub = anonymous_hub
    alice = hub.user_token("alice")
    first = await join(hub, alice)
    # Another token of the same user, in another room (in the same one it is "… 2").
    again = await join(hub, hub.user_token("alice"), "alice/:other")
    shown = first.user
    face = hub_face(SECRET, "alice")  # what the hub's post_auth_hook gives JupyterLab
    assert (shown["name"], shown["initials"], shown["color"]) == (
        face.name,
        face.initials,
        face.color,
    )
    assert "alice" not in orjson.dumps(shown).decode()
    assert again.user == shown
    yjs = await YClient.connect(
        ws_url(hub, f"/yjs/{ROOM}?access_token={alice}"), {"user": {"name": "alice"}}
    )
    await first.until(lambda m: f"y{yjs.id}" in first.members)
    member = first.members[f"y{yjs.id}"]  # alice's second connection: its claim hidden
    assert member["user"]["username"] == shown["username"]
    assert member["state"]["user"]["name"] == shown["name"]
    assert "alice" not in orjson.dumps(member).decode()
    for client in (first, again):
        await client.close()
    await yjs.close()
