"""Live identities of a scope: distinct names, initials and colours, expiry, claims."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from presence.core.colors import JUPYTER_PALETTE, PALETTE
from presence.core.distinct import Claim, Distinct, LiveIdentities, choose, clashes, create
from presence.core.identity import Identity, IdentityFactory, hub_face, initials_of

pytestmark = pytest.mark.unit


def factory() -> IdentityFactory:
    return IdentityFactory(b"secret", seed=7)


def test_new_identities_of_a_scope_are_distinct_and_spread_over_the_palette() -> None:
    live, make = LiveIdentities(), factory()
    shown = []
    for _ in range(40):
        held = live.held(0.0)
        claim = choose(held, create(held, make))
        assert live.claim(claim, 0.0, 60) is None
        shown.append(claim.identity)
    assert len({i.name for i in shown}) == 40
    assert len({i.initials for i in shown}) == 40
    assert {i.color for i in shown[:16]} == set(PALETTE)


def test_a_returning_identity_keeps_what_is_free_and_yields_what_is_held() -> None:
    live = LiveIdentities()
    io = Identity("a", "Anonymous Io", "AI", PALETTE[0])
    assert live.claim(choose({}, io), 0.0, 60) is None
    # Another browser's token also says "Anonymous Io", in the same colour.
    twin = Identity("b", "Anonymous Io", "AI", PALETTE[0])
    claim = choose(live.held(1.0), twin)
    assert claim.identity.name == "Anonymous Io 2"
    assert claim.identity.initials == "I2"
    assert claim.identity.color != PALETTE[0]
    assert live.claim(claim, 1.0, 60) is None
    # Renewing the first one changes nothing.
    assert choose(live.held(2.0), io).identity == io
    # Once "a" expires, "b" gets its own name and colour back.
    assert live.held(60.5).keys() == {"b"}
    assert choose(live.held(60.5), twin).identity == twin


def test_a_claim_made_from_an_old_snapshot_is_refused_with_the_current_one() -> None:
    live = LiveIdentities()
    a = choose({}, Identity("a", "Anonymous Io", "AI", PALETTE[0]))
    b = choose({}, Identity("b", "Anonymous Io", "AI", PALETTE[1]))  # chosen concurrently
    assert live.claim(a, 0.0, 60) is None
    again = live.claim(b, 0.0, 60)
    assert again is not None and set(again) == {"a"}
    assert clashes(again, b)
    assert live.claim(choose(again, b.identity), 0.0, 60) is None


def test_colours_repeat_only_when_the_palette_is_used_up() -> None:
    held = {f"u{i}": Identity(f"u{i}", f"N{i}", f"X{i}", c) for i, c in enumerate(PALETTE)}
    claim = choose(held, Identity("z", "Zed", "ZE", PALETTE[3]))
    assert claim.identity.color == PALETTE[3]
    assert not clashes(held, claim)
    # With one colour of the palette free again, the shared colour clashes.
    del held["u0"]
    assert clashes(held, Claim(claim.identity, PALETTE))
    assert not clashes(held, Claim(replace(claim.identity, color=PALETTE[0]), PALETTE))


def test_touch_keeps_a_live_identity_and_not_an_expired_one() -> None:
    live = LiveIdentities()
    io = Identity("a", "Anonymous Io", "AI", PALETTE[0])
    live.put(io, 0.0, 10)
    assert live.touch("a", 9.0, 10) == io
    assert live.get("a", 18.0) == io
    assert live.touch("a", 19.5, 10) is None
    assert live.held(19.5) == {}


def test_a_renewal_keeps_what_a_live_user_shows() -> None:
    # u2 wants the blue that u1 shows, so it shows another colour; renewing (claiming
    # again with its token's identity) must not move it to yet another colour.
    u1 = Identity("u1", "Anonymous Io", "AI", "#0072B2")
    wanted = Identity("u2", "Anonymous Europa", "AE", "#0072B2")
    first = choose({"u1": u1}, wanted).identity
    assert first.color != "#0072B2"
    held = {"u1": u1, "u2": first}
    others = [c for c in PALETTE if c not in (u1.color, first.color)][:3]
    for other in others:  # the scope fills up meanwhile
        held[f"x{other}"] = Identity(f"x{other}", f"Anonymous {other}", other[1:3], other)
        claim = choose(held, wanted)
        assert claim.identity == first and not clashes(held, claim)


# -- hub users' faces: JUPYTER_PALETTE, flag-friendly names ------------------------------


def test_colours_changed_for_jupyter_faces_stay_in_their_palette() -> None:
    held: dict[str, Identity] = {}
    for i in range(30):  # everyone wants the same colour
        wanted = Identity(f"u{i}", f"N{i}", f"X{i}", JUPYTER_PALETTE[0])
        claim = choose(held, wanted, palette=JUPYTER_PALETTE)
        held[wanted.username] = claim.identity
    colors = [i.color for i in held.values()]
    assert set(colors) == set(JUPYTER_PALETTE)
    assert len(set(colors[: len(JUPYTER_PALETTE)])) == len(JUPYTER_PALETTE)
    # The default palette is unchanged: the same wishes spread over PALETTE.
    held = {}
    for i in range(30):
        wanted = Identity(f"u{i}", f"N{i}", f"X{i}", JUPYTER_PALETTE[0])
        held[wanted.username] = choose(held, wanted).identity
    assert {i.color for i in held.values()} - {JUPYTER_PALETTE[0]} <= set(PALETTE)


def test_a_room_settles_in_the_palette_it_is_given() -> None:
    distinct = Distinct([], palette=JUPYTER_PALETTE)
    shown = [
        distinct.settle(f"m{i}", Identity(f"u{i}", f"N{i}", f"X{i}", "#0072B2"), None)
        for i in range(len(JUPYTER_PALETTE))
    ]
    assert sorted(s.color for s in shown) == sorted(JUPYTER_PALETTE)
    assert not distinct.has_free_color()


def hub_faces(users: list[str]) -> list[Identity]:
    """The faces a server's collaborators show, chosen one by one as they arrive."""
    held: dict[str, Identity] = {}
    for user in users:
        wanted = hub_face("secret", user)
        held[wanted.username] = choose(held, wanted, palette=JUPYTER_PALETTE).identity
    return list(held.values())


