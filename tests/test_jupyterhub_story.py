"""The whole story on a real JupyterHub, as its users live it.

A real hub (harness/jupyterhub.py) runs deploy/jupyterhub/jupyterhub_config.py, the
configuration docs/jupyter.md gives admins, with presence as its service and real
single-user JupyterLab servers with presence's extensions (this checkout's editable
install). alice shares her notebook from JupyterLab (Share -> Share with collaborators…,
Copy); bob opens the link, accepts and lands in her notebook; both see each other's
cursor under an anonymous name with readable initials; the presence service lists both
in alice's room; carol is refused everywhere; bob's closed tab leaves no ghost; alice's
dialog lists bob and she revokes him there: his socket closes, his edits stop reaching
her and his reload is refused. On a hub that does not let users share, the dialog says
what to ask the admin for.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
import websockets
from playwright.async_api import Browser, Page, async_playwright

from harness.jupyterhub import PASSWORD, JupyterHub
from harness.processes import ARTIFACTS
from presence.core.colors import WHITE, contrast_ratio
from presence.yjs import codec as yjs
from tests.test_access_jupyterhub import closed, ws_url
from tests.test_jupyter_lab import NOTEBOOK, launch, notebook_shown

pytestmark = pytest.mark.e2e

LAB_ROOM = "alice/:JupyterLab:globalAwareness"


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def start_alices_server(hub: JupyterHub) -> None:
    """With shared.ipynb in her home."""
    home = hub.dir / "home" / "alice"
    home.mkdir(parents=True, exist_ok=True)
    (home / "shared.ipynb").write_text(json.dumps(NOTEBOOK))
    hub.api("POST", "/users/alice/server")
    wait_for(
        lambda: (hub.api("GET", "/users/alice").json()["servers"].get("") or {}).get("ready"),
        90,
        "alice's server ready",
    )


@pytest.fixture(scope="module")
def hub() -> Iterator[JupyterHub]:
    hub = JupyterHub(anonymous=True).start()
    try:
        hub.api("POST", "/users", json={"usernames": ["alice", "bob", "carol"]})
        start_alices_server(hub)
        yield hub
    finally:
        hub.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await launch(pw)
        yield browser
        await browser.close()


class Person:
    """A browser context logged in to the hub; records the awareness it receives."""

    def __init__(self, name: str, page: Page) -> None:
        self.name = name
        self.page = page
        self.states: list[dict[str, Any]] = []
        page.on("websocket", self._socket)

    def _socket(self, ws: Any) -> None:
        ws.on("framereceived", self._frame)

    def _frame(self, payload: str | bytes) -> None:
        if isinstance(payload, str) or not payload or payload[0] != 1:  # awareness
            return
        try:
            update = yjs.read_message(payload)[1]
            for entry in yjs.read_awareness(update):
                state = orjson.loads(entry.state)
                if isinstance(state, dict):
                    self.states.append(state)
        except (yjs.MalformedMessage, orjson.JSONDecodeError):
            pass


async def log_in(browser: Browser, hub: JupyterHub, user: str) -> Person:
    context = await browser.new_context(
        viewport={"width": 1200, "height": 800},
        permissions=["clipboard-read", "clipboard-write"],  # Copy, as a user pastes it
    )
    page = await context.new_page()
    person = Person(user, page)
    await page.goto(f"{hub.url}/hub/login?next=/hub/home")
    await page.fill("#username_input", user)
    await page.fill("#password_input", PASSWORD)
    await page.click("#login_submit")
    await page.wait_for_url("**/hub/home")
    return person


async def open_notebook(page: Page, hub: JupyterHub) -> None:
    if "/lab/tree/shared.ipynb" not in page.url:
        await page.goto(f"{hub.url}/user/alice/lab/tree/shared.ipynb")
    await notebook_shown(page)


async def open_share_dialog(page: Page) -> Any:
    """Share -> Share with collaborators…, as a user finds it in JupyterLab's menu bar."""
    await page.locator(".lm-MenuBar-itemLabel", has_text="Share").click()
    await page.locator(".lm-Menu-itemLabel", has_text="Share with collaborators…").click()
    dialog = page.locator(".jp-Dialog", has=page.locator(".jp-PresenceShare"))
    await dialog.wait_for()
    return dialog


