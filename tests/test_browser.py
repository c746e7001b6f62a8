"""The demo page, the JS client and the cursor overlay in a real headless Chromium."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.conftest import ARTIFACTS, Server

ServerFactory = Callable[..., Server]
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("Chromium is missing: run scripts/install-test-deps.sh")
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        yield browser
        await browser.close()


@pytest.fixture
def demo(server_factory: ServerFactory) -> Server:
    return server_factory("--idle-after", "1", "--seed", "11")


async def open_page(browser: Browser, server: Server, room: str = "demo") -> Page:
    page = await (await browser.new_context(viewport={"width": 1280, "height": 760})).new_page()
    await page.goto(f"{server.http}/?room={room}")
    await page.wait_for_function("window.presence && window.presence.status === 'open'")
    return page


async def me(page: Page) -> dict[str, str]:
    result: dict[str, str] = await page.evaluate(
        "() => ({id: presence.me.id, name: presence.me.user.name, color: presence.me.user.color})"
    )
    return result


async def move(page: Page, x: float, y: float) -> None:
    box = await page.locator("#board").bounding_box()
    assert box is not None
    await page.mouse.move(box["x"] + x, box["y"] + y, steps=4)


async def test_cursor_label_fades_and_leaves(browser: Browser, demo: Server) -> None:
    a = await open_page(browser, demo)
    b = await open_page(browser, demo)
    a_me = await me(a)
    await move(a, 200, 150)
    cursor = b.locator(f'.presence-cursor[data-member="{a_me["id"]}"]')
    await cursor.wait_for(state="visible", timeout=5000)
    assert await cursor.locator(".presence-name").text_content() == a_me["name"]
    label = cursor.locator(".presence-label")
    assert await label.evaluate("e => getComputedStyle(e).backgroundColor") != ""
    # The pointer is where A put it.
    box = await cursor.bounding_box()
    board = await b.locator("#board").bounding_box()
    assert box is not None and board is not None
    assert abs(box["x"] - board["x"] - 200) <= 2 and abs(box["y"] - board["y"] - 150) <= 2
    await b.screenshot(path=str(ARTIFACTS / "browser-cursor.png"))
    # A stops: after idle_after (1 s here) the label fades out, the pointer stays.
    await b.wait_for_function(
        "id => { const l = document.querySelector(`.presence-cursor[data-member='${id}'] "
        ".presence-label`); return l && getComputedStyle(l).opacity === '0'; }",
        arg=a_me["id"],
        timeout=5000,
    )
    assert await cursor.is_visible()
    await b.screenshot(path=str(ARTIFACTS / "browser-idle.png"))
    # A moves again: the label is back.
    await move(a, 260, 190)
    await b.wait_for_function(
        "id => { const l = document.querySelector(`.presence-cursor[data-member='${id}'] "
        ".presence-label`); return l && getComputedStyle(l).opacity === '1'; }",
        arg=a_me["id"],
        timeout=5000,
    )
    # A closes its page: its cursor disappears on B.
    await a.context.close()
    await cursor.wait_for(state="detached", timeout=5000)
    await b.locator(f'#members li[data-member="{a_me["id"]}"]').wait_for(state="detached")


async def test_reload_keeps_name_and_colour(browser: Browser, demo: Server) -> None:
    a = await open_page(browser, demo)
    b = await open_page(browser, demo)
    before = await me(a)
    await a.reload()
    await a.wait_for_function("window.presence && window.presence.status === 'open'")
    # The old connection may still be leaving: the name settles within a moment.
    await a.wait_for_function(
        "name => presence.me.user.name === name", arg=before["name"], timeout=5000
    )
    after = await me(a)
    assert (after["name"], after["color"]) == (before["name"], before["color"])
    assert await a.locator("#me").get_attribute("data-name") == before["name"]
    # B sees A once, under the same name.
    await b.wait_for_function(
        "name => [...presence.members.values()].filter(m => m.user.name === name).length === 1",
        arg=before["name"],
        timeout=5000,
    )


async def test_selection_in_the_notes_is_shown_to_others(browser: Browser, demo: Server) -> None:
    a = await open_page(browser, demo)
    b = await open_page(browser, demo)
    b_me = await me(b)
    await b.locator("#notes").focus()
    await b.evaluate("() => document.querySelector('#notes').setSelectionRange(20, 60)")
    mark = a.locator(f'.presence-mirror[data-member="{b_me["id"]}"] mark')
    await mark.wait_for(state="attached", timeout=5000)
    text = await a.evaluate("() => document.querySelector('#notes').value.slice(20, 60)")
    assert await mark.text_content() == text
    await a.screenshot(path=str(ARTIFACTS / "browser-selection.png"))


async def test_labels_of_a_crowd_do_not_pile_up(
    browser: Browser, server_factory: ServerFactory
) -> None:
    demo = server_factory("--seed", "12")  # labels stay visible (idle after 3 s)
    pages = [await open_page(browser, demo, room="crowd") for _ in range(5)]
    watcher = pages[0]
    for page in pages[1:]:
        await move(page, 300, 200)  # everyone points at the same spot
    await watcher.wait_for_function("document.querySelectorAll('.presence-cursor').length === 4")
    await asyncio.sleep(0.3)
    boxes = [
        await label.bounding_box()
        for label in await watcher.locator(".presence-cursor .presence-label").all()
    ]
    assert all(boxes)
    for i, p in enumerate(boxes):
        for q in boxes[i + 1 :]:
            assert p is not None and q is not None
            overlap = (
                p["x"] < q["x"] + q["width"]
                and q["x"] < p["x"] + p["width"]
                and p["y"] < q["y"] + q["height"]
                and q["y"] < p["y"] + p["height"]
            )
            assert not overlap, (p, q)
    await watcher.screenshot(path=str(ARTIFACTS / "browser-crowd.png"))