def test_hub_faces_of_a_server_keep_initials_that_read_as_their_names() -> None:
    shown = hub_faces([f"user{i}" for i in range(40)])
    assert len({s.name for s in shown}) == len({s.initials for s in shown}) == 40
    for s in shown:
        words = s.name.split()
        # The first letters of its words, in order: "BO" for "Brave Otter", "O2" (or
        # "BO") for a second "Brave Otter 2", as "I2" for "Anonymous Io 2".
        assert s.initials in {w[0] + v[0] for w, v in itertools.combinations(words, 2)}, s
    assert {s.color for s in shown[: len(JUPYTER_PALETTE)]} == set(JUPYTER_PALETTE)


def test_two_users_with_one_face_are_told_apart_by_a_number() -> None:
    users = [f"user{i}" for i in range(2000)]
    by_name: dict[str, list[str]] = {}
    for user in users:
        by_name.setdefault(hub_face("secret", user).name, []).append(user)
    twins = next(names for names in by_name.values() if len(names) >= 2)[:2]
    first, second = hub_faces(twins)
    assert second.name == first.name + " 2"
    assert first.initials == initials_of(first.name)
    assert second.initials == first.name.split()[1][0] + "2"  # "O2" for "Brave Otter 2"


def test_a_bounded_scope_lets_go_of_the_identity_renewed_longest_ago() -> None:
    live, make = LiveIdentities(), factory()
    first, second, third = (make.create() for _ in range(3))
    for i, identity in enumerate((first, second)):
        assert live.claim(choose(live.held(i), identity), float(i), 60, keep=2) is None
    assert live.touch(first.username, 2.0, 60) is not None  # now second is the oldest
    assert live.claim(choose(live.held(3), third), 3.0, 60, keep=2) is None
    assert set(live.held(3.0)) == {first.username, third.username}
    # Without a bound, nobody is let go.
    assert live.claim(choose(live.held(4), second), 4.0, 60) is None
    assert len(live) == 3


def test_a_renewal_sharing_its_colour_moves_to_one_freed_whoever_came_first() -> None:
    """Two live identities share a colour (the palette was used up); one colour frees.
    The one that came first must move too: its claim would clash for ever otherwise (it
    was refused 16 times, then 503)."""
    live, now = LiveIdentities(), 0.0
    held = {f"u{i:02}": Identity(f"u{i:02}", f"N{i}", f"X{i}", c) for i, c in enumerate(PALETTE)}
    for identity in held.values():
        live.put(identity, now, 60)
    late = Identity("u99", "Late", "LA", PALETTE[5])  # shares u05's colour
    live.put(late, now, 60)
    live.release("u10")  # PALETTE[10] is free again
    claim = choose(live.held(now), held["u05"])
    assert not clashes(live.held(now), claim)
    assert claim.identity.color == PALETTE[10]
    assert live.claim(claim, now, 60) is None


async def test_new_identities_of_a_full_scope_are_chosen_without_reading_it() -> None:
    """A new identity is chosen from two questions of a fixed size, not from the whole
    scope: the cost of a claim does not grow with the scope (it read all of it before)."""
    from presence.backplane.memory import MemoryBackplane
    from presence.config import Settings
    from presence.hub.hub import Hub, new_replica_id
    from presence.scopes.memory import MemoryScopes
    from presence.server.identities import assign

    settings = Settings(seed=3, max_identities_per_scope=676)
    hub = Hub(
        settings,
        identities=IdentityFactory(b"k" * 32, seed=3),
        backplane=MemoryBackplane(new_replica_id()),
    )
    scopes = MemoryScopes()
    reads, asked = [], []
    read, probe = scopes.scope_identities, scopes.probe_scope

    async def counted_read(scope: str, username: str | None = None) -> dict[str, Identity]:
        if username is None:
            reads.append(scope)
        return await read(scope, username)

    async def counted_probe(scope: str, names=(), initials=()):  # type: ignore[no-untyped-def]
        asked.append(len(names) + len(initials))
        return await probe(scope, names, initials)

    scopes.scope_identities = counted_read  # type: ignore[method-assign]
    scopes.probe_scope = counted_probe  # type: ignore[method-assign]
    shown = [await assign(scopes, hub, "lab", None, 3600) for _ in range(500)]
    assert len({i.name for i in shown}) == len({i.initials for i in shown}) == 500
    assert {i.color for i in shown[:16]} == set(PALETTE)
    print(f"\n500 new identities: the scope read whole {len(reads)} times")
    assert len(reads) <= 5, f"the scope was read whole {len(reads)} times"
    assert max(asked) <= 80
    # A renewal of a numbered name ("… 2") whose own name is still held keeps it, unread.
    twin = Identity("twin", shown[0].name, shown[0].initials, shown[0].color)
    first = await assign(scopes, hub, "lab", twin, 3600)
    assert first.name.startswith(f"{shown[0].name} ")  # numbered: "… 12", say
    reads.clear()
    assert await assign(scopes, hub, "lab", twin, 3600) == first
    assert reads == []
