"""The default backplane: replicas in one process share a bus; alone, it is a no-op."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from presence.backplane.base import Backplane
from presence.core.events import Event


class MemoryBus:
    """Routes events between the backplanes attached to it (one per in-process replica)."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[MemoryBackplane]] = {}


class MemoryBackplane(Backplane):
    def __init__(self, replica_id: str, bus: MemoryBus | None = None) -> None:
        super().__init__(replica_id)
        self.bus = bus or MemoryBus()

    def subscribe(self, room: str) -> None:
        self.bus.subscribers.setdefault(room, set()).add(self)

    def unsubscribe(self, room: str) -> None:
        subscribers = self.bus.subscribers.get(room)
        if subscribers is not None:
            subscribers.discard(self)
            if not subscribers:
                del self.bus.subscribers[room]

    def publish(self, room: str, events: Sequence[Event]) -> None:
        for peer in self.bus.subscribers.get(room, ()):
            if peer is not self and peer.receiver is not None:
                # Deliver on a later loop turn, as a network would.
                asyncio.get_running_loop().call_soon(peer.receiver, room, events)
