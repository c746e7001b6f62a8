"""The demo page, the JS client and the cursor overlay in a real headless Chromium."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable

import jwt
import pytest
from playwright.async_api import Browser, Page, async_playwright

from harness.processes import SECRET
from presence.core.colors import PALETTE, contrast_ratio
from tests.conftest import ARTIFACTS, Server

pytestmark = pytest.mark.e2e

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
    # The pointer is where A put it, once there: it shows at A's first intermediate
    # position and glides (a 60 ms transition) to the next ones.
    deadline = time.monotonic() + 5
    while True:
        box = await cursor.bounding_box()
        board = await b.locator("#board").bounding_box()
        assert box is not None and board is not None
        offset = (box["x"] - board["x"], box["y"] - board["y"])
        if abs(offset[0] - 200) <= 2 and abs(offset[1] - 150) <= 2:
            break
        assert time.monotonic() < deadline, f"the pointer stays at {offset}, not (200, 150)"
        await asyncio.sleep(0.05)
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
            assert not overlaps(p, q), (p, q)
    await watcher.screenshot(path=str(ARTIFACTS / "browser-crowd.png"))


async def test_two_windows_on_the_readme_url_meet(browser: Browser, demo: Server) -> None:
    # Two windows (separate browser contexts: two people) on the URL the README gives.
    pages = []
    for _ in range(2):
        page = await (await browser.new_context()).new_page()
        await page.goto(f"{demo.http}/")
        await page.wait_for_function("window.presence && window.presence.status === 'open'")
        pages.append(page)
    a, b = pages
    assert await a.evaluate("presence.room") == await b.evaluate("presence.room") == "lobby"
    await b.wait_for_function("presence.members.size === 1", timeout=5000)
    assert await a.locator("#count").text_content() == "2"
    assert await a.locator("#link").input_value() == f"{demo.http}/"
    # A private room: a new, unguessable room, and a link to it that works.
    await a.locator("#new-room").click()
    await a.wait_for_function("window.presence && window.presence.status === 'open'")
    room = await a.evaluate("presence.room")
    assert room != "lobby" and len(room) >= 12
    link = await a.locator("#link").input_value()
    assert link == f"{demo.http}/?room={room}"
    await b.goto(link)
    await b.wait_for_function("presence.status === 'open' && presence.members.size === 1")


async def test_two_tabs_of_one_browser_are_told_apart(browser: Browser, demo: Server) -> None:
    # Tabs share localStorage, so both present the same identity token.
    context = await browser.new_context(viewport={"width": 1280, "height": 760})
    a = await context.new_page()
    await a.goto(f"{demo.http}/?room=tabs")
    await a.wait_for_function("window.presence && presence.status === 'open'")
    b = await context.new_page()
    await b.goto(f"{demo.http}/?room=tabs")
    await b.wait_for_function("window.presence && presence.status === 'open'")
    await a.wait_for_function("presence.members.size === 1", timeout=5000)
    a_user = await a.evaluate("presence.me.user")
    b_user = await b.evaluate("presence.me.user")
    assert a_user["username"] == b_user["username"]  # one person
    assert b_user["name"] == a_user["name"] + " 2"
    assert b_user["color"] != a_user["color"] and b_user["initials"] != a_user["initials"]
    # What each tab shows of the other: its avatar in the list, in its own colour.
    avatar = a.locator("#members li:not(:first-child) .avatar")
    assert await avatar.text_content() == b_user["initials"]
    shown = await avatar.evaluate("e => getComputedStyle(e).backgroundColor")
    assert rgb(shown) == rgb_of_hex(b_user["color"])
    await move(b, 220, 160)
    cursor = a.locator(f'.presence-cursor[data-member="{await b.evaluate("presence.me.id")}"]')
    await cursor.wait_for(state="visible", timeout=5000)
    fill = await cursor.locator(".presence-fill").evaluate("e => getComputedStyle(e).fill")
    assert rgb(fill) == rgb_of_hex(b_user["color"])


# A forward selection over a whole paragraph (the caret at its end, the line above it
# selected), the same one backward (caret at its start, the line below selected), and the
# end of the first paragraph (the caret at the right edge of a line).
SELECTIONS = {
    "forward paragraph": ("Open this page", "in the room.", "forward"),
    "backward paragraph": ("Open this page", "in the room.", "backward"),
    "line end": ("who is here", "selection are.", "forward"),
}


@pytest.mark.parametrize("case", list(SELECTIONS))
async def test_selection_label_is_whole_and_off_the_selection(
    browser: Browser, demo: Server, case: str
) -> None:
    start, end, direction = SELECTIONS[case]
    a = await open_page(browser, demo, room=f"sel-{case.replace(' ', '-')}")
    b = await open_page(browser, demo, room=f"sel-{case.replace(' ', '-')}")
    b_id = (await me(b))["id"]
    await b.locator("#notes").focus()
    await b.evaluate(
        "([s, e, d]) => { const t = document.querySelector('#notes');"
        " const from = t.value.indexOf(s); const to = t.value.indexOf(e) + e.length;"
        " t.setSelectionRange(from, to, d); }",
        [start, end, direction],
    )
    mirror = a.locator(f'.presence-mirror[data-member="{b_id}"]')
    await mirror.locator("mark").wait_for(state="attached", timeout=5000)
    await a.wait_for_timeout(100)  # a frame for the layout
    label = await mirror.locator(".presence-label").bounding_box()
    inner = await a.evaluate(
        "() => { const t = document.querySelector('#notes'); const r = t.getBoundingClientRect();"
        " return {x: r.left + t.clientLeft, y: r.top + t.clientTop,"
        " width: t.clientWidth, height: t.clientHeight}; }"
    )
    marks = await mirror.locator("mark").evaluate(
        "m => [...m.getClientRects()].map(r => ({x: r.left, y: r.top, width: r.width,"
        " height: r.height}))"
    )
    await a.screenshot(path=str(ARTIFACTS / f"browser-selection-{case.replace(' ', '-')}.png"))
    assert label is not None and marks
    assert inner["x"] - 0.5 <= label["x"]
    assert label["x"] + label["width"] <= inner["x"] + inner["width"] + 0.5
    assert inner["y"] - 0.5 <= label["y"]
    assert label["y"] + label["height"] <= inner["y"] + inner["height"] + 0.5
    for r in marks:
        assert not overlaps(label, r), (case, label, r)


async def test_pointers_contrast_with_the_page(browser: Browser, demo: Server) -> None:
    page = await open_page(browser, demo, room="contrast")
    # One pointer in each palette colour, drawn by the overlay on the demo's board.
    count = await page.evaluate(
        """async (palette) => {
          const { CursorOverlay } = await import('/static/overlay.js');
          const fake = new EventTarget();
          fake.members = new Map(palette.map((color, i) => [`m${i}`, {
            id: `m${i}`, idle: false, state: { cursor: { x: 20 + 30 * i, y: 40 } },
            user: { name: color, initials: 'XX', color, text_color: '#000000' } }]));
          new CursorOverlay(fake, document.querySelector('#board'));
          await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
          return document.querySelectorAll('.presence-cursor').length;
        }""",
        list(PALETTE),
    )
    assert count == len(PALETTE)
    for background in ("white", "#1D2330"):
        if background != "white":
            await page.evaluate(
                "bg => { document.querySelector('#board').style.background = bg; }", background
            )
        board = rgb(
            await page.locator("#board").evaluate("e => getComputedStyle(e).backgroundColor")
        )
        for color in PALETTE:
            pointer = page.locator(f'.presence-cursor:has(.presence-label[title="{color}"])')
            rings = await pointer.evaluate(
                "p => ['.presence-halo', '.presence-fill'].map(s =>"
                " getComputedStyle(p.querySelector(s)).stroke)"
            )
            best = max(contrast_ratio(hex_of(rgb(ring)), hex_of(board)) for ring in rings)
            assert best >= 3, (color, background, rings)
    await page.screenshot(path=str(ARTIFACTS / "browser-pointer-contrast.png"))


def rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(float(x)) for x in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
    return (r, g, b)


def rgb_of_hex(color: str) -> tuple[int, int, int]:
    return (int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16))


def hex_of(c: tuple[int, int, int]) -> str:
    return "#{:02X}{:02X}{:02X}".format(*c)


def overlaps(p: dict[str, float], q: dict[str, float]) -> bool:
    return (
        p["x"] < q["x"] + q["width"]
        and q["x"] < p["x"] + p["width"]
        and p["y"] < q["y"] + q["height"]
        and q["y"] < p["y"] + p["height"]
    )


async def test_the_client_fetches_a_new_room_token_when_its_own_expires(
    browser: Browser, server_factory: ServerFactory
) -> None:
    server = server_factory("--auth", "token", "--seed", "13")  # secret: harness SECRET
    page = await (await browser.new_context()).new_page()
    await page.goto(f"{server.http}/healthz")  # any page of the service's origin
    issued: list[float] = []

    def issue(room: str) -> str:  # what the application's backend does
        issued.append(time.monotonic())
        claims = {"room": room, "exp": int(time.time()) + 2}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    await page.expose_function("issueToken", issue)
    await page.evaluate(
        """async () => {
        const { PresenceClient } = await import("/static/presence.js");
        const watch = (client) => {
          client.closes = [];
          client.addEventListener("status", (e) => {
            if (e.detail.status === "closed") client.closes.push(e.detail.code);
          });
          return client;
        };
        window.client = watch(new PresenceClient("tokens", {
          accessToken: (room) => window.issueToken(room),
        }));
        window.refused = watch(new PresenceClient("tokens", {
          accessToken: "not-a-token", storageKey: "presence:other",
        }));
      }"""
    )
    await page.wait_for_function("client.status === 'open'")
    # Its token lasts 2 s: the server closes the socket with 4401 when it expires, and
    # the client asks for a new one and is back.
    await page.wait_for_function(
        "client.closes.includes(4401) && client.status === 'open'", timeout=15000
    )
    assert len(issued) >= 2
    # A token given as a string is refused once, and not tried again.
    assert await page.evaluate("[refused.status, refused.closes]") == ["closed", [4401]]
