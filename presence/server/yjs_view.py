"""One room as the Yjs connections of this replica see it: a room observer of the hub
(:class:`presence.server.hub.RoomObserver`) and the Yjs encoder of the room's batches.

It holds what only Yjs needs: the clocks announced for each client ID, the clocks each
connection was told (to recognise the copies stock clients send back), the renewals
that keep peers from timing states out, and that a Yjs client ID expires alone (its
socket stays open).

Clocks: the server re-announces states (idle marks, renewals, a reconnecting client), so
the clocks peers see are the server's, not the clients': each announcement gets
``max(last + 1, now in ms)``. They only grow, also for a client that comes back on
another replica, so a returning client is never ignored as "old".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from presence.codecs import yjs
from presence.core.events import Batch, Joined, Left, MemberInfo
from presence.core.room import Room
from presence.server.outbox import Outbox

if TYPE_CHECKING:
    from presence.server.hub import Hub


class YjsView:
    def __init__(self, room: Room, hub: Hub, *, wall: Callable[[], float] = time.time) -> None:
        self.room = room
        self._wall = wall  # clocks are wall-clock milliseconds: see the module's doc
        self.clocks: dict[int, int] = {}
        # Per connection: the clock of the last state of each client ID sent to it.
        self.told: dict[Outbox[bytes], dict[int, int]] = {}
        self.renew_every = hub.settings.expire_after / 2
        self.last_renewal = hub.clock()

    # -- connections ---------------------------------------------------------------------

    def attach(self, outbox: Outbox[bytes]) -> dict[int, int]:
        """A Yjs connection of the room; returns the clocks it will have been told."""
        return self.told.setdefault(outbox, {})

    def detach(self, outbox: Outbox[bytes]) -> None:
        self.told.pop(outbox, None)

    # -- RoomObserver --------------------------------------------------------------------

    def expired(self, outbox: Outbox[Any], member_ids: set[str]) -> bool:
        # A client ID times out alone, as in y-protocols: its socket stays open, and its
        # next state brings it back.
        return outbox in self.told

    def swept(self, now: float) -> None:
        """Re-announce every state before the peers' 30 s timeout drops it."""
        if now - self.last_renewal < self.renew_every:
            return
        self.last_renewal = now
        shared = self.snapshot()
        for outbox in self.told:
            outbox.push([self.full(shared, outbox)])

    # -- encoding ------------------------------------------------------------------------

    def _clock(self, client_id: int) -> int:
        clock = max(self.clocks.get(client_id, 0) + 1, int(self._wall() * 1000))
        self.clocks[client_id] = clock
        return clock

    def _member_entry(self, member: MemberInfo) -> yjs.Line:
        client_id = yjs.client_id_of(member.id)
        clock = self._clock(client_id)
        return clock, yjs.entry(client_id, clock, orjson.dumps(yjs.yjs_state(member)))

    def shared(self, batch: Batch) -> dict[int, yjs.Line]:
        """The latest state (or removal) of every member the batch touched."""
        entries: dict[int, yjs.Line] = {}
        for event in batch.events():
            member_id = event.member.id if isinstance(event, Joined) else event.id
            if isinstance(event, Left) or member_id not in self.room:
                client_id = yjs.client_id_of(member_id)
                clock = self._clock(client_id)
                entries[client_id] = (clock, yjs.entry(client_id, clock, b"null"))
                # Forget it, or churn would grow this table: clocks are times, so one
                # handed out later is still newer.
                self.clocks.pop(client_id, None)
            else:
                member = self.room.member(member_id)
                entries[yjs.client_id_of(member_id)] = self._member_entry(member)
        return entries

    def _pick(self, shared: dict[int, yjs.Line], outbox: Outbox[bytes]) -> list[bytes]:
        """The entries for one connection, noting the clocks it is told (see echoes)."""
        own = {yjs.client_id_of(m) for m in outbox.members}
        told = self.told.get(outbox)
        picked = []
        for client_id, (clock, line) in shared.items():
            if client_id in own:
                # A client's own states are never sent back to it: it would apply the
                # server's clock to itself and send the state back again.
                continue
            if told is not None:
                told[client_id] = clock
            picked.append(line)
        return picked

    def frames(self, shared: dict[int, yjs.Line], outbox: Outbox[bytes]) -> list[bytes]:
        entries = self._pick(shared, outbox)
        return [yjs.awareness_message(entries)] if entries else []

    def snapshot(self) -> dict[int, yjs.Line]:
        """Every member's entry, with fresh clocks: a stock client that reconnects keeps
        the clocks it saw, and ignores a state that is not newer (until its renewal)."""
        return {yjs.client_id_of(m.id): self._member_entry(m) for m in self.room.snapshot()}

    def full(self, shared: dict[int, yjs.Line], outbox: Outbox[bytes]) -> bytes:
        """A complete awareness update for one connection, even if empty: a lone
        y-websocket client closes a socket that stays silent for 30 s."""
        return yjs.awareness_message(self._pick(shared, outbox))
