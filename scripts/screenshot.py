"""Make docs/screenshot.png: the demo in two tabs of one browser, side by side.

    python scripts/screenshot.py        (with the test extra installed, and Chromium)

Both tabs open the README's URL (the default room) and share the browser's storage, so
they present one identity token: the picture shows that they still get two colours.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import sys
from pathlib import Path

from PIL import Image
from playwright.async_api import Page, async_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.processes import Server  # noqa: E402

SIZE = {"width": 1200, "height": 640}


async def point(page: Page, x: float, y: float) -> None:
    box = await page.locator("#board").bounding_box()
    assert box is not None
    await page.mouse.move(box["x"] + x, box["y"] + y, steps=5)


async def main() -> None:
    server = Server(["--idle-after", "60", "--expire-after", "120", "--seed", "7"]).start()
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=shutil.which("chromium") or shutil.which("chromium-browser"),
                args=["--no-sandbox", "--disable-gpu"],
            )
            context = await browser.new_context(viewport=SIZE, device_scale_factor=1)
            tabs = []
            for _ in range(2):
                tab = await context.new_page()
                await tab.goto(server.http + "/")
                await tab.wait_for_function("window.presence && presence.status === 'open'")
                tabs.append(tab)
            left, right = tabs
            await point(left, 180, 150)
            await point(right, 420, 300)
            await right.locator("#notes").focus()
            await right.evaluate(
                "() => { const t = document.querySelector('#notes');"
                " const from = t.value.indexOf('Open this page');"
                " t.setSelectionRange(from, t.value.indexOf('colleague') + 9); }"
            )
            for tab in tabs:
                await tab.wait_for_function("document.querySelectorAll('.presence-label').length")
            await asyncio.sleep(0.5)
            shots = [Image.open(io.BytesIO(await tab.screenshot())) for tab in tabs]
            await browser.close()
    finally:
        server.stop()
    gap = 16
    picture = Image.new("RGB", (SIZE["width"] * 2 + gap, SIZE["height"]), "#d0d5dd")
    picture.paste(shots[0], (0, 0))
    picture.paste(shots[1], (SIZE["width"] + gap, 0))
    picture = picture.resize((picture.width * 3 // 4, picture.height * 3 // 4), Image.LANCZOS)
    picture.save(ROOT / "docs" / "screenshot.png", optimize=True)


if __name__ == "__main__":
    asyncio.run(main())
