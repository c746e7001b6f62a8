"""The default backplane: replicas in one process share a bus; alone, it costs nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from presence.backplane.base import Backplane
from presence.core.distinct import Claim, LiveIdentities
from presence.core.events import Event, Joined, MemberInfo
from presence.core.identity import Identity


class MemoryBus:
    """What Redis is to the Redis backplane: subscriptions and the members of each room."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[MemoryBackplane]] = {}
        self.members: dict[str, dict[str, MemberInfo]] = {}
        self.scopes: dict[str, LiveIdentities] = {}


class MemoryBackplane(Backplane):
    def __init__(
        self,
        replica_id: str,
        bus: MemoryBus | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(replica_id)
        self.bus = bus or MemoryBus()
        self.clock = clock

    async def open_room(self, room: str) -> list[Event]:
        self.bus.subscribers.setdefault(room, set()).add(self)
        members = self.bus.members.get(room, {}).values()
        return [Joined(m.copy()) for m in members if m.origin != self.replica_id]

    def close_room(self, room: str) -> None:
        subscribers = self.bus.subscribers.get(room)
        if subscribers is not None:
            subscribers.discard(self)
            if not subscribers:
                del self.bus.subscribers[room]
                self.bus.members.pop(room, None)

    def _deliver(self, room: str, call: Callable[[MemoryBackplane], None]) -> None:
        for peer in self.bus.subscribers.get(room, ()):
            if peer is not self and peer.listener is not None:
                # On a later loop turn, as a network would.
                asyncio.get_running_loop().call_soon(call, peer)

    def publish(
        self, room: str, events: Sequence[Event], current: Sequence[MemberInfo], gone: Sequence[str]
    ) -> None:
        members = self.bus.members.setdefault(room, {})
        for m in current:
            members[m.id] = m.copy()
        for member_id in gone:
            members.pop(member_id, None)
        self._deliver(room, lambda peer: peer.listener.on_events(room, events))  # type: ignore[union-attr]

    def publish_full_state(self, room: str, members: Sequence[MemberInfo]) -> None:
        snapshot = [m.copy() for m in members]
        self._deliver(
            room,
            lambda peer: peer.listener.on_full_state(  # type: ignore[union-attr]
                room, self.replica_id, snapshot
            ),
        )

    async def members(self, room: str) -> list[MemberInfo]:
        return [m.copy() for m in self.bus.members.get(room, {}).values()]

    async def rooms(self) -> dict[str, int]:
        return {room: len(members) for room, members in self.bus.members.items() if members}

    def request_sync(self, room: str) -> None:
        self._deliver(room, lambda peer: peer.listener.on_sync_request(room))  # type: ignore[union-attr]

    async def scope_identities(self, scope: str) -> dict[str, Identity]:
        live = self.bus.scopes.get(scope)
        held = live.held(self.clock()) if live is not None else {}
        if not held:
            self.bus.scopes.pop(scope, None)  # nobody left: the scope goes, as in Redis
        return held

    async def claim_identity(
        self, scope: str, claim: Claim, ttl: float
    ) -> dict[str, Identity] | None:
        live = self.bus.scopes.setdefault(scope, LiveIdentities())
        return live.claim(claim, self.clock(), ttl)
