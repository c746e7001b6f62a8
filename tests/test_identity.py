import base64
import hashlib
import hmac
import itertools
import string

import pytest

from presence.core.colors import (
    BLACK,
    MIN_CONTRAST,
    PALETTE,
    WHITE,
    Colors,
    contrast_ratio,
    distance,
    pick_color,
    text_color_for,
)
from presence.core.identity import (
    IdentityFactory,
    InvalidToken,
    initials_choices,
    initials_of,
    unique_name,
)

pytestmark = pytest.mark.unit


def factory(seed: int = 1, secret: bytes = b"s3cret", **kw: object) -> IdentityFactory:
    return IdentityFactory(secret, seed=seed, **kw)  # type: ignore[arg-type]


def test_every_palette_colour_reads_with_its_text_colour() -> None:
    for color in PALETTE:
        colors = Colors.of(color)
        assert colors.text_color in (BLACK, WHITE)
        assert contrast_ratio(color, colors.text_color) >= MIN_CONTRAST, color
        assert colors.color_light == color + "33"


def test_contrast_ratio_known_values() -> None:
    assert contrast_ratio(BLACK, WHITE) == pytest.approx(21.0)
    assert contrast_ratio("#777777", "#777777") == pytest.approx(1.0)
    assert text_color_for("#F0E442") == BLACK
    assert text_color_for("#332288") == WHITE


def test_palette_colours_stay_apart_for_colour_blind_viewers() -> None:
    # The smallest distance of any pair, as the least favoured viewer sees it,
    # is well above what a reader can confuse in a label (about 0.02 in OKLab).
    worst = min(distance(a, b) for a, b in itertools.combinations(PALETTE, 2))
    assert worst > 0.05


def test_pick_color_maximises_distance_to_colours_in_use() -> None:
    used = [PALETTE[0]]
    for _ in range(len(PALETTE) - 1):
        choice = pick_color(used)
        assert choice not in used
        best = max(
            (c for c in PALETTE if c not in used), key=lambda c: min(distance(c, u) for u in used)
        )
        assert min(distance(choice, u) for u in used) == pytest.approx(
            min(distance(best, u) for u in used)
        )
        used.append(choice)
    assert sorted(used) == sorted(PALETTE)
    # Past the palette, colours repeat least-used first.
    again = pick_color(used)
    assert again in PALETTE
    assert pick_color([*used, again]) != again


def test_names_are_unique_among_many_joins() -> None:
    f = factory()
    taken: set[str] = set()
    for _ in range(300):  # far more members than moons
        identity = f.create(taken, [])
        assert identity.name not in taken
        taken.add(identity.name)


@pytest.mark.parametrize("style", ["jupyter", "animal", "person"])
def test_name_styles(style: str) -> None:
    identity = factory(style=style).create()
    if style == "jupyter":
        assert identity.name.startswith("Anonymous ")
        assert identity.initials == "A" + identity.name.split()[1][0]
    else:
        assert len(identity.name.split()) >= 2
    assert identity.initials.isupper() and 1 <= len(identity.initials) <= 2


def test_locale_changes_person_names() -> None:
    ja = {factory(seed=s, style="person", locale="ja_JP").create().name for s in range(5)}
    assert any(not n.isascii() for n in ja)


def test_deterministic_under_a_seed() -> None:
    a = [factory(seed=7).create().name for _ in range(1)] + [
        factory(seed=7).create([], ["#0072B2"]).color
    ]
    b = [factory(seed=7).create().name for _ in range(1)] + [
        factory(seed=7).create([], ["#0072B2"]).color
    ]
    assert a == b
    assert factory(seed=7).create() == factory(seed=7).create()


def test_unique_name_is_the_smallest_change() -> None:
    assert unique_name("Anonymous Io", set()) == "Anonymous Io"
    assert unique_name("Anonymous Io", {"Anonymous Io"}) == "Anonymous Io 2"
    assert unique_name("Anonymous Io", {"Anonymous Io", "Anonymous Io 2"}) == "Anonymous Io 3"


def test_initials() -> None:
    assert initials_of("Anonymous Io") == "AI"
    assert initials_of("Brave Otter 2") == "BO"
    assert initials_of("Zoë") == "Z"
    assert initials_of("42") == "4"


def test_initials_choices_start_with_the_usual_and_never_offer_them_reversed_early() -> None:
    def first(name: str, n: int = 6) -> list[str]:
        return list(itertools.islice(initials_choices(name), n))

    assert first("Anonymous Elara", 3) == ["AE", "EL", "ER"]  # not "EA"
    assert first("Anonymous Io 2", 2) == ["AI", "I2"]
    assert first("Brave Otter 2", 2) == ["BO", "O2"]
    # "CA" reads as the initials of someone else; it comes only among all the pairs.
    callirrhoe = list(initials_choices("Anonymous Callirrhoe"))
    assert callirrhoe[:2] == ["AC", "CL"]
    assert callirrhoe.index("CA") > callirrhoe.index("AO") > 10
    assert first("Agile Badger", 2) == ["AB", "BD"]
    assert set(initials_choices("Agile Badger")) >= {"BA"}  # still there, last


def test_token_round_trip() -> None:
    f = factory()
    identity = f.create()
    assert f.verify(f.token(identity)) == identity


