"""Collaborator colours: a colour-blind-aware palette, WCAG contrast, and distance.

The palette draws on Okabe-Ito (designed for colour-vision deficiency) and Paul Tol's
qualitative schemes. Two colours are compared by their OKLab distance as seen
with normal vision *and* under simulated protanopia, deuteranopia and tritanopia
(Machado et al. 2009, full severity); the distance is the smallest of the four, so a
pair that only differs in red/green counts as close. A room picks for each new member
the palette colour farthest from the colours already in use.

Every colour is sent with the label text colour (black or white) that gives it the
higher WCAG contrast; the palette is filtered so that this is always >= 4.5:1.

JupyterLab does not ask: it writes a collaborator's initials in white on their colour
(the cursor flag's avatar, the user menu). Hub users, whom JupyterLab draws with the
colour their hub gives them, take theirs from :data:`JUPYTER_PALETTE`, whose colours
all read with white text.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

MIN_CONTRAST = 4.5
BLACK = "#000000"
WHITE = "#FFFFFF"

# Chosen greedily from Okabe-Ito and Paul Tol's schemes so that each colour is as far as
# possible from the ones before it for every viewer; order breaks ties, so small rooms get
# the most distinct colours. The closest pair is still ~0.05 apart in OKLab for the least
# favoured viewer (tests/test_identity.py checks it).
PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue (Okabe-Ito)
    "#F0E442",  # yellow (Okabe-Ito)
    "#CC3311",  # red (Tol vibrant)
    "#66CCEE",  # cyan (Tol bright)
    "#332288",  # indigo (Tol muted)
    "#E69F00",  # orange (Okabe-Ito)
    "#44AA99",  # teal (Tol muted)
    "#882255",  # wine (Tol muted)
    "#EE6677",  # rose red (Tol bright)
    "#AA4499",  # purple (Tol muted)
    "#DDCC77",  # sand (Tol muted)
    "#56B4E9",  # sky blue (Okabe-Ito)
    "#117733",  # green (Tol muted)
    "#999933",  # olive (Tol muted)
    "#7F3C8D",  # violet
    "#EE3377",  # magenta (Tol vibrant)
)

# For JupyterLab, which writes initials in white on the colour (its light theme; measured
# in JupyterLab 4.6 with jupyter-collaboration 5): every colour >= 4.5:1 against white.
# Drawn from PALETTE's colours that pass (6 of its 7: keeping all 7 would bring the
# closest pair below 0.05) and Okabe-Ito / Tol colours darkened in OKLCH (same hue, lower
# lightness) to the contrast noted, searched for the 12 whose closest pair is farthest
# apart, and ordered as PALETTE is. Dark colours are fewer to tell apart than light ones,
# yet the closest pair (#AD4C04, #684C02) is 0.055 apart in OKLab for the least favoured
# viewer, farther than PALETTE's closest (0.052; tests/test_jupyter_faces.py).
JUPYTER_PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue (Okabe-Ito), 5.2:1 against white
    "#4B3A01",  # dark olive (Tol's #EECC66 at 11:1)
    "#CB465A",  # rose (Tol's #EE6677 at 4.6:1)
    "#332288",  # indigo (Tol muted), 12.2:1
    "#882255",  # wine (Tol muted), 8.7:1
    "#684C02",  # ochre (Tol's #DDAA33 at 8:1)
    "#AA4499",  # purple (Tol muted), 5.3:1
    "#03586E",  # petrol (Tol's #66CCEE at 8:1)
    "#024C36",  # pine (Okabe-Ito's #009E73 at 10:1)
    "#117733",  # green (Tol muted), 5.7:1
    "#7F3C8D",  # violet, 7.2:1
    "#AD4C04",  # rust (Okabe-Ito's #D55E00 at 5.5:1)
)

# Machado et al. (2009) simulation matrices, severity 1.0, applied to linear RGB.
_CVD = {
    "protan": (
        (0.152286, 1.052583, -0.204868),
        (0.114503, 0.786281, 0.099216),
        (-0.003882, -0.048116, 1.051998),
    ),
    "deutan": (
        (0.367322, 0.860646, -0.227968),
        (0.280085, 0.672501, 0.047413),
        (-0.011820, 0.042940, 0.968881),
    ),
    "tritan": (
        (1.255528, -0.076749, -0.178779),
        (-0.078411, 0.930809, 0.147602),
        (0.004733, 0.691367, 0.303900),
    ),
}

RGB = tuple[float, float, float]


def parse_hex(color: str) -> RGB:
    """``#RRGGBB`` to sRGB components in [0, 1]."""
    if len(color) != 7 or color[0] != "#":
        raise ValueError(f"expected a colour like #1A2B3C, got {color!r}")
    return (int(color[1:3], 16) / 255, int(color[3:5], 16) / 255, int(color[5:7], 16) / 255)


