"""One room as the Yjs connections of this replica see it: a room observer of the hub
(:class:`presence.hub.hub.RoomObserver`) and the Yjs encoder of the room's batches.

It holds what only Yjs needs: the clocks announced for each client ID, the clocks each
connection was told (to recognise the copies stock clients send back), the renewals
that keep peers from timing states out (each state when it comes due, not the room
at once), that a Yjs client ID expires alone (its
socket stays open), and which departed client IDs are still reserved (:class:`Holds`).

Clocks: the server re-announces states (idle marks, renewals, a reconnecting client), so
the clocks peers see are the server's, not the clients': each announcement gets
``max(last + 1, now in ms)``. They only grow, also for a client that comes back on
another replica, so a returning client is never ignored as "old".
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from presence.core.events import Batch, Joined, Left, MemberInfo
from presence.core.room import Room
from presence.hub.outbox import Outbox
from presence.yjs import codec as yjs
from presence.yjs.echoes import Echoes
from presence.yjs.holds import Holds

if TYPE_CHECKING:
    from presence.hub.hub import Hub


# Client IDs one socket may keep reserved at once after they left it; beyond that its
# oldest reservation lapses (a socket churning IDs only weakens its own protection).
MAX_HELD_PER_SOCKET = 64


class YjsView:
    protocol = "yjs"  # as an encoder of the room's batches (server.outbox.Encoder)

    def __init__(self, room: Room, hub: Hub, *, wall: Callable[[], float] = time.time) -> None:
        self.room = room
        self._wall = wall  # clocks are wall-clock milliseconds: see the module's doc
        self.clocks: dict[int, int] = {}
        # Per connection: the clock of the last state of each client ID sent to it.
        self.told: dict[Outbox[bytes], dict[int, int]] = {}
        # y-protocols drops a state not renewed for 30 s, whatever our expiry.
        self.renew_every = min(hub.settings.expire_after / 2, 15.0)
        # When each member's state was last sent to every connection (hub clock), the
        # oldest first: renewals are due from the front. A snapshot for one connection
        # (a joiner, a query) does not count.
        self.renewed: OrderedDict[str, float] = OrderedDict(
            (m.id, hub.clock()) for m in room.snapshot()
        )
        # When each connection was last sent anything (the hub's clock): a lone stock
        # client closes a socket that stays silent for 30 s.
        self.heard: dict[Outbox[bytes], float] = {}
        self.clock = hub.clock
        self.flushed = hub.clock()  # when the last frame was encoded
        self.holds = Holds.of(hub)
        self.digest = hub.identities.digest
        # Per connection: its identity token's username (or None), and the client IDs
        # it released that are still reserved for it, oldest first.
        self.keys: dict[Outbox[bytes], str | None] = {}
        self.released: dict[Outbox[bytes], OrderedDict[int, None]] = {}
        self.echoes: Echoes[Outbox[bytes]] = Echoes()
        # The messages encoded from the last shared entries, by the client IDs left out
        # (a connection's own): most connections get the same one, framed once.
        self._encoded: tuple[object, dict[tuple[int, ...], list[bytes]]] = (None, {})

    # -- connections ---------------------------------------------------------------------

    def attach(self, outbox: Outbox[bytes], key: str | None = None) -> dict[int, int]:
        """A Yjs connection of the room (``key``: its identity token's username); returns
        the clocks it will have been told."""
        # Replicas compare digests (they share the secret): usernames stay here.
        self.keys[outbox] = None if key is None else self.digest(key)
        self.heard[outbox] = self.clock()
        self.released[outbox] = OrderedDict()
        return self.told.setdefault(outbox, {})

    def detach(self, outbox: Outbox[bytes]) -> None:
        """The connection closed: its client IDs, and those it released, stay reserved
        for its identity token only, until their holds lapse."""
        self.release(outbox, [yjs.client_id_of(m) for m in outbox.members])
        for client_id in self.released.pop(outbox, {}):
            hold = self.holds.get(self.room.name, client_id)
            if hold is not None and hold.owner is outbox:
                hold.owner = None
        self.keys.pop(outbox, None)
        self.told.pop(outbox, None)
        self.heard.pop(outbox, None)
        self.echoes.forget(outbox)

    # -- client IDs ----------------------------------------------------------------------

    def release(self, outbox: Outbox[bytes], client_ids: Iterable[int]) -> None:
        """Client IDs left ``outbox`` (null, expiry, close): reserve them for it."""
        released = self.released.get(outbox)
        if released is None:
            return
        client_ids = list(client_ids)
        self.holds.hold(self.room.name, client_ids, outbox, self.keys.get(outbox))
        for client_id in client_ids:
            released.pop(client_id, None)
            released[client_id] = None
            if len(released) > MAX_HELD_PER_SOCKET:
                oldest, _ = released.popitem(last=False)
                hold = self.holds.get(self.room.name, oldest)
                if hold is not None and hold.owner is outbox:
                    self.holds.discard(self.room.name, oldest)

    def may_bind(self, outbox: Outbox[bytes], client_id: int) -> bool:
        """Whether ``outbox`` may take ``client_id`` (no member has it): not while it is
        reserved for another socket, unless this one has the same identity token."""
        hold = self.holds.get(self.room.name, client_id)
        if hold is None or hold.owner is outbox:
            return True
        return hold.key is not None and hold.key == self.keys.get(outbox)

    def bound(self, outbox: Outbox[bytes], client_id: int) -> None:
        """``outbox`` took ``client_id``: its hold, if any, is over."""
        self.holds.discard(self.room.name, client_id)
        released = self.released.get(outbox)
        if released is not None:
            released.pop(client_id, None)

    # -- RoomObserver --------------------------------------------------------------------

    def expired(self, outbox: Outbox[Any], member_ids: set[str]) -> bool:
        # A client ID times out alone, as in y-protocols: its socket stays open, and its
        # next state brings it back (it stays reserved for that socket meanwhile).
        if outbox not in self.told:
            return False
        self.release(outbox, [yjs.client_id_of(m) for m in member_ids])
        return True

    def swept(self, now: float) -> None:
        """Re-announce each state not sent to everyone for ``renew_every``, before the
        peers' 30 s timeout drops it: a few at each sweep, as they come due. (Re-announcing
        the whole room at once made every connection receive, and every stock client
        echo back, all the room's states in the same moment: in a room of 300, a burst
        that held the presenter's cursor back by half a second.)"""
        shared: dict[int, yjs.Line] = {}
        renewed = self.renewed
        while renewed:
            member_id, last = next(iter(renewed.items()))
            if now - last < self.renew_every:
                break
            del renewed[member_id]
            if member_id in self.room:
                shared[yjs.client_id_of(member_id)] = self._member_entry(
                    self.room.member(member_id)
                )
                renewed[member_id] = now
        for outbox in self.told:
            quiet = now - self.heard.get(outbox, now)
            self.echoes.quiet(outbox, quiet)
            if not shared and quiet < self.renew_every:
                continue
            message = self._message(shared, outbox, empty=quiet >= self.renew_every)
            if message is not None:
                outbox.push(message)
                self.heard[outbox] = now

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
        self.flushed = now = self.clock()  # once per frame, for all its recipients
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
                self.renewed.pop(member_id, None)
            else:
                member = self.room.member(member_id)
                entries[yjs.client_id_of(member_id)] = self._member_entry(member)
                self.renewed.pop(member_id, None)
                self.renewed[member_id] = now  # sent to everyone: renewed
        return entries

    def _message(
        self,
        shared: dict[int, yjs.Line],
        outbox: Outbox[bytes],
        *,
        empty: bool = False,
        once: bool = False,
    ) -> list[bytes] | None:
        """The message for one connection (``None`` if it has no entries, unless
        ``empty``), noting the clocks it is told (see echoes). Encoded once for every
        connection that gets the same entries, unless ``shared`` is for this one only
        (``once``: a snapshot, which is not kept)."""
        own = {yjs.client_id_of(m) for m in outbox.members}
        told = self.told.get(outbox)
        picked = []
        left_out = []
        for client_id, (clock, line) in shared.items():
            if client_id in own:
                # A client's own states are never sent back to it: it would apply the
                # server's clock to itself and send the state back again.
                left_out.append(client_id)
                continue
            if told is not None:
                told[client_id] = clock
            picked.append(line)
        if not picked and not empty:
            return None
        if once:
            message = [yjs.awareness_message(picked)]
        else:
            source, encoded = self._encoded
            if source is not shared:
                encoded = {}
                self._encoded = (shared, encoded)
            key = tuple(left_out)
            found = encoded.get(key)
            if found is None:
                found = encoded[key] = [yjs.awareness_message(picked)]
            message = found
        if told is not None:  # an attached connection: forgotten when it detaches
            self.echoes.sent(outbox, message[0])
        return message

    def frames(self, shared: dict[int, yjs.Line], outbox: Outbox[bytes]) -> list[bytes]:
        message = self._message(shared, outbox)
        if message is None:
            return []
        self.heard[outbox] = self.flushed
        return message

    def snapshot(self) -> dict[int, yjs.Line]:
        """Every member's entry, with fresh clocks: a stock client that reconnects keeps
        the clocks it saw, and ignores a state that is not newer (until its renewal)."""
        return {yjs.client_id_of(m.id): self._member_entry(m) for m in self.room.snapshot()}

    def full(self, shared: dict[int, yjs.Line], outbox: Outbox[bytes]) -> bytes:
        """A complete awareness update for one connection, even if empty: a lone
        y-websocket client closes a socket that stays silent for 30 s."""
        message = self._message(shared, outbox, empty=True, once=True)
        assert message is not None
        return message[0]
