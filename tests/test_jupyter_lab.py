"""End to end in a real JupyterLab with jupyter-collaboration, in a real Chromium.

Two people open one notebook; each sees the other's cursor flag with a presence identity
(name and colour from /api/me); when one of them closes the tab or their browser dies,
the cursor goes from the other's screen at once, and from the mirrored presence room.
One Lab process serves the tests of this module; a stock Lab (the extension disabled)
measures the ghost this fixes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from playwright.async_api import Browser, Page, Playwright, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeout

from harness.processes import ARTIFACTS, SECRET, Server
from tests.jupyter_helpers import TOKEN, Jupyter, start_jupyter
from tests.test_browser import CHROMIUM_FLAGS, chromium, rgb, rgb_of_hex

pytestmark = pytest.mark.e2e

SCOPE = "lab-test"
NOTEBOOK = {
    # No kernelspec: the Lab asks for a kernel only once per page (dismissed below).
    "cells": [
        {
            "cell_type": "code",
            "source": "x = 1\ny = 2\n",
            "metadata": {},
            "outputs": [],
            "execution_count": None,
        }
    ],
    "metadata": {},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def start_lab(root: Path, *args: str) -> Jupyter:
    lab = start_jupyter(root, *args, app="jupyterlab")
    (root / "work" / "shared.ipynb").write_text(json.dumps(NOTEBOOK))
    return lab


@pytest.fixture(scope="module")
def presence_service() -> Iterator[Server]:
    server = Server(["--seed", "3"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, presence_service: Server) -> Iterator[Jupyter]:
    lab = start_lab(
        tmp_path_factory.mktemp("lab"),
        "--ServerApp.jpserver_extensions=presence.jupyter=True",
        "--ServerApp.identity_provider_class=presence.jupyter.PresenceIdentityProvider",
        f"--PresenceIdentityProvider.url={presence_service.http}",
        f"--PresenceIdentityProvider.secret={SECRET}",  # the service's (harness.processes)
        f"--PresenceJupyter.url={presence_service.http}",
        f"--PresenceJupyter.scope={SCOPE}",
    )
    yield lab
    lab.stop()


@pytest.fixture
async def pw() -> AsyncIterator[Playwright]:
    async with async_playwright() as p:
        yield p


async def launch(pw: Playwright, tag: str = "") -> Browser:
    # The tag marks this browser's processes, so that a test can kill them.
    flags = [*CHROMIUM_FLAGS, f"--presence-test={tag}"] if tag else CHROMIUM_FLAGS
    return await pw.chromium.launch(executable_path=chromium(), args=flags)


async def open_notebook(browser: Browser, lab: Jupyter) -> Page:
    context = await browser.new_context(viewport={"width": 1200, "height": 800})
    page = await context.new_page()
    await page.goto(f"{lab.http}/lab/tree/shared.ipynb?token={TOKEN}")
    await notebook_shown(page)
    return page


async def notebook_shown(page: Page) -> None:
    """Wait for the notebook's first cell; dismiss the kernel dialog of a notebook that
    names no kernel."""
    await page.locator(".jp-Notebook .jp-Cell .cm-content").first.wait_for(timeout=90_000)
    dialog = page.locator(".jp-Dialog")
    try:
        await dialog.wait_for(timeout=3000)
        await page.keyboard.press("Escape")
        await dialog.wait_for(state="detached")
    except PlaywrightTimeout:
        pass


async def put_cursor(page: Page) -> dict[str, str]:
    """Place the caret in the first cell; returns this page's /api/me identity."""
    await page.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
    await page.keyboard.press("End")
    me: dict[str, str] = (await page.evaluate("fetch('/api/me').then(r => r.json())"))["identity"]
    return me


async def cursor_gone(page: Page, since: float, limit: float = 60) -> float:
    await page.locator(".jp-remote-cursor").first.wait_for(state="detached", timeout=limit * 1000)
    return time.monotonic() - since


async def members(service: Server, room: str) -> list[str]:
    async with httpx.AsyncClient() as http:
        body = (await http.get(f"{service.http}/rooms/{SCOPE}:{room}")).json()
    return [m["user"]["name"] for m in body["members"]]