def _linear(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def relative_luminance(color: str) -> float:
    r, g, b = (_linear(c) for c in parse_hex(color))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: str, b: str) -> float:
    """WCAG 2.x contrast ratio, from 1 to 21."""
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


@lru_cache(maxsize=1024)  # every state a Yjs peer is sent carries its member's colours
def text_color_for(background: str) -> str:
    """Black or white, whichever reads better on ``background``."""
    return (
        BLACK if contrast_ratio(background, BLACK) >= contrast_ratio(background, WHITE) else WHITE
    )


def _oklab(lin: RGB) -> RGB:
    r, g, b = (max(0.0, min(1.0, c)) for c in lin)
    lc = math.cbrt(0.4122214708 * r + 0.5363325363 * g + 0.0514459929 * b)
    mc = math.cbrt(0.2119034982 * r + 0.6806995451 * g + 0.1073969566 * b)
    sc = math.cbrt(0.0883024619 * r + 0.2817188376 * g + 0.6299787005 * b)
    return (
        0.2104542553 * lc + 0.7936177850 * mc - 0.0040720468 * sc,
        1.9779984951 * lc - 2.4285922050 * mc + 0.4505937099 * sc,
        0.0259040371 * lc + 0.7827717662 * mc - 0.8086757660 * sc,
    )


def _views(color: str) -> list[RGB]:
    """The colour in OKLab as seen with normal vision and the three dichromacies."""
    lin = tuple(_linear(c) for c in parse_hex(color))
    views = [_oklab(lin)]  # type: ignore[arg-type]
    for m in _CVD.values():
        views.append(_oklab(tuple(sum(m[i][j] * lin[j] for j in range(3)) for i in range(3))))  # type: ignore[arg-type]
    return views


@cache
def distance(a: str, b: str) -> float:
    """Perceptual distance for the least favoured viewer (smaller = easier to confuse)."""
    return min(math.dist(va, vb) for va, vb in zip(_views(a), _views(b), strict=True))


@dataclass(frozen=True, slots=True)
class Colors:
    """What an overlay needs to draw one member."""

    color: str
    text_color: str
    color_light: str  # translucent variant for selections (y-codemirror's ``colorLight``)

    @classmethod
    def of(cls, color: str) -> Colors:
        return cls(color=color, text_color=text_color_for(color), color_light=color + "33")


def stable_color(key: str, *, palette: Sequence[str] = JUPYTER_PALETTE) -> str:
    """A colour of ``palette`` for ``key`` (a hub user's name), the same everywhere and
    always; the palette has fewer colours than a hub has users, so two keys can share one.
    Hub users are drawn by JupyterLab, in white on their colour: JUPYTER_PALETTE."""
    digest = hashlib.sha256(key.encode()).digest()
    return palette[int.from_bytes(digest[:4], "big") % len(palette)]


def pick_color(in_use: Iterable[str], palette: Sequence[str] = PALETTE) -> str:
    """The palette colour farthest from every colour in use.

    With more members than colours, colours repeat, least-used first; among equals the
    palette order decides, so the choice is deterministic.
    """
    counts: dict[str, int] = {}
    for c in in_use:
        counts[c] = counts.get(c, 0) + 1
    return farthest_color(counts, palette)


def farthest_color(counts: Mapping[str, int], palette: Sequence[str] = PALETTE) -> str:
    """:func:`pick_color` of the colours in use as counts (colour -> how many show it)."""
    if not counts:
        return palette[0]
    fewest = min(counts.get(c, 0) for c in palette)
    candidates = [c for c in palette if counts.get(c, 0) == fewest]
    used = [c for c in counts if c in palette or is_hex(c)]

    def score(c: str) -> float:
        return min((distance(c, u) for u in used if u != c), default=math.inf)

    return max(candidates, key=score)  # max() keeps the first of equals


def is_hex(c: str) -> bool:
    """Whether ``c`` is a colour like #1A2B3C."""
    try:
        parse_hex(c)
    except ValueError:
        return False
    return True
