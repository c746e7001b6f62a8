"""Hub users' faces as JupyterLab draws them: initials in white on a JUPYTER_PALETTE
colour, a name that JupyterLab's cursor flag shows whole, and the same face from the
presence service and from the hub's post_auth_hook.

The flag is measured in a real JupyterLab with jupyter-collaboration, in Chromium: what it
shows depends on its CSS (at most 140 px wide, 11 px system-ui) and on the font."""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Iterator

import pytest
from playwright.async_api import async_playwright

from presence.core.colors import (
    JUPYTER_PALETTE,
    MIN_CONTRAST,
    PALETTE,
    WHITE,
    Colors,
    contrast_ratio,
    distance,
    stable_color,
)
from presence.core.identity import (
    HUB_ADJECTIVES,
    HUB_ANIMALS,
    HUB_NAMES,
    MOONS,
    hub_face,
    initials_of,
)
from presence.jupyter.hub import make_post_auth_hook
from tests.jupyter_helpers import Jupyter, start_jupyter
from tests.test_browser import CHROMIUM_FLAGS, chromium
from tests.test_jupyter_lab import NOTEBOOK, open_notebook, put_cursor

SECRET = "faces-test-secret-of-32-bytes-or-more"


# -- the palette ---------------------------------------------------------------------------


@pytest.mark.unit
def test_every_jupyter_colour_reads_under_white_initials() -> None:
    assert len(JUPYTER_PALETTE) == len(set(JUPYTER_PALETTE)) >= 10
    for color in JUPYTER_PALETTE:
        assert contrast_ratio(color, WHITE) >= MIN_CONTRAST, color
        assert Colors.of(color).text_color == WHITE  # presence's own labels agree


@pytest.mark.unit
def test_jupyter_colours_stay_apart_for_colour_blind_viewers() -> None:
    closest = min(itertools.combinations(JUPYTER_PALETTE, 2), key=lambda p: distance(*p))
    assert set(closest) == {"#AD4C04", "#684C02"}
    assert distance(*closest) > 0.054


@pytest.mark.unit
def test_jupyter_palette_keeps_what_palette_had_that_passes() -> None:
    passing = [c for c in PALETTE if contrast_ratio(c, WHITE) >= MIN_CONTRAST]
    kept = [c for c in JUPYTER_PALETTE if c in PALETTE]
    assert len(passing) == 7 and len(kept) == 6  # all 7 cost 0.005 of the closest distance


@pytest.mark.unit
def test_jupyter_palette_is_ordered_for_small_groups() -> None:
    # Each colour is the one farthest from those before it: two collaborators get the two
    # most distinct colours, three the three most distinct, and so on.
    for i in range(1, len(JUPYTER_PALETTE)):
        before = JUPYTER_PALETTE[:i]

        def score(c: str, before: tuple[str, ...] = before) -> float:
            return min(distance(c, b) for b in before)

        best = max(score(c) for c in JUPYTER_PALETTE[i:])
        assert score(JUPYTER_PALETTE[i]) == pytest.approx(best)


@pytest.mark.unit
def test_stable_colours_of_hub_users_are_jupyter_colours() -> None:
    colors = {stable_color(f"user{i}") for i in range(300)}
    assert colors == set(JUPYTER_PALETTE)
    assert stable_color("ada") == stable_color("ada")
    assert {stable_color(f"user{i}", palette=PALETTE) for i in range(300)} == set(PALETTE)


# -- the names -----------------------------------------------------------------------------


@pytest.mark.unit
def test_hub_names_have_initials_no_other_name_has() -> None:
    # One word per first letter in each list: a name's initials are its own.
    for words in (HUB_ADJECTIVES, HUB_ANIMALS):
        assert len({w[0] for w in words}) == len(words)
        assert all(w.isalpha() and w[0] in string.ascii_uppercase for w in words)
    assert len(HUB_NAMES) == len(set(HUB_NAMES)) == 505
    initials = [initials_of(n) for n in HUB_NAMES]
    assert len(set(initials)) == len(HUB_NAMES)
    for name, mark in zip(HUB_NAMES, initials, strict=True):
        assert mark == "".join(w[0] for w in name.split())  # "BO" for "Brave Otter"
    assert "SS" not in initials
    assert not any("W" in mark for mark in initials)  # too wide for JupyterLab's avatar


@pytest.mark.unit
def test_a_hub_face_is_stable_secret_and_tells_nothing_of_the_user() -> None:
    face = hub_face(SECRET, "ada")
    assert face == hub_face(SECRET, "ada") == hub_face(SECRET.encode(), "ada")
    assert face.name in HUB_NAMES and face.color in JUPYTER_PALETTE
    assert face.initials == initials_of(face.name)
    assert "ada" not in face.username and len(face.username) == 16
    assert face != hub_face(SECRET, "bob")
    others = {hub_face(f"secret{i}", "ada").name for i in range(20)}
    assert len(others) > 10  # another secret, another face
    faces = [hub_face(SECRET, f"user{i}") for i in range(10_000)]
    assert {f.name for f in faces} == set(HUB_NAMES)
    assert {f.color for f in faces} == set(JUPYTER_PALETTE)
    with pytest.raises(ValueError):
        hub_face("", "ada")