async def close_dialog(dialog: Any) -> None:
    await dialog.locator(".jp-Dialog-footer button", has_text="Close").click()
    await dialog.wait_for(state="detached")


async def share_link(page: Page) -> str:
    """alice makes a link in the dialog (default expiry) and copies it."""
    dialog = await open_share_dialog(page)
    assert await dialog.locator(".jp-PresenceShare-expiry").input_value() == "86400"
    await dialog.locator("button", has_text="Create link").click()
    url = dialog.locator(".jp-PresenceShare-url")
    await url.wait_for(state="visible")
    await dialog.locator("button", has_text="Copy").click()
    copied: str = await page.evaluate("navigator.clipboard.readText()")
    assert copied == await url.input_value()
    note = await dialog.locator(".jp-PresenceShare-note").text_content()
    assert "land in shared.ipynb" in str(note), note
    await close_dialog(dialog)
    return copied


async def sharing_api(page: Page, method: str, path: str = "", xsrf: bool = True) -> Any:
    """The sharing endpoint of alice's server, called from ``page`` with its cookies."""
    result = await page.evaluate(
        """async ([method, url, xsrf]) => {
            const headers = {'Content-Type': 'application/json'};
            const token = (document.cookie.match(/_xsrf=([^;]+)/) || [])[1];
            if (xsrf && token) headers['X-XSRFToken'] = token;
            const r = await fetch(url, {method, headers, credentials: 'same-origin',
                body: method === 'POST' ? '{}' : undefined});
            let body = null;
            try { body = await r.json(); } catch (e) {}
            return {status: r.status, body};
        }""",
        [method, f"/user/alice/presence/sharing{path}", xsrf],
    )
    return result


async def put_cursor(page: Page) -> dict[str, str]:
    await page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
    await page.keyboard.press("End")
    # As JupyterLab asks: cookie-authenticated fetches carry the XSRF token on a hub.
    me = await page.evaluate(
        """fetch(location.pathname.split('/lab')[0] + '/api/me', {headers: {
            'X-XSRFToken': (document.cookie.match(/_xsrf=([^;]+)/) || [])[1]}})
        .then(r => r.json())"""
    )
    assert "identity" in me, me
    identity: dict[str, str] = me["identity"]
    return identity


async def flag_of_other(page: Page) -> dict[str, Any]:
    """The remote cursor flag on ``page``: its name (and whether it is cut), and its
    avatar's initials with their colours as drawn."""
    name = page.locator(".jp-remote-userFlag-name").first
    await name.wait_for(state="attached", timeout=30_000)
    result: dict[str, Any] = await name.evaluate(
        """e => {
            const avatar = e.closest('.jp-remote-userFlag')
                .querySelector('.jp-remote-userFlag-avatar');
            return {
                text: e.textContent,
                initials: avatar.textContent,
                color: getComputedStyle(avatar).color,
                background: getComputedStyle(avatar).backgroundColor,
                cut: e.scrollWidth > e.clientWidth + 1,
            };
        }"""
    )
    return result


def hex_of(css: str) -> str:
    parts = css[css.index("(") + 1 : css.index(")")].split(",")
    r, g, b = (int(float(p)) for p in parts[:3])
    return f"#{r:02X}{g:02X}{b:02X}"


def names_in(states: list[dict[str, Any]]) -> str:
    return orjson.dumps(states).decode().lower()


async def cell_text(page: Page) -> str:
    return str(await page.locator(".jp-Notebook .jp-Cell .cm-content").first.text_content())


