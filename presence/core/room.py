"""One room's presence: members, their states, idle and expiry. Sans-I/O.

The room is fed commands with the current time and accumulates the resulting events;
the server takes them with :meth:`Room.take` at each flush. Nothing here awaits, sleeps
or reads a clock, so every timing rule is tested by passing times.

A room holds the members of every replica. Only the replica a member is connected to
(its *origin*) decides when it goes idle or expires; the other replicas apply the
events it publishes (:meth:`Room.apply`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from presence.core.distinct import Distinct
from presence.core.events import (
    NO_NULLS,
    Active,
    Batch,
    Event,
    Idle,
    Joined,
    Left,
    MemberInfo,
    State,
    Updated,
    apply_patch,
)
from presence.core.identity import Identity

ROOM_NAME_RULE = (
    "1 to 128 characters: letters, digits, - _ . : ~ @ + and / (between the others; "
    "not ending in /events)"
)
# "/" lets a room name its owner (``alice/:doc`` with --auth jupyterhub); it never starts,
# ends or doubles, and "/events" cannot end a name: GET /rooms/{room}/events is the stream.
_SEGMENT = r"[A-Za-z0-9_.:~@+-]+"
_ROOM_NAME = re.compile(rf"(?=.{{1,128}}$){_SEGMENT}(?:/{_SEGMENT})*(?<!/events)", re.DOTALL)


def is_valid_room_name(name: str) -> bool:
    """Room names are safe in URLs, Redis keys and logs without escaping."""
    return _ROOM_NAME.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class Timing:
    idle_after: float = 3.0  # seconds without an update before the label is hidden
    expire_after: float = 30.0  # seconds without an update or heartbeat before removal

    def __post_init__(self) -> None:
        if not self.idle_after > 0:
            raise ValueError("idle_after must be positive")
        if not self.expire_after > 0:
            raise ValueError("expire_after must be positive")


class RoomError(Exception):
    """A command the room refuses; the message is safe to show the client."""

    code = "invalid"


class StateTooLarge(RoomError):
    code = "state_too_large"


class RoomStateTooLarge(RoomError):
    code = "room_state_too_large"


class UnknownMember(RoomError):
    code = "unknown_member"


@dataclass(slots=True)
class _Member:
    info: MemberInfo
    last_update: float
    last_seen: float
    size: int = 0  # its state's bytes, as counted against the room's budget


def _size(state: State) -> int:
    """What a state counts against the room's budget: its JSON's length; 0 if empty."""
    return len(orjson.dumps(state)) if state else 0


class Room:
    def __init__(
        self,
        name: str,
        *,
        timing: Timing = Timing(),
        replica: str = "local",
        max_state_bytes: int = 16 * 1024,
        max_room_state_bytes: int = 512 * 1024,
    ) -> None:
        self.name = name
        self.timing = timing
        self.replica = replica
        self.max_state_bytes = max_state_bytes
        # The budget of all members' states together, what a snapshot of the room costs
        # (beyond identities). A local member's state may not grow the total past it;
        # other replicas' states count, and are applied whatever the total (their
        # replica checked them against its own view): see docs/security.md.
        self.max_room_state_bytes = max_room_state_bytes
        self.state_bytes = 0  # the sum of the members' sizes, kept as they change
        self._members: dict[str, _Member] = {}
        # Local members' identities as they came (a token's name and colour); what they
        # show may differ while another member holds the same name, initials or colour.
        self._wanted: dict[str, Identity] = {}
        self._local = Batch()  # events decided here: fanned out and published
        self._remote = Batch()  # events applied from other replicas: fanned out only

    # -- queries -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member_id: object) -> bool:
        return member_id in self._members

    def __iter__(self) -> Iterator[str]:
        """The members' ids."""
        return iter(self._members)

    @property
    def is_empty(self) -> bool:
        return not self._members

    @property
    def has_local_members(self) -> bool:
        return any(m.info.origin == self.replica for m in self._members.values())

    def names(self) -> set[str]:
        return {m.info.identity.name for m in self._members.values()}

    def colors(self) -> list[str]:
        return [m.info.identity.color for m in self._members.values()]

    def snapshot(self) -> list[MemberInfo]:
        return [m.info.copy() for m in self._members.values()]

    def member(self, member_id: str) -> MemberInfo:
        try:
            return self._members[member_id].info
        except KeyError:
            raise UnknownMember(f"no member {member_id!r} in room {self.name!r}") from None

    # -- commands from local connections -----------------------------------------------

    def join(
        self,
        member_id: str,
        identity: Identity,
        now: float,
        state: State | None = None,
    ) -> Identity:
        """Add a local member, with its whole state if it has one (a Yjs client's first,
        kept as it is: see :meth:`replace`). Returns the
        identity it shows in this room: its own, with the name, initials or colour changed
        where another member holds them."""
        if member_id in self._members:
            raise RoomError(f"member {member_id!r} is already in room {self.name!r}")
        state = dict(state or {})
        size = self._check_size(state)
        self._wanted[member_id] = identity
        shown = _distinct(self._members).settle(member_id, identity, None)
        info = MemberInfo(member_id, shown, state, False, self.replica)
        self._put(member_id, _Member(info, now, now, size))
        self._emit(Joined(info))
        return shown

    def update(self, member_id: str, patch: State, now: float) -> None:
        member = self._local_member(member_id)
        state = dict(member.info.state)
        apply_patch(state, patch)
        self._resize(member, self._check_size(state, member))
        member.info.state = state
        member.last_update = member.last_seen = now
        self._emit(Updated(member_id, patch))
        self._activate(member)

    def replace(self, member_id: str, state: State, now: float) -> None:
        """Set a local member's whole state, as Yjs clients send it. ``None`` is a value
        there, kept as such (``update`` reads it as "remove the field"): peers get the
        changed fields as a patch, whose ``nulls`` name the fields that became ``None``.
        An unchanged state is a heartbeat."""
        member = self._local_member(member_id)
        old = member.info.state
        patch = {k: v for k, v in state.items() if k not in old or not _same(old[k], v)}
        patch.update((k, None) for k in old if k not in state)
        if not patch:
            member.last_seen = now
            return
        self._resize(member, self._check_size(state, member))
        member.info.state = dict(state)
        member.last_update = member.last_seen = now
        nulls = NO_NULLS
        if None in patch.values():
            nulls = frozenset(k for k, v in patch.items() if v is None and k in state)
        self._emit(Updated(member_id, patch, nulls))
        self._activate(member)

    def _activate(self, member: _Member) -> None:
        if member.info.idle:
            member.info.idle = False
            self._emit(Active(member.info.id))

    def _check_size(self, state: State, member: _Member | None = None) -> int:
        """The size ``state`` counts (its JSON, as peers get it: not as a client sent
        it, since ``1e15`` is stored as ``1000000000000000.0``), if it fits the member's
        limit, and the room's budget in place of ``member``'s state (a state that does
        not grow is let through even when the room is over budget)."""
        if not state:
            return 0
        size = len(orjson.dumps(state))
        if size > self.max_state_bytes:
            raise StateTooLarge(
                f"the state would exceed {self.max_state_bytes} bytes; send smaller fields"
            )
        old = 0 if member is None else member.size
        if size > old and self.state_bytes - old + size > self.max_room_state_bytes:
            raise RoomStateTooLarge(
                f"the room's states would exceed {self.max_room_state_bytes} bytes "
                "together; send a smaller state"
            )
        return size

    def _put(self, member_id: str, member: _Member) -> None:
        """Add or replace a member, counting its state."""
        old = self._members.get(member_id)
        if old is not None:
            self.state_bytes -= old.size
        self._members[member_id] = member
        self.state_bytes += member.size

    def _remove(self, member_id: str) -> bool:
        member = self._members.pop(member_id, None)
        if member is None:
            return False
        self.state_bytes -= member.size
        return True

    def _resize(self, member: _Member, size: int) -> None:
        self.state_bytes += size - member.size
        member.size = size

    def heartbeat(self, member_id: str, now: float) -> None:
        self._local_member(member_id).last_seen = now

    def leave(self, member_id: str) -> None:
        if self._remove(member_id):
            self._emit(Left(member_id))
            self._wanted.pop(member_id, None)
            self._settle()

    def tick(self, now: float) -> list[str]:
        """Mark local members idle, and remove the ones that stopped heartbeating.

        Returns the ids of the members removed, so their connections can be closed.
        """
        idle_after, expire_after = self.timing.idle_after, self.timing.expire_after
        expired = []
        for member_id, member in self._members.items():
            if member.info.origin != self.replica:
                continue
            if now - member.last_seen >= expire_after:
                expired.append(member_id)
            elif not member.info.idle and now - member.last_update >= idle_after:
                member.info.idle = True
                self._emit(Idle(member_id))
        for member_id in expired:
            self.leave(member_id)
        return expired

    # -- events from other replicas ----------------------------------------------------

    def apply(self, events: Iterable[Event]) -> None:
        """Apply events published by another replica about its own members."""
        membership_changed = False
        for event in events:
            if isinstance(event, Joined):
                if event.member.origin == self.replica:
                    continue  # only we speak for our members
                known = event.member.id in self._members
                info = event.member.copy()
                self._put(info.id, _Member(info, 0.0, 0.0, _size(info.state)))
                self._remote.add(Joined(event.member, again=known))
                membership_changed = True
                continue
            member = self._members.get(event.id)
            if member is None or member.info.origin == self.replica:
                continue  # unknown (we joined after it left) or not theirs to change
            if isinstance(event, Updated):
                apply_patch(member.info.state, event.patch, event.nulls)
                self._resize(member, _size(member.info.state))
            elif isinstance(event, Idle | Active):
                member.info.idle = isinstance(event, Idle)
            else:
                self._remove(event.id)
                membership_changed = True
            self._remote.add(event)
        if membership_changed:
            self._settle()

    def sync_origin(self, origin: str, members: Iterable[MemberInfo]) -> None:
        """Make this room's view of ``origin``'s members exactly ``members``.

        Used when a replica re-announces its complete state (after a backplane outage);
        only differences produce events, so a re-sync causes no flicker.
        """
        if origin == self.replica:
            return
        incoming = {m.id: m for m in members if m.origin == origin}
        for member_id in [
            m for m, v in self._members.items() if v.info.origin == origin and m not in incoming
        ]:
            self._remove(member_id)
            self._remote.add(Left(member_id))
        for member_id, info in incoming.items():
            known = self._members.get(member_id)
            if known is None or not _same_member(known.info, info):
                self._put(member_id, _Member(info.copy(), 0.0, 0.0, _size(info.state)))
                self._remote.add(Joined(info, again=known is not None))
        self._settle()

    def local_members(self) -> list[MemberInfo]:
        return [m.info for m in self._members.values() if m.info.origin == self.replica]

    def drop_origin(self, replica: str) -> None:
        """Remove every member of a replica that is gone (crashed or restarted)."""
        for member_id in [m for m, v in self._members.items() if v.info.origin == replica]:
            self._remove(member_id)
            self._remote.add(Left(member_id))
        self._settle()

    def _settle(self) -> None:
        """Keep names, initials and colours apart across replicas, and give a member its
        own name and colour back when they free up.

        Two replicas can hand out one name (or colour) at the same moment; when they learn
        of each other, the member with the smaller id keeps it and the other's replica
        changes its own. A member that showed "Io 2" because "Io" was taken (typically the
        old connection of a reloaded page, or a second tab) gets "Io" back when the holder
        leaves. A change is announced as a ``join`` of the same id, which replaces it.
        """
        distinct = _distinct(self._members)
        for member_id, member in self._members.items():
            if member.info.origin != self.replica:
                continue
            current = member.info.identity
            wanted = self._wanted.get(member_id, current)
            if distinct.at_rest(member_id, wanted, current):
                continue
            shown = distinct.settle(member_id, wanted, current)
            if shown != current:
                member.info.identity = shown
                self._emit(Joined(member.info, again=True))

    # -- output ------------------------------------------------------------------------

    def take(self) -> tuple[Batch, Batch]:
        """The events since the last call: (decided here, applied from other replicas)."""
        local, remote = self._local, self._remote
        self._local, self._remote = Batch(), Batch()
        return local, remote

    def outgoing(self, local: Batch) -> tuple[list[Event], list[MemberInfo], list[str]]:
        """What the other replicas are sent of ``local`` (from :meth:`take`): its events,
        the latest state of each member they touched, and the ids that left."""
        events = local.events()
        touched = {e.member.id if isinstance(e, Joined) else e.id for e in events}
        current = [self._members[i].info for i in touched if i in self._members]
        return events, current, [i for i in touched if i not in self._members]

    @property
    def has_pending(self) -> bool:
        return bool(self._local) or bool(self._remote)

    def _emit(self, event: Event) -> None:
        self._local.add(event)

    def _local_member(self, member_id: str) -> _Member:
        member = self._members.get(member_id)
        if member is None or member.info.origin != self.replica:
            raise UnknownMember(f"no local member {member_id!r} in room {self.name!r}")
        return member


def _same(a: Any, b: Any) -> bool:
    """JSON equality: Python's ``==`` holds ``1 == 1.0 == True``, JSON does not."""
    if a is b:
        return True
    if type(a) is not type(b) or a != b:
        return False
    return not isinstance(a, dict | list) or orjson.dumps(a) == orjson.dumps(b)


def _same_member(a: MemberInfo, b: MemberInfo) -> bool:
    return (
        a.identity == b.identity
        and a.idle == b.idle
        and a.origin == b.origin
        and _same(a.state, b.state)
    )


def _distinct(members: dict[str, _Member]) -> Distinct:
    """The names, initials and colours the room's members show, to keep each apart."""
    return Distinct((member_id, m.info.identity) for member_id, m in members.items())
