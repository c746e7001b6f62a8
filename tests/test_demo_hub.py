"""The demo page when presence is a JupyterHub service (``--auth jupyterhub``), in a real
Chromium against a real hub (harness/jupyterhub.py): browsers log in through the hub's
login form and OAuth; a room that is not shared with the user, a share revoked and a
login revoked stop the page with the server's reason and the next step, without
reconnecting, and nobody stays listed whom the page no longer hears about."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import quote, urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright

from harness.jupyterhub import PASSWORD, JupyterHub
from harness.processes import ARTIFACTS, Server
from presence.access.jupyterhub import HubUser
from presence.config import Settings
from presence.server.app import create_app
from tests.test_browser import CHROMIUM_FLAGS, chromium

pytestmark = pytest.mark.e2e

HUB_NAMES = "You appear under your hub name"
ANONYMOUS_NAMES = "You get an anonymous name"


@pytest.fixture(scope="module")
def hub() -> Iterator[JupyterHub]:
    # Hub names (no --jupyterhub-anonymous), recheck 10 s. The lobby's sockets use the
    # login cookie: as on a hub with per-user subdomains.
    hub = JupyterHub("--jupyterhub-allow-websocket-cookie").start()
    try:
        hub.api("POST", "/users", json={"usernames": ["alice", "bob", "carol", "dave"]})
        yield hub
    finally:
        hub.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        yield browser
        await browser.close()


def on_presence_page(hub: JupyterHub) -> Callable[[str], bool]:
    front = urlsplit(hub.presence + "/").path
    return lambda url: urlsplit(url).path == front


async def open_as(
    browser: Browser, hub: JupyterHub, user: str, query: str = "", opened: list[str] | None = None
) -> Page:
    """A browser of ``user`` (its own context) on presence's page: presence sends it to
    the hub's OAuth, the hub to its login form, and back. ``opened`` collects the URLs of
    the WebSockets the page opens."""
    context = await browser.new_context(viewport={"width": 1280, "height": 760})
    page = await context.new_page()
    if opened is not None:
        page.on("websocket", lambda ws: opened.append(ws.url))
    await page.goto(f"{hub.presence}/{query}")
    await page.fill("#username_input", user)
    await page.fill("#password_input", PASSWORD)
    await page.click("#login_submit")
    await page.wait_for_url(on_presence_page(hub), timeout=30000)
    await page.wait_for_function("window.presence !== undefined")
    return page


async def listed(page: Page) -> list[str]:
    names: list[str] = await page.locator("#members .name").all_text_contents()
    return names


async def test_a_room_not_shared_with_the_user_says_so_and_is_not_retried(
    browser: Browser, hub: JupyterHub
) -> None:
    opened: list[str] = []
    carol = await open_as(browser, hub, "carol", "?room=alice/:lobby", opened)
    notice = carol.locator("#notice")
    await notice.wait_for(state="visible", timeout=15000)
    assert await notice.get_attribute("data-code") == "4403"
    text = await notice.inner_text()
    assert "the server alice/ is not shared with the hub user carol" in text  # the server's
    assert "ask the owner, alice, to share their server alice/ with you" in text
    assert await carol.locator("#status").get_attribute("data-status") == "stopped"
    assert await carol.locator("#status").text_content() == "not connected"
    # A way to her own room, and no "Log in": she is logged in.
    own = carol.locator("#notice a", has_text="your own server's lobby")
    assert await own.get_attribute("href") == "?room=carol/:lobby"
    assert await carol.locator("#notice a.login").count() == 0
    # No further attempts: the client gave up on 4403.
    await asyncio.sleep(4)
    assert len(opened) == 1 and opened[0].endswith("/rooms/alice%2F%3Alobby"), opened
    assert await carol.evaluate("[presence.status, presence.stopped.code]") == ["closed", 4403]
    assert await listed(carol) == []
    # Hub names here: the page does not promise an anonymous one.
    notes = await carol.locator("#notes").input_value()
    assert HUB_NAMES in notes and "anonymous" not in notes
    await carol.screenshot(path=str(ARTIFACTS / "demo-hub-not-shared.png"))
    # Her own lobby is hers: she gets in.
    async with carol.expect_navigation():
        await own.click()
    await carol.wait_for_function("window.presence && presence.status === 'open'")
    assert await carol.evaluate("presence.room") == "carol/:lobby"
    assert await listed(carol) == ["carol"]


async def test_revoked_share_and_login_stop_the_page_and_empty_its_room(
    browser: Browser, hub: JupyterHub
) -> None:
    # alice's page without a room: the lobby of her own default server.
    alice = await open_as(browser, hub, "alice")
    await alice.wait_for_function("presence.status === 'open'")
    assert await alice.evaluate("presence.room") == "alice/:lobby"
    assert await alice.locator("#room").text_content() == "alice/:lobby (your server's lobby)"
    assert await alice.locator("#me").get_attribute("data-name") == "alice"
    assert HUB_NAMES in await alice.locator("#notes").input_value()
    link = await alice.locator("#link").input_value()
    assert link == f"{hub.presence}/?room=alice/:lobby"  # names the room: it is hers

    # bob, with a share, follows her link and sees her, and her pointer.
    hub.api("POST", "/shares/alice/", json={"user": "bob"})
    bob_opened: list[str] = []
    bob = await open_as(browser, hub, "bob", "?" + link.split("?", 1)[1], bob_opened)
    await bob.wait_for_function("presence.status === 'open'")
    await bob.wait_for_function("presence.members.size === 1")
    assert sorted(await listed(bob)) == ["alice", "bob"]
    await alice.wait_for_function("[...presence.members.values()].some(m => m.user.name === 'bob')")
    box = await alice.locator("#board").bounding_box()
    assert box is not None
    await alice.mouse.move(box["x"] + 200, box["y"] + 150, steps=4)
    cursor = bob.locator(".presence-cursor")
    await cursor.wait_for(state="visible", timeout=5000)
    assert await cursor.locator(".presence-name").text_content() == "alice"

    # dave, on his own lobby, whose login (the token in presence's cookie) is revoked.
    dave = await open_as(browser, hub, "dave")
    await dave.wait_for_function("presence.status === 'open'")
    tokens = hub.api("GET", "/users/dave/tokens").json()["api_tokens"]
    logins = [t["id"] for t in tokens if t.get("oauth_client")]
    assert logins, tokens

    hub.api("DELETE", "/users/bob/shared/alice/")
    for token in logins:
        hub.api("DELETE", f"/users/dave/tokens/{token}")
    revoked = time.monotonic()

    async def stopped(page: Page, code: str) -> float:
        notice = page.locator("#notice")
        await notice.wait_for(state="visible", timeout=35000)
        assert await notice.get_attribute("data-code") == code
        return time.monotonic() - revoked

    bob_after, dave_after = await asyncio.gather(stopped(bob, "4403"), stopped(dave, "4401"))
    assert bob_after < 30 and dave_after < 30
    # bob: the server's words, the next step, and an empty room: no members, no pointers.
    text = await bob.locator("#notice").inner_text()
    assert "access revoked: the server alice/ is not shared with the hub user bob" in text
    assert "ask the owner, alice, to share their server alice/ with you" in text
    assert await listed(bob) == []
    assert await bob.locator("#count").text_content() == "0"
    assert await bob.evaluate("presence.members.size") == 0
    await cursor.wait_for(state="detached", timeout=5000)
    await bob.screenshot(path=str(ARTIFACTS / "demo-hub-revoked.png"))
    # alice's page no longer lists bob (the server's leave).
    await alice.wait_for_function(
        "![...presence.members.values()].some(m => m.user.name === 'bob')", timeout=5000
    )
    assert await listed(alice) == ["alice"]
    # dave: not logged in any more; the link logs him in again and brings him back.
    text = await dave.locator("#notice").inner_text()
    assert "access revoked: not a valid hub token" in text
    login = dave.locator("#notice a.login")
    assert await login.text_content() == "Log in"
    front = urlsplit(hub.presence).path + "/"
    assert await login.get_attribute("href") == f"{hub.presence}/login?next={quote(front, safe='')}"
    assert await listed(dave) == []
    # Neither page tried again.
    await asyncio.sleep(3)
    assert len(bob_opened) == 1, bob_opened
    # The hub still knows dave: OAuth again, without a form, and back.
    async with dave.expect_navigation(url=on_presence_page(hub), timeout=30000):
        await login.click()
    await dave.wait_for_function("window.presence && presence.status === 'open'")
    assert await listed(dave) == ["dave"]
    print(
        f"\nthe demo page stopped {bob_after:.1f} s after the share was revoked, "
        f"{dave_after:.1f} s after the login was (--jupyterhub-recheck 10)"
    )


# -- What the page is told, without a hub -------------------------------------------------


async def test_default_mode_promises_anonymous_names_and_stops_on_a_refusal(
    browser: Browser, server_factory: Callable[..., Server]
) -> None:
    server = server_factory("--seed", "14")
    page = await (await browser.new_context()).new_page()
    opened: list[str] = []
    page.on("websocket", lambda ws: opened.append(ws.url))
    await page.goto(f"{server.http}/")
    await page.wait_for_function("window.presence && presence.status === 'open'")
    assert await page.evaluate("document.body.dataset.names") == "anonymous"
    notes = await page.locator("#notes").input_value()
    assert ANONYMOUS_NAMES in notes and HUB_NAMES not in notes
    # A room name the server refuses (1008, a policy refusal): said, and not retried.
    await page.goto(f"{server.http}/?room=no%20spaces")
    await page.locator("#notice").wait_for(state="visible", timeout=5000)
    assert await page.locator("#notice").get_attribute("data-code") == "1008"
    assert "invalid room name" in await page.locator("#notice").inner_text()
    await asyncio.sleep(2)
    assert len(opened) == 2, opened


@pytest.mark.parametrize("anonymous", [False, True])
async def test_a_hub_page_is_told_its_user_and_whether_names_are_anonymous(
    monkeypatch: pytest.MonkeyPatch, anonymous: bool
) -> None:
    # In process, with a stand-in for the hub's answer (the real hub: the tests above).
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:1/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "service-token")
    settings = Settings(auth="jupyterhub", jupyterhub_anonymous=anonymous, secret="s" * 32)
    app = create_app(settings)
    hub_auth = app.state.access.jupyterhub
    assert hub_auth is not None

    async def user(token: str) -> HubUser:
        assert token == "alice-token"
        return HubUser('alice"<x>')  # escaped into the attribute

    monkeypatch.setattr(hub_auth, "user", user)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://presence") as http:
        page = await http.get("/", headers={"Cookie": "service-presence=alice-token"})
        assert page.status_code == 200
        names = "anonymous" if anonymous else "hub"
        assert (
            f'<body data-auth="jupyterhub" data-names="{names}" data-user="alice&quot;&lt;x&gt;">'
            in page.text
        )
        assert "private" in page.headers["cache-control"]
        assert (await http.get("/")).status_code == 302  # no login yet: off to the hub's
