"""Presence events and the batch that coalesces them.

Every event is idempotent for a receiver (a repeated ``join`` replaces, a repeated patch
changes nothing, a ``leave`` of an unknown member is ignored). That is what lets a late
joiner take a snapshot and then apply any batch that overlaps it, and what lets a slow
connection merge its backlog instead of queueing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from presence.core.identity import Identity

State = dict[str, Any]


NO_NULLS: frozenset[str] = frozenset()


def apply_patch(state: State, patch: State, nulls: frozenset[str] = NO_NULLS) -> None:
    """Merge ``patch`` into ``state``: top-level fields replace, ``None`` deletes, except
    for the fields in ``nulls``, which are set to ``None`` (a Yjs state's null value)."""
    for key, value in patch.items():
        if value is None and key not in nulls:
            state.pop(key, None)
        else:
            state[key] = value


@dataclass(slots=True)
class MemberInfo:
    """Everything a peer needs to show a member; what ``join`` and snapshots carry."""

    id: str
    identity: Identity
    state: State
    idle: bool
    origin: str  # the replica the member is connected to

    def copy(self) -> MemberInfo:
        return replace(self, state=dict(self.state))


@dataclass(frozen=True, slots=True)
class Joined:
    member: MemberInfo
    # A member peers already know, announced again (renamed, recoloured, re-synced): a
    # ``leave`` later in the same batch must still reach them.
    again: bool = False


@dataclass(frozen=True, slots=True)
class Updated:
    """Changed fields. A ``None`` in ``patch`` removes the field, except for the fields
    named in ``nulls``: a Yjs client set those to ``null``, a value its Yjs peers keep.
    JSON peers get the plain patch (to them, ``null`` is "no such field")."""

    id: str
    patch: State
    nulls: frozenset[str] = NO_NULLS


@dataclass(frozen=True, slots=True)
class Idle:
    id: str


@dataclass(frozen=True, slots=True)
class Active:
    id: str


@dataclass(frozen=True, slots=True)
class Left:
    id: str


Event = Joined | Updated | Idle | Active | Left


@dataclass(slots=True)
class _Entry:
    """The net change to one member within a batch."""

    joined: MemberInfo | None = None  # joined within the batch: carries the latest state
    known: bool = False  # peers knew the member before the batch
    patch: State | None = None
    nulls: frozenset[str] = NO_NULLS  # the patch's None values that are values
    idle: bool | None = None  # last idle/active transition, if any
    left: bool = False


@dataclass(slots=True)
class Batch:
    """An ordered set of events, reduced to the net change per member.

    Adding ``update`` after ``update`` merges the patches (latest value per field wins);
    updates after a ``join`` fold into the joined state; a ``join`` then ``leave`` in the
    same batch cancels out. ``coalesced`` counts the events that merging absorbed.
    """

    _entries: dict[str, _Entry] = field(default_factory=dict)
    coalesced: int = 0

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, event: Event) -> None:
        if isinstance(event, Joined):
            before = self._entries.pop(event.member.id, None)
            # Within the batch, the first event about the member says whether peers knew
            # it: a join then a re-announce (renamed) is still new to them.
            known = event.again if before is None else (before.known or before.joined is None)
            self._entries[event.member.id] = _Entry(joined=event.member.copy(), known=known)
            return
        entry = self._entries.get(event.id)
        if entry is None:
            entry = self._entries[event.id] = _Entry()
        if isinstance(event, Updated):
            if entry.joined is not None:
                apply_patch(entry.joined.state, event.patch, event.nulls)
            elif entry.patch is None:
                entry.patch = dict(event.patch)
                entry.nulls = event.nulls
            else:
                entry.patch.update(event.patch)
                if entry.nulls or event.nulls:
                    # The latest word on each field: null as a value, or not.
                    entry.nulls = (entry.nulls - event.patch.keys()) | event.nulls
                self.coalesced += 1
        elif isinstance(event, Idle | Active):
            idle = isinstance(event, Idle)
            if entry.joined is not None:
                entry.joined.idle = idle
            else:
                entry.idle = idle
        elif isinstance(event, Left):
            if entry.joined is not None and not entry.known:
                # Peers never saw this member: nothing to tell them.
                del self._entries[event.id]
            else:
                self._entries[event.id] = _Entry(left=True)

    def extend(self, other: Batch) -> None:
        for event in other.events():
            self.add(event)

    def events(self) -> list[Event]:
        """The net events: joins, then updates, then idle/active, then leaves."""
        joins: list[Event] = []
        updates: list[Event] = []
        marks: list[Event] = []
        leaves: list[Event] = []
        for member_id, entry in self._entries.items():
            if entry.left:
                leaves.append(Left(member_id))
                continue
            if entry.joined is not None:
                joins.append(Joined(entry.joined, again=entry.known))
                continue
            if entry.patch is not None:
                updates.append(Updated(member_id, entry.patch, entry.nulls))
            if entry.idle is not None:
                marks.append(Idle(member_id) if entry.idle else Active(member_id))
        return joins + updates + marks + leaves