async def test_share_collaborate_anonymously_leave_and_revoke(
    hub: JupyterHub, browser: Browser
) -> None:
    alice_token = hub.user_token("alice")
    alice = await log_in(browser, hub, "alice")
    await open_notebook(alice.page, hub)
    # alice shares her notebook from JupyterLab; the link lands on it.
    link = await share_link(alice.page)
    assert link.startswith(f"{hub.url}/hub/accept-share?code="), link
    assert "next=%2Fuser%2Falice%2Flab%2Ftree%2Fshared.ipynb" in link, link
    bob = await log_in(browser, hub, "bob")
    await bob.page.goto(link)
    await bob.page.click("button[type=submit]")
    # The hub asks a collaborator (not the owner) once to let alice's server know them.
    await bob.page.wait_for_url("**/hub/api/oauth2/authorize*")
    await bob.page.click("form button[type=submit], form input[type=submit]")
    await bob.page.locator(".jp-Notebook .jp-Cell .cm-content").first.wait_for(timeout=90_000)
    assert "/user/alice/lab/tree/shared.ipynb" in bob.page.url
    await open_notebook(bob.page, hub)
    # bob, now a collaborator, cannot share nor revoke alice's server; and a request
    # that a cookie authenticates needs the XSRF token.
    assert await bob.page.locator(".lm-MenuBar-itemLabel", has_text="Share").count() == 0
    refused = await sharing_api(bob.page, "GET")
    assert refused["status"] == 403 and refused["body"]["reason"] == "not_owner", refused
    refused = await sharing_api(bob.page, "POST", "/codes")
    assert refused["status"] == 403 and refused["body"]["reason"] == "not_owner", refused
    forged = await sharing_api(alice.page, "POST", "/codes", xsrf=False)
    assert forged["status"] == 403 and "_xsrf" in forged["body"]["message"], forged

    a_me, b_me = await put_cursor(alice.page), await put_cursor(bob.page)
    # Anonymous names, from the hub's faces, distinct.
    for me, hub_name in ((a_me, "alice"), (b_me, "bob")):
        assert hub_name not in orjson.dumps(me).decode().lower(), me
    assert a_me["name"] != b_me["name"] and a_me["initials"] != b_me["initials"]
    assert a_me["color"] != b_me["color"]
    seen_by_alice, seen_by_bob = await flag_of_other(alice.page), await flag_of_other(bob.page)
    assert seen_by_alice["text"] == b_me["name"] and seen_by_bob["text"] == a_me["name"]
    assert seen_by_alice["initials"] == b_me["initials"]
    assert hex_of(seen_by_alice["background"]) == b_me["color"].upper()
    for flag in (seen_by_alice, seen_by_bob):
        ratio = contrast_ratio(hex_of(flag["color"]), hex_of(flag["background"]))
        assert ratio >= 4.5, flag
        assert not flag["cut"], f"the flag cuts {flag['text']!r}"
    print(
        f"\nflags: {seen_by_alice['text']!r} ({seen_by_alice['initials']} in "
        f"{hex_of(seen_by_alice['color'])} on {hex_of(seen_by_alice['background'])}, "
        f"{contrast_ratio(WHITE, b_me['color']):.2f}:1), {seen_by_bob['text']!r} "
        f"({seen_by_bob['initials']} on {hex_of(seen_by_bob['background'])}, "
        f"{contrast_ratio(WHITE, a_me['color']):.2f}:1)"
    )
    # No hub name in any awareness state either browser received.
    assert "bob" not in names_in(alice.states) and "alice" not in names_in(alice.states)
    assert "alice" not in names_in(bob.states) and "bob" not in names_in(bob.states)
    assert alice.states and bob.states

    # The presence service's view of alice's server's Lab-wide room lists both.
    async with httpx.AsyncClient(base_url=hub.presence, timeout=30) as http:
        headers = {"Authorization": f"token {alice_token}"}

        async def listed() -> set[str]:
            got = await http.get(f"/rooms/{LAB_ROOM}", headers=headers)
            assert got.status_code == 200, got.text
            return {m["state"].get("user", {}).get("name") for m in got.json()["members"]}

        deadline = time.monotonic() + 30
        while not {a_me["name"], b_me["name"]} <= await listed():
            assert time.monotonic() < deadline, await listed()
            await asyncio.sleep(0.2)

        # carol: refused by alice's server and by presence.
        carol_token = hub.user_token("carol")
        refused = await http.get(
            f"{hub.url}/user/alice/api/contents", headers={"Authorization": f"token {carol_token}"}
        )
        assert refused.status_code == 403
        view = await http.get(
            f"/rooms/{LAB_ROOM}", headers={"Authorization": f"token {carol_token}"}
        )
        assert view.status_code == 403
    async with websockets.connect(
        ws_url(hub, f"/yjs/{LAB_ROOM}"),
        additional_headers={"Authorization": f"token {carol_token}"},
    ) as ws:
        assert (await closed(ws, 10))[0] == 4403

    # bob closes his tab: his cursor leaves alice's screen at once.
    gone = time.monotonic()
    await bob.page.close()
    await alice.page.locator(".jp-remote-cursor").first.wait_for(state="detached", timeout=30_000)
    ghost = time.monotonic() - gone
    print(f"bob's tab closed: his cursor left alice's screen after {ghost:.2f} s")
    assert ghost < 1.0

    # bob comes back and types; alice revokes him.
    bob_page = await bob.page.context.new_page()
    closings: list[tuple[str, float]] = []
    bob_page.on(
        "websocket",
        lambda ws: ws.on("close", lambda _: closings.append((ws.url, time.monotonic()))),
    )
    await open_notebook(bob_page, hub)
    await put_cursor(bob_page)
    typing = True

    async def type_forever() -> None:
        while typing:
            try:
                await bob_page.keyboard.type("b")
            except Exception:
                return
            await asyncio.sleep(0.25)

    typist = asyncio.create_task(type_forever())
    start = await cell_text(alice.page)
    last_text, last_change = start, time.monotonic()
    while last_text == start:  # bob's edits reach alice
        await asyncio.sleep(0.1)
        last_text = await cell_text(alice.page)
        assert time.monotonic() - last_change < 30, "bob's edits never reached alice"
    # alice's dialog lists bob (and the link, used once); she revokes him there.
    dialog = await open_share_dialog(alice.page)
    bob_row = dialog.locator(".jp-PresenceShare-share[data-name=bob]")
    await bob_row.wait_for()
    assert "bob uses this server, since" in str(await bob_row.text_content())
    code_row = dialog.locator(".jp-PresenceShare-code")
    code_text = str(await code_row.first.text_content())
    assert "used once" in code_text and "expires tomorrow" in code_text, code_text
    ARTIFACTS.mkdir(exist_ok=True)
    await dialog.locator(".jp-Dialog-content").screenshot(path=ARTIFACTS / "share-dialog.png")
    await bob_row.locator("button", has_text="Revoke").click()
    revoked_at = last_change = time.monotonic()
    await bob_row.wait_for(state="detached")
    assert await dialog.locator(".jp-PresenceShare-error").is_hidden()
    # The link he used is still valid: the dialog says so, and alice revokes it too.
    warning = dialog.locator(".jp-PresenceShare-warning")
    await warning.wait_for(state="visible")
    assert "bob is out. A link that is still valid" in str(await warning.text_content())
    await code_row.first.locator("button", has_text="Revoke").click()
    await code_row.first.wait_for(state="detached")
    assert await warning.is_hidden()
    await close_dialog(dialog)
    while time.monotonic() - revoked_at < 10:
        text = await cell_text(alice.page)
        if text != last_text:
            last_text, last_change = text, time.monotonic()
        await asyncio.sleep(0.1)
    typing = False
    await typist
    reached = last_change - revoked_at
    print(f"alice revoked bob: his last edit reached her {reached:.1f} s after the revoke")
    assert reached < 8
    rooms = [at - revoked_at for url, at in closings if "/api/collaboration/room/" in url]
    assert rooms and 0 <= min(rooms) < 5, (closings, revoked_at)
    print(f"bob's collaboration socket closed {min(rooms):.2f} s after the revoke")
    assert "access of hub user bob to this server ended" in hub.output()
    # His reload is refused.
    response = await bob_page.goto(f"{hub.url}/user/alice/lab/tree/shared.ipynb")
    assert response is not None and response.status == 403, (response, bob_page.url)
    assert await bob_page.locator(".jp-Notebook").count() == 0
    # Nor can he come back with the link.
    again = await bob_page.goto(link)
    assert again is not None and again.status == 404, again
    assert "Share not found or expired" in await bob_page.content()
    # alice shares again: bob accepts a new link and is let in again, although the
    # hub's refusals of his tabs would be cached for 300 s.
    link = await share_link(alice.page)
    await bob_page.goto(link)
    accepted = time.monotonic()
    await bob_page.click("button[type=submit]")
    await bob_page.wait_for_load_state()
    while True:
        response = await bob_page.goto(f"{hub.url}/user/alice/lab/tree/shared.ipynb")
        if response is not None and response.status == 200:
            break
        assert time.monotonic() - accepted < 20, "bob was not let in again"
        await asyncio.sleep(0.5)
    print(f"bob accepted a new link: let in again {time.monotonic() - accepted:.1f} s later")
    await notebook_shown(bob_page)
    # alice was not disturbed: her edit still reaches her server (and its file).
    await alice.page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
    await alice.page.keyboard.press("End")
    await alice.page.keyboard.type("#owner")
    async with httpx.AsyncClient(timeout=30) as http:
        deadline = time.monotonic() + 30
        while True:
            saved = await http.get(
                f"{hub.url}/user/alice/api/contents/shared.ipynb",
                headers={"Authorization": f"token {alice_token}"},
            )
            assert saved.status_code == 200, saved.text
            if "#owner" in orjson.dumps(saved.json()["content"]).decode():
                break
            assert time.monotonic() < deadline, "alice's edit never reached her server"
            await asyncio.sleep(0.5)