@pytest.mark.unit
def test_the_service_and_the_hub_show_the_same_face() -> None:
    from presence.access.rules import make_access
    from presence.config import Settings

    env = {"JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api", "JUPYTERHUB_API_TOKEN": "t"}
    settings = Settings.load(
        {"auth": "jupyterhub", "jupyterhub_anonymous": "true", "secret": SECRET}, env=env
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        access = make_access(settings)
    assert access.jupyterhub is not None and access.jupyterhub.anonymous is not None
    hook = make_post_auth_hook(anonymous=True, secret=SECRET)
    for user in ("ada", "grace", "linus"):
        service = access.jupyterhub.anonymous(user)
        info = hook(None, None, {"name": user, "user_info": None})["user_info"]
        assert (service.name, service.initials, service.color) == (
            info["display_name"],
            info["initials"],
            info["color"],
        )


# -- JupyterLab's flag, measured -----------------------------------------------------------

FLAG_JS = """
([names, marks]) => {
    const flag = document.querySelector('.jp-remote-userFlag');
    const avatar = flag.querySelector('.jp-remote-userFlag-avatar');
    const style = getComputedStyle(flag);
    const widths = {};
    for (const name of names) {
        // A copy of the flag beside it, so that it has the flag's CSS and inherited font.
        const probe = flag.cloneNode(true);
        probe.style.position = 'fixed';
        probe.style.left = '0px';
        probe.style.top = '0px';
        probe.querySelector('.jp-remote-userFlag-name').textContent = name;
        flag.parentElement.appendChild(probe);
        const shown = probe.querySelector('.jp-remote-userFlag-name');
        const cut = shown.scrollWidth > shown.clientWidth, room = shown.clientWidth;
        probe.style.maxWidth = 'none';
        widths[name] = [shown.getBoundingClientRect().width, cut, room];
        probe.remove();
    }
    const marked = {};
    for (const mark of marks) {
        // The initials in the avatar's 8 px font, unclipped by its 16 px circle.
        const probe = avatar.cloneNode(false);
        probe.style.width = 'auto';
        probe.style.padding = '0';
        probe.textContent = mark;
        flag.appendChild(probe);
        marked[mark] = probe.getBoundingClientRect().width;
        probe.remove();
    }
    return {
        maxWidth: style.maxWidth,
        avatar: avatar.getBoundingClientRect().width,
        marked,
        fontSize: style.fontSize,
        initials: getComputedStyle(avatar).color,
        widths,
    };
}
"""


LONG = "W" * 40


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jupyter]:
    root = tmp_path_factory.mktemp("faces-lab")
    lab = start_jupyter(root, app="jupyterlab")  # stock: the flag as jupyter-collaboration draws it
    (root / "work" / "shared.ipynb").write_text(json.dumps(NOTEBOOK))
    yield lab
    lab.stop()


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_every_hub_name_fits_jupyterlabs_cursor_flag(lab: Jupyter) -> None:
    # Numbered as a server numbers a second "Brave Otter": up to 99 still fits.
    names = [*HUB_NAMES, *(f"{n} 99" for n in HUB_NAMES)]
    stock = [f"Anonymous {m}" for m in MOONS]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
        try:
            a = await open_notebook(browser, lab)
            b = await open_notebook(browser, lab)
            await put_cursor(a)
            await put_cursor(b)
            await a.keyboard.type("x")  # b shows a's flag
            await b.locator(".jp-remote-userFlag").first.wait_for(timeout=30_000)
            marks = sorted({initials_of(n) for n in HUB_NAMES})
            measured = await b.evaluate(FLAG_JS, [[*names, *stock, LONG], marks])
        finally:
            await browser.close()
    # The flag as jupyter-collaboration 5 draws it, initials in white.
    assert (measured["maxWidth"], measured["fontSize"]) == ("140px", "11px")
    assert measured["initials"] == "rgb(255, 255, 255)"
    widths = measured["widths"]
    room = widths[LONG][2]  # 140 px less the border, padding, avatar and gap: 110 px
    cut = [n for n in names if widths[n][1]]
    assert not cut, f"cut in a {room} px flag: {cut[:10]}"
    widest = max(names, key=lambda n: widths[n][0])
    print(f"\nroom for the name: {room} px; widest: {widest!r}, {widths[widest][0]:.1f} px")
    # Initials within the avatar's circle (its chord 3 px off the middle is 14.8 px wide):
    # the widest are "MM", 13.8 px; "MW" would be 14.8, "WW" 15.8, hence no W.
    assert measured["avatar"] == 16
    widest_mark = max(measured["marked"].values())
    assert widest_mark < 14.5, sorted(measured["marked"].items(), key=lambda m: -m[1])[:5]
    # What this replaces: 26 of jupyter_server's 57 "Anonymous <moon>" names lose part of
    # their moon ("Anonymous Chal…").
    assert sum(widths[n][1] for n in stock) > 20
    assert widths["Anonymous Chaldene"][1]
