"""The backplane interface: publish a room's events, receive other replicas' events."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from presence.core.events import Event

# (room, events) for events another replica published about its own members.
Receiver = Callable[[str, Sequence[Event]], None]


class Backplane(ABC):
    """Connects one replica's hub to the others.

    ``publish`` never blocks and never raises: a backplane that cannot deliver right now
    buffers or drops (pub/sub is at-most-once anyway) and recovers by itself.
    """

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.receiver: Receiver | None = None

    async def start(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def stop(self) -> None:
        self.receiver = None

    @property
    def ready(self) -> bool:
        """Whether events published now reach the other replicas."""
        return True

    @abstractmethod
    def subscribe(self, room: str) -> None:
        """Start receiving the room's events (the room has a local member)."""

    @abstractmethod
    def unsubscribe(self, room: str) -> None:
        """Stop receiving the room's events (its last local member left)."""

    @abstractmethod
    def publish(self, room: str, events: Sequence[Event]) -> None:
        """Send events about this replica's members to the other subscribed replicas."""
