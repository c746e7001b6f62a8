"""The rooms of one replica, and the ticks that move their events.

The hub is the glue between the pure core and the I/O: endpoints call :meth:`Hub.join`,
:meth:`Hub.update`, :meth:`Hub.leave`; the hub feeds the rooms the time, and flushes
what they emit in ticks: each room's batch is encoded once per wire format, queued on
every local connection of the room, and published once to the backplane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

from presence.backplane.base import Backplane, Held
from presence.config import Settings
from presence.core.events import Event, MemberInfo, State
from presence.core.identity import Identity, IdentityFactory
from presence.core.room import Room, RoomError, Timing
from presence.hub.outbox import Outbox
from presence.metrics import PROTOCOLS, Metrics

log = logging.getLogger("presence.hub")


def new_replica_id() -> str:
    """New at every start, so that a restarted replica never speaks for its old members."""
    return secrets.token_hex(8)


# When flush timers fire late (the process does not get the CPU it needs: its own load,
# or other processes on the machine), ticks stretch by LAG_FACTOR times the average
# lateness, up to MAX_STRETCH times --flush-interval: a replica that falls behind batches
# more updates per frame, which costs less per update; an idle one keeps the shortest
# latency.
LAG_FACTOR = 4
MAX_STRETCH = 4

# Close code for a connection whose member expired (it sent nothing for expire_after).
CLOSE_EXPIRED = 4001


class RoomFull(RoomError):
    code = "room_full"


class Extension(Protocol):
    """What an endpoint keeps for the whole replica beside the hub's rooms (the Yjs
    endpoint's reserved client IDs), installed with :meth:`Hub.add_extension` and told
    what the backplane tells the hub about it."""

    def held_elsewhere(self, room: str, held: Sequence[Held]) -> None:
        """Items of ``room`` that another replica reserved (Backplane.publish_holds)."""


E = TypeVar("E", bound=Extension)


class RoomObserver(Protocol):
    """What an endpoint keeps for one room on this replica beside the hub's own state (the
    Yjs endpoint: clocks announced, renewals). Made by :meth:`Hub.observer`, told about
    every sweep, forgotten with the room."""

    def swept(self, now: float) -> None:
        """The hub's sweep (idle, expiry) ran at ``now`` (the hub's clock)."""

    def expired(self, outbox: Outbox[Any], member_ids: set[str]) -> bool:
        """Members of ``outbox`` expired (they are out of ``outbox.members`` already);
        True keeps its connection open, else the hub closes it with CLOSE_EXPIRED."""


Observer = TypeVar("Observer", bound=RoomObserver)


class Hub:
    def __init__(
        self,
        settings: Settings,
        *,
        identities: IdentityFactory,
        backplane: Backplane,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.identities = identities
        self.backplane = backplane
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.timing = Timing(settings.idle_after, settings.expire_after)
        self.rooms: dict[str, Room] = {}
        self.outboxes: dict[str, set[Outbox[Any]]] = {}
        self._observers: dict[str, dict[Callable[[Room, Hub], Any], RoomObserver]] = {}
        self.extensions: list[Extension] = []
        # Rooms with events to send: at the end of this loop pass (``_soon``), or at a
        # room's next tick (``_waiting``: its timer). ``_flushed``: when each room last sent.
        self._soon: set[str] = set()
        self._soon_handle: asyncio.Handle | None = None
        self._waiting: dict[str, asyncio.TimerHandle] = {}
        self._flushed: dict[str, float] = {}
        # When the earliest event waiting in each room reached the hub (self.clock), from
        # this replica's clients and from the others: the fan-out delay's start.
        self._local_since: dict[str, float] = {}
        self._remote_since: dict[str, float] = {}
        self.tick_interval = settings.flush_interval
        self.lag = 0.0  # how late flush timers fire, seconds, moving average
        self._sweeper: asyncio.Task[None] | None = None
        self._opening: dict[str, asyncio.Future[None]] = {}
        self.started = False

    @property
    def replica_id(self) -> str:
        return self.backplane.replica_id

    def sessions(self) -> dict[str, float]:
        """The connections attached to rooms, by protocol (read at scrape time)."""
        counts = dict.fromkeys(PROTOCOLS, 0.0)
        for outboxes in self.outboxes.values():
            for outbox in outboxes:
                protocol = outbox.encoder.protocol
                counts[protocol] = counts.get(protocol, 0.0) + 1
        return counts

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.backplane.start(self)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="presence-sweep")
        self.started = True

    async def stop(self) -> None:
        """Say goodbye for every local member, then stop."""
        self.started = False
        for room in self.rooms.values():
            for member in room.snapshot():
                if member.origin == self.replica_id:
                    room.leave(member.id)
            self._soon.add(room.name)
        for waiting in self._waiting.values():
            waiting.cancel()
        self._waiting.clear()
        self._flush_soon()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.backplane.stop()

    # -- commands from endpoints -------------------------------------------------------

    def attach(self, room: Room, outbox: Outbox[Any]) -> None:
        """Deliver the room's events to ``outbox`` from now on."""
        self.outboxes[room.name].add(outbox)

    def admit(
        self,
        room: Room,
        outbox: Outbox[Any],
        member_id: str,
        identity: Identity | None,
        state: State | None = None,
    ) -> Identity:
        """Add a member spoken for by ``outbox``; a new anonymous identity if none
        (``state``: a Yjs client's first state)."""
        if len(room) >= self.settings.max_room_members:
            raise RoomFull(f"room is full ({self.settings.max_room_members} members)")
        if identity is None:
            identity = self.identities.create(room.names(), room.colors())
        now = self.clock()
        given = room.join(member_id, identity, now, state)
        outbox.members.add(member_id)
        self._local_since.setdefault(room.name, now)
        self._mark(room.name)
        return given

    def leave(self, room_name: str, member_id: str, outbox: Outbox[Any]) -> None:
        """One member of a connection leaves (a Yjs client's null state)."""
        outbox.members.discard(member_id)
        room = self.rooms.get(room_name)
        if room is not None:
            room.leave(member_id)
            self._mark(room_name)

    async def members_of(self, room_name: str) -> list[MemberInfo]:
        """A room's members on every replica, whether or not this replica has it open."""
        room = self.rooms.get(room_name)
        if room is not None:
            return room.snapshot()
        return await self.backplane.members(room_name)

    async def room_counts(self) -> dict[str, int]:
        """Rooms with members on any replica, and how many."""
        counts = {name: len(room) for name, room in self.rooms.items() if len(room)}
        for name, count in (await self.backplane.rooms()).items():
            counts.setdefault(name, count)
        return counts

    def add_extension(self, extension: Extension) -> None:
        self.extensions.append(extension)

    def extension(self, kind: type[E]) -> E | None:
        """The extension of class ``kind`` installed, if any."""
        for extension in self.extensions:
            if isinstance(extension, kind):
                return extension
        return None

    def observer(self, room: Room, make: Callable[[Room, Hub], Observer]) -> Observer:
        """The room's observer made by ``make`` (a class): one per room and maker."""
        observers = self._observers.setdefault(room.name, {})
        found = observers.get(make)
        if found is None:
            found = observers[make] = make(room, self)
        return cast(Observer, found)

    async def open(self, name: str) -> Room:
        """The room, opened on the backplane (with the other replicas' members) if new."""
        while name in self._opening:
            await asyncio.shield(self._opening[name])
        room = self.rooms.get(name)
        if room is not None:
            return room
        room = self.rooms[name] = Room(
            name,
            timing=self.timing,
            replica=self.replica_id,
            max_state_bytes=self.settings.max_state_bytes,
            max_room_state_bytes=self.settings.max_room_state_bytes,
        )
        self.outboxes[name] = set()
        opened = self._opening[name] = asyncio.get_running_loop().create_future()
        try:
            room.apply(await self.backplane.open_room(name))
            room.take()  # nobody is attached yet: the snapshot is news to no one
        finally:
            del self._opening[name]
            opened.set_result(None)
        return room

    def update(self, room_name: str, member_id: str, patch: State) -> None:
        now = self.clock()
        self.rooms[room_name].update(member_id, patch, now)
        self._local_since.setdefault(room_name, now)
        self._mark(room_name)

    def replace(self, room_name: str, member_id: str, state: State) -> None:
        """A member's whole new state (Room.replace)."""
        now = self.clock()
        self.rooms[room_name].replace(member_id, state, now)
        self._local_since.setdefault(room_name, now)
        self._mark(room_name)

    def heartbeat(self, room_name: str, member_id: str) -> None:
        self.rooms[room_name].heartbeat(member_id, self.clock())

    def disconnect(self, room_name: str, outbox: Outbox[Any]) -> None:
        """A connection is gone: its members leave at once, for everyone."""
        outbox.close()
        self.outboxes.get(room_name, set()).discard(outbox)
        room = self.rooms.get(room_name)
        if room is not None:
            for member_id in outbox.members:
                room.leave(member_id)
            self._mark(room_name)
        outbox.members.clear()

    # -- what the backplane tells us (backplane.base.Listener) --------------------------

    def on_events(self, room_name: str, events: Sequence[Event]) -> None:
        room = self.rooms.get(room_name)
        if room is not None:
            room.apply(events)
            self._remote_since.setdefault(room_name, self.clock())
            self._mark(room_name, at_once=True)

    def on_full_state(self, room_name: str, origin: str, members: Sequence[MemberInfo]) -> None:
        room = self.rooms.get(room_name)
        if room is not None:
            room.sync_origin(origin, members)
            self._mark(room_name)

    def on_sync_request(self, room_name: str) -> None:
        room = self.rooms.get(room_name)
        if room is not None and room.has_local_members:
            self.backplane.publish_full_state(room_name, room.local_members())

    def on_holds(self, room_name: str, held: Sequence[Held]) -> None:
        for extension in self.extensions:
            extension.held_elsewhere(room_name, held)

    def on_replica_down(self, origin: str) -> None:
        for room in self.rooms.values():
            room.drop_origin(origin)
            if room.has_pending:
                self._mark(room.name)

    def on_reconnected(self) -> None:
        """Messages were lost while cut off: announce ours, ask for everybody else's."""
        for name, room in self.rooms.items():
            self.backplane.publish_full_state(name, room.local_members())
            self.backplane.request_sync(name)

    # -- ticks -------------------------------------------------------------------------

    def _mark(self, room_name: str, *, at_once: bool = False) -> None:
        """The room has events to send. A room that has not sent for a tick sends at the
        end of this loop pass, with whatever else the pass brought; one that sent less
        than a tick ago waits for its next tick, and batches meanwhile. Quiet rooms pay
        no latency for busy ones. Events from other replicas were batched by their
        replica already (``at_once``): waiting for a tick here too would add up to one
        to every cross-replica update."""
        if room_name in self._soon:
            return
        loop = asyncio.get_running_loop()
        waiting = self._waiting.get(room_name)
        if waiting is not None:
            if not at_once:
                return
            waiting.cancel()
            del self._waiting[room_name]
        now = loop.time()
        due = self._flushed.get(room_name, -math.inf) + self.tick_interval
        if at_once or due <= now:
            self._soon.add(room_name)
            if self._soon_handle is None:
                self._soon_handle = loop.call_soon(self._flush_soon)
        else:
            self._waiting[room_name] = loop.call_at(due, self._flush_waiting, room_name, due)

    def _flush_soon(self) -> None:
        self._soon_handle = None
        rooms, self._soon = self._soon, set()
        for name in rooms:
            try:
                self._flush(name)
            except Exception:  # a bug in one room must not hold the others back
                log.exception("flushing a room failed", extra={"room": name})

    def _flush_waiting(self, room_name: str, due: float) -> None:
        self._waiting.pop(room_name, None)
        with contextlib.suppress(RuntimeError):  # no running loop during interpreter exit
            self.observe_lag(max(0.0, asyncio.get_running_loop().time() - due))
        self._flush(room_name)

    def _flush(self, name: str) -> None:
        """Send the room's events: to the other replicas, and to its connections."""
        room = self.rooms.get(name)
        if room is None:
            self._flushed.pop(name, None)
            self._local_since.pop(name, None)
            self._remote_since.pop(name, None)
            return
        with contextlib.suppress(RuntimeError):
            self._flushed[name] = asyncio.get_running_loop().time()
        local_since = self._local_since.pop(name, None)
        remote_since = self._remote_since.pop(name, None)
        local, remote = room.take()
        if local:
            self.backplane.publish(name, *room.outgoing(local))
            self.metrics.updates_coalesced += local.coalesced
        batch = local
        if remote:
            batch.extend(remote)
        outboxes = self.outboxes[name]
        if batch and outboxes:
            shared: dict[int, Any] = {}  # one encoding per wire format
            protocols: list[str] = []
            for outbox in outboxes:
                key = id(outbox.encoder)
                if key not in shared:
                    shared[key] = outbox.encoder.shared(batch)
                    protocols.append(outbox.encoder.protocol)
                outbox.push_batch(batch, shared[key])
            if local_since is not None or remote_since is not None:
                self._observe_fanout(protocols, local_since, remote_since)
        if not outboxes and not room.has_local_members and name not in self._opening:
            # Memory must not grow with churn: an empty room is forgotten.
            del self.rooms[name]
            del self.outboxes[name]
            self._observers.pop(name, None)
            self._flushed.pop(name, None)
            self.backplane.close_room(name)

    def _observe_fanout(
        self, protocols: list[str], local_since: float | None, remote_since: float | None
    ) -> None:
        """The room's frames are written: once per batch and protocol, how long its
        earliest event waited (not once per event: this is the hot path). SSE streams are
        left out: their sink only queues, the response task writes later."""
        now = self.clock()
        for protocol in protocols:
            if protocol == "sse":
                continue
            if local_since is not None:
                self.metrics.fanout(protocol, "local", now - local_since)
            if remote_since is not None:
                self.metrics.fanout(protocol, "remote", now - remote_since)

    def observe_lag(self, late: float) -> None:
        """A flush timer fired ``late`` seconds after its time: adjust the tick."""
        self.lag += (late - self.lag) * 0.05
        base = self.settings.flush_interval
        self.tick_interval = min(MAX_STRETCH * base, base + LAG_FACTOR * self.lag)

    def sweep(self) -> None:
        """Idle and expiry for every room; close connections that stopped reading."""
        now = self.clock()
        expire_after = self.settings.expire_after
        for room in list(self.rooms.values()):
            expired = room.tick(now)
            if room.has_pending:
                self._mark(room.name)
            observers = self._observers.get(room.name, {}).values()
            for outbox in list(self.outboxes[room.name]) if expired else ():
                gone = outbox.members.intersection(expired)
                if not gone:
                    continue
                outbox.members.difference_update(gone)
                if any([o.expired(outbox, gone) for o in observers]):
                    continue
                outbox.abort(
                    CLOSE_EXPIRED, f"expired: no update or heartbeat for {expire_after:g}s"
                )
                self.disconnect(room.name, outbox)
            for observer in list(observers):
                observer.swept(now)
        limit = self.settings.slow_client_timeout
        stalled = [
            (name, outbox)
            for name, outboxes in self.outboxes.items()
            for outbox in outboxes
            if outbox.blocked_since is not None and now - outbox.blocked_since > limit
        ]
        for name, outbox in stalled:
            self.metrics.slow_client_disconnects += 1
            outbox.abort(1013, f"client too slow: it stopped reading for over {limit:g}s")
            self.disconnect(name, outbox)

    async def _sweep_forever(self) -> None:
        interval = min(0.25, self.settings.idle_after / 10)
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
            except Exception:
                log.exception("sweep failed")