async def until(predicate, timeout: float = 10, since: float | None = None) -> float:  # type: ignore[no-untyped-def]
    """Seconds until ``predicate`` holds, counted from ``since`` (default: now)."""
    started = time.monotonic() if since is None else since
    while not await predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_cursor_flag_shows_presence_identity_and_leaves_with_the_tab(
    pw: Playwright, lab: Jupyter, presence_service: Server
) -> None:
    browser = await launch(pw)
    a = await open_notebook(browser, lab)
    b = await open_notebook(browser, lab)
    a_me = await put_cursor(a)
    b_me = await put_cursor(b)
    assert a_me["color"] and b_me["color"] and a_me["color"] != b_me["color"]
    assert a_me["name"] != b_me["name"] and a_me["initials"] != b_me["initials"]
    # B sees A's caret and flag, in A's presence name and colour.
    flag = b.locator(".jp-remote-userFlag-name").first
    await flag.wait_for(state="attached", timeout=20_000)
    assert await flag.text_content() == a_me["name"]
    caret = await b.locator(".jp-remote-cursor").first.evaluate(
        "e => getComputedStyle(e).borderLeftColor"
    )
    assert rgb(caret) == rgb_of_hex(a_me["color"])
    await b.screenshot(path=str(ARTIFACTS / "jupyterlab-remote-cursor.png"))
    # The identities came from the presence service, not from the fallback.
    assert "identities made by this server" not in lab.output()
    # Both are in the mirrored presence room.
    room, _ = lab.session("shared.ipynb")
    await until(lambda: _has(presence_service, room, {a_me["name"], b_me["name"]}))
    # A closes the tab: gone from B's screen and from presence at once.
    closed = time.monotonic()
    await a.context.close()
    await gone_everywhere("tab closed", b, presence_service, room, a_me["name"], closed)
    await browser.close()


async def gone_everywhere(
    what: str, watcher: Page, service: Server, room: str, name: str, since: float
) -> None:
    """The collaborator left the watcher's screen and the presence room within 1 s of
    ``since``; both measured from that moment, side by side."""
    on_screen, in_presence = await asyncio.gather(
        cursor_gone(watcher, since),
        until(lambda: _lacks(service, room, name), 30, since=since),
    )
    print(
        f"\n{what}: cursor gone from the other screen after {on_screen:.2f} s, "
        f"from presence after {in_presence:.2f} s"
    )
    assert on_screen < 1.0
    assert in_presence < 1.0


async def _has(service: Server, room: str, names: set[str]) -> bool:
    return names <= set(await members(service, room))


async def _lacks(service: Server, room: str, name: str) -> bool:
    return name not in await members(service, room)


def kill_browser(tag: str) -> None:
    """SIGKILL every process of the Chromium that was launched with ``tag``."""
    marked = [
        p
        for p in psutil.process_iter(["cmdline"])
        if f"--presence-test={tag}" in (p.info["cmdline"] or [])
    ]
    assert marked, "no browser process to kill"
    victims = {p.pid: p for p in marked}
    for p in marked:
        for child in p.children(recursive=True):
            victims[child.pid] = child
    for p in victims.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


async def test_killed_browser_leaves_no_ghost(
    pw: Playwright, lab: Jupyter, presence_service: Server
) -> None:
    tag = uuid.uuid4().hex[:12]
    victim = await launch(pw, tag)
    watcher = await launch(pw)
    a = await open_notebook(victim, lab)
    b = await open_notebook(watcher, lab)
    a_me = await put_cursor(a)
    await put_cursor(b)
    await b.locator(".jp-remote-cursor").first.wait_for(state="attached", timeout=20_000)
    room, _ = lab.session("shared.ipynb")
    await until(lambda: _has(presence_service, room, {a_me["name"]}))
    killed = time.monotonic()
    kill_browser(tag)
    await gone_everywhere("browser killed", b, presence_service, room, a_me["name"], killed)
    await watcher.close()


async def test_stock_jupyter_collaboration_keeps_the_ghost(pw: Playwright, tmp_path: Path) -> None:
    """The same steps with the extension disabled: what the extension fixes."""
    stock = start_lab(tmp_path, "--ServerApp.jpserver_extensions=presence.jupyter=False")
    try:
        browser = await launch(pw)
        a = await open_notebook(browser, stock)
        b = await open_notebook(browser, stock)
        await put_cursor(a)
        await put_cursor(b)
        await b.locator(".jp-remote-cursor").first.wait_for(state="attached", timeout=20_000)
        closed = time.monotonic()
        await a.context.close()
        ghost = await cursor_gone(b, closed, limit=60)
        print(f"\nstock: cursor gone from the other screen after {ghost:.2f} s")
        assert ghost > 5  # y-protocols' 30 s timeout, give or take the renewal phase
        await browser.close()
    finally:
        stock.stop()
