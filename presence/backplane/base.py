"""The backplane interface: how one replica's hub shares its rooms with the others."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from presence.core.events import Event, MemberInfo


class Unavailable(Exception):
    """The store shared by the replicas cannot be reached now (Redis): raised by reads
    of the backplane's transport and by the identity scopes store
    (:mod:`presence.scopes`)."""


@dataclass(frozen=True, slots=True)
class Held:
    """An item of a room reserved on one replica, ``seconds`` more, for the identity whose
    token digest is ``key`` (None: for nobody else). What an item is, is the endpoint's
    business (the Yjs endpoint's: a client ID that left its socket); the backplane
    carries holds to the other replicas and to those that open the room later."""

    item: str
    key: str | None
    seconds: float


class Listener(Protocol):
    """What a backplane tells its hub (implemented by :class:`presence.hub.hub.Hub`)."""

    def on_events(self, room: str, events: Sequence[Event]) -> None:
        """Another replica published events about its own members."""

    def on_full_state(self, room: str, origin: str, members: Sequence[MemberInfo]) -> None:
        """``origin`` announced the complete set of its members in ``room``."""

    def on_sync_request(self, room: str) -> None:
        """Re-announce our members in ``room`` (:meth:`Backplane.publish_full_state`),
        if we have any there: replicas asked, or we must. Called at most once per room
        for any number of requests that came together."""

    def on_holds(self, room: str, held: Sequence[Held]) -> None:
        """Items reserved on another replica (or found reserved when the room was
        opened): the hub passes them to its extensions (the Yjs endpoint's holds)."""

    def on_replica_down(self, origin: str) -> None:
        """``origin`` stopped (cleanly or not): its members are gone."""

    def on_reconnected(self) -> None:
        """The backplane was cut off and is back: messages were lost, re-sync
        (:meth:`Backplane.publish_full_state` and :meth:`Backplane.request_sync` for
        every room)."""


class Backplane(ABC):
    """Connects one replica to the others.

    Publishing never blocks and never raises: a backplane that cannot deliver now drops
    (pub/sub is at-most-once anyway) and calls ``on_reconnected`` when it is back, so
    that state is re-synchronised rather than replayed.
    """

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.listener: Listener | None = None

    @property
    def dropped(self) -> int:
        """Messages not published because the backplane was unreachable."""
        return 0

    @property
    def connect_failures(self) -> int:
        """Attempts to reach the other replicas that failed."""
        return 0

    @property
    def reconnects(self) -> int:
        """Times the connection came back after an outage."""
        return 0

    async def start(self, listener: Listener) -> None:
        self.listener = listener

    async def stop(self) -> None:
        self.listener = None

    @property
    def ready(self) -> bool:
        """Whether what is published now reaches the other replicas."""
        return True

    def status(self) -> dict[str, Any] | None:
        """The connection's state for /readyz; None when there is nothing to connect to."""
        return None

    @abstractmethod
    async def open_room(self, room: str) -> list[Event]:
        """Start receiving the room's events; return the other replicas' members in it
        (as ``Joined`` events) followed by whatever arrived while they were read."""

    @abstractmethod
    def close_room(self, room: str) -> None:
        """Stop receiving the room's events (its last local member left)."""

    @abstractmethod
    def publish(
        self, room: str, events: Sequence[Event], current: Sequence[MemberInfo], gone: Sequence[str]
    ) -> None:
        """Send events about this replica's members; ``current`` is the latest state of
        each member the events touched, ``gone`` the ids that left (for late joiners)."""

    @abstractmethod
    def publish_full_state(self, room: str, members: Sequence[MemberInfo]) -> None:
        """Announce the complete set of this replica's members in ``room``. Replication
        coalesces full states: outside ``on_sync_request`` this only marks one due, and
        ``on_sync_request`` follows shortly to publish the members as they are then."""

    @abstractmethod
    def publish_holds(self, room: str, held: Sequence[Held]) -> None:
        """Tell the other replicas, and those that open the room later, of items reserved
        here (they arrive before the leaves published after them)."""

    @abstractmethod
    async def members(self, room: str) -> list[MemberInfo]:
        """The members of a room this replica has not opened (for read-only views)."""

    @abstractmethod
    async def rooms(self) -> dict[str, int]:
        """Every room with members on any replica, with its member count."""

    @abstractmethod
    def request_sync(self, room: str) -> None:
        """Ask the other replicas to announce their members in ``room``."""