def test_token_from_another_secret_is_rejected() -> None:
    identity = factory(secret=b"one").create()
    token = factory(secret=b"one").token(identity)
    with pytest.raises(InvalidToken, match="signature"):
        factory(secret=b"two").verify(token)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2],
        lambda t: "x" + t,
        lambda t: t.replace(".", ""),
        lambda t: t + ".extra",
        lambda t: "",
        lambda t: "not-base64!!.@@@",
    ],
)
def test_tampered_tokens_are_rejected(mangle) -> None:  # type: ignore[no-untyped-def]
    f = factory()
    with pytest.raises(InvalidToken):
        f.verify(mangle(f.token(f.create())))


def test_token_with_a_changed_name_is_rejected() -> None:
    import base64

    f = factory()
    token = f.token(f.create())
    _payload, mac = token.split(".")
    forged = (
        base64.urlsafe_b64encode(b'{"v":1,"u":"someone-else","n":"Admin","c":"#000000"}')
        .rstrip(b"=")
        .decode()
    )
    with pytest.raises(InvalidToken):
        f.verify(f"{forged}.{mac}")


# -- issue 13: strict tokens that expire ----------------------------------------------

DAY = 24 * 3600.0
STANDARD = str.maketrans("-_", "+/")


class WallClock:
    """An injected wall clock (tokens outlive processes: their time is the epoch's)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sign(secret: bytes, payload: bytes) -> str:
    """A token as a server holding ``secret`` would sign ``payload``."""
    mac = hmac.new(secret, payload, hashlib.sha256).digest()
    return ".".join(base64.urlsafe_b64encode(p).rstrip(b"=").decode() for p in (payload, mac))


@pytest.mark.parametrize(
    "junk",
    [
        lambda p, m: f"{p[:5]}!{p[5:]}.{m}",  # outside the alphabet: was skipped by decoding
        lambda p, m: f"{p}.{m[:7]}\n{m[7:]}",
        lambda p, m: f"{p[:5]} {p[5:]}.{m}",
        lambda p, m: f"{p}.{m}=",  # padding: tokens are unpadded
        lambda p, m: f"{p}==.{m}",
        lambda p, m: f"{p}.{m}".translate(STANDARD),  # the other base64 alphabet
    ],
)
def test_a_character_outside_the_tokens_encoding_is_invalid(junk) -> None:  # type: ignore[no-untyped-def]
    f = factory()
    # Seeds until the token has a '-' or '_' for the standard-alphabet case to change it.
    token = next(t for t in (f.token(f.create()) for _ in range(100)) if set(t) & set("-_"))
    with pytest.raises(InvalidToken, match="malformed"):
        f.verify(junk(*token.split(".")))


def test_a_token_with_unused_bits_set_is_invalid() -> None:
    # Another spelling of the same bytes (the last character's unused low bits set).
    f = factory()
    payload, mac = f.token(f.create()).split(".")
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    assert len(mac) % 4 == 3  # 32 bytes: the last character carries 2 unused bits
    other = alphabet[alphabet.index(mac[-1]) ^ 1]
    assert base64.urlsafe_b64decode(mac[:-1] + other + "=") == base64.urlsafe_b64decode(mac + "=")
    with pytest.raises(InvalidToken, match="malformed"):
        f.verify(f"{payload}.{mac[:-1]}{other}")


def test_tokens_expire_after_the_maximum_age() -> None:
    clock = WallClock()
    f = factory(max_age=30 * DAY, clock=clock)
    identity = f.create()
    token = f.token(identity)
    clock.now += 30 * DAY
    assert f.verify(token) == identity
    clock.now += 1
    with pytest.raises(InvalidToken, match="expired"):
        f.verify(token)
    # A fresh token for the same identity starts a new maximum age.
    assert f.verify(f.token(identity)) == identity


def test_a_token_without_an_issue_time_is_refused_like_an_expired_one() -> None:
    # Tokens issued before tokens carried their issue time (version 1).
    payload = b'{"v":1,"u":"0123456789abcdef","n":"Anonymous Io","c":"#0072B2"}'
    with pytest.raises(InvalidToken, match="expired"):
        factory().verify(sign(b"s3cret", payload))


def test_the_maximum_age_must_be_positive() -> None:
    with pytest.raises(ValueError):
        factory(max_age=0)


def test_tokens_of_a_secret_being_rotated_out_still_verify() -> None:
    old, new = b"o" * 32, b"n" * 32
    token = factory(secret=old).token(factory(secret=old).create())
    with pytest.raises(InvalidToken, match="signature"):
        factory(secret=new).verify(token)
    rotated = factory(secret=new, previous=[old])
    identity = rotated.verify(token)
    # Re-signed with the new secret: once the old one is dropped, this still verifies.
    assert factory(secret=new).verify(rotated.token(identity)) == identity
    with pytest.raises(InvalidToken, match="signature"):
        factory(secret=new, previous=[b"x" * 32]).verify(token)


def test_a_scope_key_is_made_only_with_the_secret_and_for_one_scope() -> None:
    old, new = b"o" * 32, b"n" * 32
    key = factory(secret=new).scope_key("lab1-8888")
    assert factory(secret=new).is_scope_key("lab1-8888", key)
    assert not factory(secret=new).is_scope_key("lab2-8888", key)
    assert not factory(secret=old).is_scope_key("lab1-8888", key)
    assert not factory(secret=new).is_scope_key("lab1-8888", "")
    # While a secret is rotated out, keys made with it still open the scope.
    old_key = factory(secret=old).scope_key("lab1-8888")
    assert factory(secret=new, previous=[old]).is_scope_key("lab1-8888", old_key)
