"""Departed Yjs client IDs, reserved a grace for the socket that had them and for sockets
with the same identity token, on every replica (y-websocket clients reconnect with the
client ID they had: nobody else may take it meanwhile)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from presence.backplane.base import Held

if TYPE_CHECKING:
    from presence.hub.hub import Hub


@dataclass(slots=True)
class Hold:
    """A departed client ID, reserved until ``until`` (the hub's clock) for the socket
    that had it while that socket is open, and for sockets with the same identity token
    (``key``: a digest of its username), here or on another replica."""

    owner: object | None  # the socket's outbox; None once that socket closed, or on another replica
    key: str | None
    until: float


class Holds:
    """The reserved client IDs of one replica's rooms, its own and those the other
    replicas announced. Kept by the hub, not the room's view: an empty room is
    forgotten, its reservations must not be."""

    def __init__(
        self,
        grace: float,
        clock: Callable[[], float],
        publish: Callable[[str, Sequence[Held]], None] = lambda room, held: None,
    ) -> None:
        self.grace = grace
        self.clock = clock
        self.publish = publish  # to the other replicas (Backplane.publish_holds)
        # Roughly in the order they lapse (none lasts longer than ``grace``): pruned
        # from the front.
        self.held: OrderedDict[tuple[str, int], Hold] = OrderedDict()

    @classmethod
    def of(cls, hub: Hub) -> Holds:
        """The reservations of ``hub``'s rooms: made once, installed in the hub (which
        passes on what the other replicas reserve), shared by its Yjs views."""
        found = hub.extension(cls)
        if found is None:
            found = cls(hub.settings.yjs_id_grace, hub.clock, hub.backplane.publish_holds)
            hub.add_extension(found)
        return found

    def _prune(self, now: float) -> None:
        while self.held:
            key, hold = next(iter(self.held.items()))
            if hold.until > now:
                return
            del self.held[key]

    def hold(self, room: str, client_ids: Sequence[int], owner: object, key: str | None) -> None:
        now = self.clock()
        self._prune(now)
        for client_id in client_ids:
            self.held.pop((room, client_id), None)
            self.held[(room, client_id)] = Hold(owner, key, now + self.grace)
        self.publish(room, [Held(str(c), key, self.grace) for c in client_ids])

    def held_elsewhere(self, room: str, held: Sequence[Held]) -> None:
        """Reservations another replica made (or found in the room's hash)."""
        now = self.clock()
        self._prune(now)
        for h in held:
            if not (h.item.isascii() and h.item.isdecimal()) or int(h.item) >= 1 << 32:
                continue
            client_id = int(h.item)
            mine = self.held.get((room, client_id))
            if mine is not None and mine.owner is not None:
                continue  # a socket of ours holds it: ours is the better claim
            self.held.pop((room, client_id), None)
            self.held[(room, client_id)] = Hold(None, h.key, now + min(h.seconds, self.grace))

    def get(self, room: str, client_id: int) -> Hold | None:
        now = self.clock()
        self._prune(now)
        hold = self.held.get((room, client_id))
        return hold if hold is not None and hold.until > now else None

    def discard(self, room: str, client_id: int) -> None:
        self.held.pop((room, client_id), None)
