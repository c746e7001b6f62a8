"""Keeping names, initials and colours apart: among the members of a room, and among the
live identities of a *scope* (the anonymous users of one Jupyter server, say).

A room settles its members with :class:`Distinct` on every membership change. A scope
holds each username's identity until it expires (:class:`LiveIdentities`); a new or
returning user gets, with :func:`choose`, the identity it wants changed only where a live
one holds its name, initials or colour, and claims it only if nobody took any of them
meanwhile (:func:`clashes`): the check the backplanes make atomically, in memory or in
a Redis script.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from presence.core.colors import PALETTE, pick_color
from presence.core.identity import (
    Identity,
    IdentityFactory,
    initials_choices,
    initials_of,
    unique_name,
)


class Holders:
    """Which ids hold each value of one attribute (a name, initials, a colour)."""

    def __init__(self) -> None:
        self.by_value: dict[str, set[str]] = {}

    def __contains__(self, value: object) -> bool:
        return value in self.by_value

    def add(self, value: str, holder: str) -> None:
        self.by_value.setdefault(value, set()).add(holder)

    def remove(self, value: str, holder: str) -> None:
        holders = self.by_value.get(value)
        if holders is not None:
            holders.discard(holder)
            if not holders:
                del self.by_value[value]

    def yields(self, value: str, holder: str) -> bool:
        """Whether another holder of ``value`` goes first (it has the smaller id)."""
        return any(other < holder for other in self.by_value.get(value, ()))

    def in_use(self) -> Iterable[str]:
        return (value for value, ids in self.by_value.items() for _ in ids)


class Distinct:
    """The names, initials and colours held by a set of identities, to keep each apart.

    One pass over the identities, then O(1) per identity settled: a room settles on every
    membership change, and rooms can have hundreds of members. A colour that must change
    is one of ``palette`` (JUPYTER_PALETTE for the faces JupyterLab draws).
    """

    def __init__(
        self, held: Iterable[tuple[str, Identity]], *, palette: Sequence[str] = PALETTE
    ) -> None:
        self.names, self.initials, self.colors = Holders(), Holders(), Holders()
        self._palette = palette
        self._palette_set = frozenset(palette)
        self._free = set(palette)  # palette colours nobody shows
        for holder, identity in held:
            self._hold(identity, holder)

    def _hold(self, identity: Identity, holder: str) -> None:
        self.names.add(identity.name, holder)
        self.initials.add(identity.initials, holder)
        self.colors.add(identity.color, holder)
        self._free.discard(identity.color)

    def _release(self, identity: Identity, holder: str) -> None:
        self.names.remove(identity.name, holder)
        self.initials.remove(identity.initials, holder)
        self.colors.remove(identity.color, holder)
        if identity.color in self._palette_set and identity.color not in self.colors:
            self._free.add(identity.color)

    def has_free_color(self) -> bool:
        """Whether a palette colour is shown by nobody (then no two may share one)."""
        return bool(self._free)

    def at_rest(self, holder: str, wanted: Identity, current: Identity) -> bool:
        """Whether :meth:`settle` would keep ``current`` as it is: it shows what it wants
        and nobody that goes first contests it. Cheap, so that a room settles only the
        few members a change concerns."""
        return (
            wanted.name == current.name
            and (wanted.color == current.color or wanted.declared)
            and not self.names.yields(current.name, holder)
            and not self.initials.yields(current.initials, holder)
            and not (self._free and self.colors.yields(current.color, holder))
        )

    def settle(
        self,
        holder: str,
        wanted: Identity,
        current: Identity | None,
        *,
        colors_first_come: bool = True,
    ) -> Identity:
        """What ``holder`` shows: ``current`` (None when joining) changed only where it
        clashes with a holder that goes first, or where ``wanted`` has become free. With
        ``colors_first_come`` False, a colour another holder shows is contested whoever
        came first (a scope's claims: :func:`clashes` refuses it while one is free)."""
        if current is not None:
            self._release(current, holder)
        names, initials, colors = self.names, self.initials, self.colors
        # Name: first come keeps it; a rename is the smallest change ("Io 2").
        if current is None or names.yields(current.name, holder):
            name = unique_name(wanted.name, names.by_value)
        elif wanted.name != current.name and wanted.name not in names:
            name = wanted.name
        else:
            name = current.name
        # Initials follow the name, first free choice; kept while nobody contests them.
        if current is None or name != current.name or initials.yields(current.initials, holder):
            # Past 676 holders every pair is taken: then initials repeat.
            choices = (c for c in initials_choices(name) if c not in initials)
            mark = next(choices, initials_of(name))
        else:
            mark = current.initials
        # Colour: a token's own unless another holder shows it and a colour is free. A
        # client's self-declared colour is what its Yjs peers see: it stays.
        if current is None:
            color, contested = wanted.color, wanted.color in colors
        else:
            color = current.color
            contested = colors.yields(color, holder) if colors_first_come else color in colors
        if not wanted.declared:
            if contested and self.has_free_color():
                color = pick_color(colors.in_use(), self._palette)
            elif color != wanted.color and wanted.color not in colors:
                color = wanted.color
        shown = replace(wanted, name=name, initials=mark, color=color)
        self._hold(shown, holder)
        return shown


# -- scopes of live identities ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """An identity to hold in a scope, as chosen from a snapshot of the scope."""

    identity: Identity
    # While a colour of this palette is shown by no live identity, the claim's colour
    # must not be shown by another; once all are, colours repeat (least used first).
    # Judged when the claim is made, against the scope as it is then: a renewal, chosen
    # without reading the scope, needs no second try when the palette is used up.
    palette: tuple[str, ...] = PALETTE


def choose(
    held: Mapping[str, Identity], wanted: Identity, *, palette: Sequence[str] = PALETTE
) -> Claim:
    """What ``wanted.username`` shows among the live identities ``held`` (by username):
    ``wanted`` itself where nobody else holds its name, initials or colour, else what it
    shows now (its own entry in ``held``: a renewal keeps a live user's look), else the
    smallest change (as when joining a room). A colour that changes is one of ``palette``:
    JUPYTER_PALETTE for hub users' faces, which JupyterLab draws with white initials."""
    distinct = Distinct(((u, i) for u, i in held.items() if u != wanted.username), palette=palette)
    current = held.get(wanted.username)
    if current is not None and not shown_for(current, wanted):
        current = None  # the wish changed (a new name): choose as for a newcomer
    shown = distinct.settle(wanted.username, wanted, current, colors_first_come=False)
    return Claim(shown, tuple(palette))


def shown_for(shown: Identity, wanted: Identity) -> bool:
    """Whether ``shown`` is what a room or scope made of ``wanted``: its name, or that
    name numbered ("Io 2")."""
    rest = shown.name.removeprefix(wanted.name)
    return rest == "" or (rest[:1] == " " and rest[1:].isdigit())


# A new identity is chosen from what its scope says about a few candidates (a Probe),
# not from all its live identities: it costs the same in a scope of 5 and of 500.
FRESH_DRAWS = 8  # plain names drawn before one is numbered (as IdentityFactory.create)
NUMBERED = 40  # numbered forms of the last draw asked about ("Io 2" to "Io 41")
# Initials asked about: the name's best choices, then pairs at random. Choices taken in
# order fill the pairs from "AA" on, so the next in order is rarely among the first few;
# a scope at its bound of 500 has 176 of the 676 pairs free, and 60 random pairs all
# taken is a chance of about 1 in 70 million (then the whole scope is read).
INITIALS_BEST = 12
INITIALS_RANDOM = 60


@dataclass(frozen=True, slots=True)
class Probe:
    """What a scope says: which of the names and initials asked about are held, and the
    colours its live identities show, with how many show each."""

    names: frozenset[str] = frozenset()
    initials: frozenset[str] = frozenset()
    colors: Mapping[str, int] = field(default_factory=dict)


def name_candidates(draws: Sequence[str]) -> list[str]:
    """Names to ask a scope about, best first: the plain draws, then the last one
    numbered (what :func:`unique_name` would make of it)."""
    *fresh, last = draws
    return [*fresh, last, *(f"{last} {n}" for n in range(2, NUMBERED + 2))]


def initials_candidates(name: str, factory: IdentityFactory) -> list[str]:
    best = list(itertools.islice(initials_choices(name), INITIALS_BEST))
    return best + [p for p in factory.initials_sample(INITIALS_RANDOM) if p not in best]


def first_free(candidates: Sequence[str], held: Iterable[str]) -> str | None:
    taken = set(held)
    return next((c for c in candidates if c not in taken), None)


def create(held: Mapping[str, Identity], factory: IdentityFactory) -> Identity:
    """A new identity whose name and colour are as far as can be from those ``held``."""
    return factory.create({i.name for i in held.values()}, [i.color for i in held.values()])


def clashes(held: Mapping[str, Identity], claim: Claim) -> bool:
    """Whether another live identity holds the claim's name or initials, or its colour
    while a colour of the claim's palette is free. Redis makes the same check in a
    script (backplane/redis.py)."""
    mine = claim.identity
    others = [other for username, other in held.items() if username != mine.username]
    if any(other.name == mine.name or other.initials == mine.initials for other in others):
        return True
    shown = {other.color for other in others}
    return mine.color in shown and not shown.issuperset(claim.palette)


class LiveIdentities:
    """The identities live in one scope, each held until its expiry (sans-I/O: callers
    pass the time). The memory backplane keeps one per scope; so does the Jupyter identity
    provider for the users of its server."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[Identity, float]] = {}  # username -> (shown, expires)

    def __len__(self) -> int:
        return len(self._held)

    def held(self, now: float) -> dict[str, Identity]:
        """The live identities by username; forgets the expired ones."""
        for username in [u for u, (_, expires) in self._held.items() if expires <= now]:
            del self._held[username]
        return {u: identity for u, (identity, _) in self._held.items()}

    def get(self, username: str, now: float) -> Identity | None:
        entry = self._held.get(username)
        return entry[0] if entry is not None and entry[1] > now else None

    def claim(
        self, claim: Claim, now: float, ttl: float, keep: int | None = None
    ) -> dict[str, Identity] | None:
        """Hold ``claim.identity`` for ``ttl`` seconds unless it clashes with another live
        identity, and let go of those renewed longest ago past ``keep``. None when held;
        else the live identities, to choose again from."""
        held = self.held(now)
        if clashes(held, claim):
            return held
        self.put(claim.identity, now, ttl)
        while keep is not None and len(self._held) > keep:
            del self._held[next(iter(self._held))]  # the first is the one renewed longest ago
        return None

    def put(self, identity: Identity, now: float, ttl: float) -> None:
        """Hold ``identity`` as it is (another authority, the service, chose it)."""
        # Last in the dict's order: the order in which they were renewed.
        self._held.pop(identity.username, None)
        self._held[identity.username] = (identity, now + ttl)

    def touch(self, username: str, now: float, ttl: float) -> Identity | None:
        """Keep a live identity for ``ttl`` more seconds; None if it is not live."""
        shown = self.get(username, now)
        if shown is not None:
            self.put(shown, now, ttl)
        return shown

    def release(self, username: str) -> None:
        self._held.pop(username, None)