# The deployed configuration, less the users' right to share.
WITHOUT_SHARING = """
c.JupyterHub.load_roles[0]["scopes"].remove("shares!user")
"""


async def test_a_hub_that_does_not_let_users_share_says_what_to_ask_for(
    browser: Browser,
) -> None:
    hub = JupyterHub(anonymous=True, config=WITHOUT_SHARING).start()
    try:
        hub.api("POST", "/users", json={"usernames": ["alice"]})
        start_alices_server(hub)
        alice = await log_in(browser, hub, "alice")
        await alice.page.goto(f"{hub.url}/user/alice/lab")
        await alice.page.locator(".jp-DirListing-content").wait_for(timeout=90_000)
        dialog = await open_share_dialog(alice.page)
        error = dialog.locator(".jp-PresenceShare-error")
        await error.wait_for(state="visible")
        assert await error.get_attribute("data-reason") == "sharing_not_allowed"
        text = str(await error.text_content())
        print(f"\nthe dialog says: {text}")
        assert "does not let you share" in text and "shares!user" in text, text
        assert await dialog.locator("button", has_text="Create link").is_disabled()
        await close_dialog(dialog)
        # Nothing else broke: JupyterLab goes on (her notebook opens from the file browser).
        await alice.page.locator(".jp-DirListing-item", has_text="shared.ipynb").dblclick()
        await notebook_shown(alice.page)
        assert await alice.page.locator(".jp-PresenceShare").count() == 0
        assert "Traceback" not in hub.output()
    finally:
        hub.stop()
