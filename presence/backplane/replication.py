"""Replication: how the replicas share their rooms, over any transport (memory, Redis).

The composition of sans-I/O parts, wired to a transport and a listener (the hub):

- :mod:`.keys`: the names of channels and keys;
- :mod:`.liveness`: which replicas are up (heartbeats, down, permdown, stalls, refused
  protocols, goodbyes);
- :mod:`.rooms`: the rooms open here (numbering, gaps, snapshots, the members hashes,
  coalesced full states, held Yjs client IDs).

Messages come in through :meth:`Replication.on_message`, time through
:meth:`Replication.tick` and the injected clock; everything sent goes to the transport
in order. A thin asyncio :class:`Driver` calls ``tick`` every ``check_interval`` and
sends the full states due ``SYNC_DELAY`` after they were asked for (tests pass
``ticking=False`` and call :meth:`~Replication.tick` and
:meth:`~Replication.send_full_states` themselves).

Full states are coalesced: asking for one (a request, or :meth:`publish_full_state`)
marks it due, and it goes out once ``SYNC_DELAY`` later, with the members as they are
then (the listener's ``on_sync_request`` publishes them): requests from N replicas
after an outage are answered by one full state each, not N.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from presence.backplane.base import Backplane, Held, Listener, Unavailable
from presence.backplane.keys import Keys
from presence.backplane.liveness import Liveness, Peer
from presence.backplane.rooms import (
    ASKED,
    OWED,
    SYNC_DELAY,
    Link,
    Rooms,
    Snapshot,
    held_ids,
)
from presence.backplane.transport import DelKey, Op, Publish, SetKey, Transport
from presence.codecs import replica as codec
from presence.core.events import Event, MemberInfo

log = logging.getLogger("presence.replication")


class Driver:
    """The asyncio side of replication: a task that calls ``tick`` every ``interval``,
    and a timer that calls ``answer`` SYNC_DELAY after :meth:`soon`."""

    def __init__(self, tick: Callable[[], None], answer: Callable[[], None], interval: float):
        self._tick = tick
        self._answer = answer
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick_forever(), name="replication")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._handle is not None:
            self._handle.cancel()  # a goodbye follows: nobody needs our state

    def soon(self) -> None:
        """Answer SYNC_DELAY from now, unless an answer is already due."""
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(SYNC_DELAY, self._answered)

    def _answered(self) -> None:
        self._handle = None
        self._answer()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self._tick()
            except Exception:
                log.exception("replication tick failed")


class Replication(Backplane):
    def __init__(
        self,
        replica_id: str,
        transport: Transport,
        *,
        replica_timeout: float = 5.0,
        permdown_after: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,  # held IDs' expiry in the hash
        prefix: str = "presence",
        sharded: bool = False,
        ticking: bool = True,  # False: the caller calls tick() (tests)
    ) -> None:
        super().__init__(replica_id)
        self.transport = transport
        self.clock = clock
        self.wall = wall
        self.keys = Keys(prefix, sharded)
        self.liveness = Liveness(replica_id, replica_timeout, permdown_after)
        self.rooms_open = Rooms(replica_id, self.keys)
        self.replica_timeout = replica_timeout
        self.heartbeat_interval = self.liveness.heartbeat_interval
        self.check_interval = self.liveness.check_interval
        self.down_after = self.liveness.down_after
        self.permdown_after = self.liveness.permdown_after
        self._me = replica_id.encode()
        self._alone = transport.alone
        self._answering: str | None = None  # the room whose full state goes out now
        self._ticking = ticking
        self._driver: Driver | None = None

    # -- what the parts count, and hold (metrics, tests) --------------------------------

    @property
    def peers(self) -> dict[str, Peer]:
        return self.liveness.peers

    @property
    def links(self) -> dict[str, Link]:
        return self.rooms_open.links

    @property
    def replicas_up(self) -> int:
        return self.liveness.replicas_up

    @property
    def downs(self) -> int:
        return self.liveness.downs

    @property
    def stalls(self) -> int:
        return self.liveness.stalls

    @property
    def gaps(self) -> int:
        return self.rooms_open.gaps

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.transport.ready

    def status(self) -> dict[str, Any] | None:
        return self.transport.status()

    @property
    def dropped(self) -> int:
        return self.transport.dropped

    @property
    def connect_failures(self) -> int:
        return self.transport.connect_failures

    @property
    def reconnects(self) -> int:
        return self.transport.reconnects

    async def start(self, listener: Listener) -> None:
        await super().start(listener)
        self.liveness.start(self.clock())
        await self.transport.subscribe(self.keys.replicas_channel)
        await self.transport.start(self)
        if self._ticking and not self._alone:
            self._driver = Driver(self.tick, self.send_full_states, self.check_interval)
            self._driver.start()

    async def stop(self) -> None:
        if self._driver is not None:
            await self._driver.stop()
        # After the last events, on the same path: it cannot overtake them. Our members'
        # fields went with their leaves; the liveness key goes after the goodbye.
        if not self._alone:
            self._send(
                [
                    Publish(self.keys.replicas_channel, self._envelope({"k": "b"})),
                    DelKey(self.keys.replica(self.replica_id)),
                ]
            )
        await self.transport.stop()
        await super().stop()

    def tick(self) -> None:
        """Heartbeat, and judge the other replicas; called every ``check_interval``."""
        now = self.clock()
        if self.liveness.stalled(now):
            self.on_up()  # the others have presumably given up on us: say who we are
        if self.liveness.beat_due(now):
            self._beat(now)
        self._expire_holds(now)
        if self.rooms_open.closed and self.transport.ready:
            self.rooms_open.forget_closed(now, self.replica_timeout)
        judged = self.liveness.judge(now)
        for origin in judged.down:
            if self.listener is not None:
                self.listener.on_replica_down(origin)
        for origin, clean in judged.forgotten:
            if clean:
                self._send(self.rooms_open.forget(origin))

    def _beat(self, now: float) -> None:
        self.liveness.beat(now)
        ops: list[Op] = [
            SetKey(self.keys.replica(self.replica_id), round(self.down_after * 1000)),
            Publish(self.keys.replicas_channel, self._envelope({"k": "h", "v": codec.PROTOCOL})),
        ]
        self._send(ops + self.rooms_open.due_hash_ops(now))

    # -- what the transport tells us (transport.Receiver) -------------------------------

    def on_up(self) -> None:
        """Connected, or back after an outage or a stall: messages were lost."""
        if self._alone:
            return
        now = self.clock()
        closed = self.rooms_open.reconnected()
        self.liveness.reconnected(now)
        self._beat(now)
        # Rooms we closed meanwhile: the leaves that emptied them may be lost; an empty
        # full state removes our members there (and our fields of the hash).
        for room in closed:
            self._send(self.rooms_open.full_state(room, None, [], now))
        if self.listener is not None:
            try:
                self.listener.on_reconnected()  # its full states are coalesced
            except Exception:
                log.exception("re-synchronising failed")

    def on_message(self, channel: str, data: bytes) -> None:
        try:
            self._receive(channel, data)
        except Exception:
            log.exception("bad backplane message ignored")

    def _receive(self, channel: str, data: bytes) -> None:
        sender, body = codec.open_envelope(data)
        now = self.clock()
        if sender == self._me:
            if channel == self.keys.replicas_channel:
                self.liveness.heard_self(now)
            return
        if self.listener is None:
            return
        message = codec.loads(body)
        origin = sender.decode()
        heard = self.liveness.heard(origin, message, now)
        if heard.down:
            self.listener.on_replica_down(origin)
        if not heard.deliver:
            return
        if heard.back:
            for name in self.rooms_open.back(origin):
                self._ask(name, origin)
        room = self.keys.room_of_channel(channel)
        link = self.links.get(room) if room is not None else None
        if room is None or link is None:
            return
        if link.opening is not None:
            link.opening.append((origin, message))
        else:
            self._deliver(room, link, origin, message)

    def _deliver(self, room: str, link: Link, origin: str, message: dict[str, Any]) -> None:
        assert self.listener is not None
        if self.rooms_open.numbered(room, link, origin, message):
            self._ask(room, origin)  # messages from it were lost
        kind = message.get("k")
        if kind == "e":
            self.listener.on_events(room, codec.events_from_json(message["e"]))
        elif kind == "f":
            members = [codec.member_from_json(m) for m in message["m"]]
            self.listener.on_full_state(room, origin, members)
        elif kind == "o":
            self.listener.on_holds(room, held_ids(message.get("h")))
        elif kind == "q":
            target = message.get("t")
            if target is None or target == self.replica_id:
                self._owe(link, ASKED)
        # Other kinds: a newer replica's (rolling deploy); ignored.

    # -- rooms -------------------------------------------------------------------------

    async def open_room(self, room: str) -> list[Event]:
        link = self.rooms_open.open(room)
        if self._alone:
            link.opening = None
            return []
        snapshot: Snapshot = {}
        try:
            # Subscribed before the read: a message published meanwhile is either in
            # the snapshot or buffered, and the buffer is sorted out below.
            await self.transport.subscribe(self.keys.channel(room))
            snapshot = await self._read_members(room)
            await self._read_holds(room)
        except Unavailable:
            pass  # the answers to the request below fill the room
        except Exception:
            log.exception("reading a room's members failed", extra={"room": room})
        finally:
            buffered, link.opening = link.opening or [], None  # never left buffering
        events = self.rooms_open.merge(room, link, snapshot, buffered, self._deliver)
        # The hash lags behind the messages (a moving member's state is written at most
        # every HASH_INTERVAL), and Redis may have been away: the other replicas' answers
        # bring their current state (only differences become events). This request
        # also tells them where our numbering in the room starts.
        self._ask(room)
        if link.due:
            self._schedule()  # requests that came while we were opening
        return events

    def close_room(self, room: str) -> None:
        self.links.pop(room, None)
        if not self._alone:
            self.transport.unsubscribe(self.keys.channel(room))
            self.rooms_open.close(room, self.clock())

    async def _read_members(self, room: str) -> Snapshot:
        """The room's members hash, less our own members and those of replicas down."""
        raw = await self.transport.hgetall(self.keys.members(room))
        snapshot = self.rooms_open.read_snapshot(room, raw)
        alive = await self._alive({m.origin for _, m in snapshot.values()})
        return {f: (s, m) for f, (s, m) in snapshot.items() if m.origin in alive}

    async def _read_holds(self, room: str) -> None:
        """Pass the room's held client IDs that have not lapsed to the listener."""
        raw = await self.transport.hgetall(self.keys.holds(room))
        held = self.rooms_open.read_holds(raw, self.wall())
        if held is not None and self.listener is not None:
            self.listener.on_holds(room, held)

    async def _alive(self, origins: set[str]) -> set[str]:
        """The replicas up, as we hear them; for one we never heard, its liveness key,
        whose remaining time tells when it last beat."""
        alive = set()
        for origin in origins:
            if not self.liveness.knows(origin):
                left = await self.transport.ttl(self.keys.replica(origin))
                if left <= 0:
                    continue
                self.liveness.heard_of(origin, left, self.clock())
            if self.liveness.is_up(origin):
                alive.add(origin)
        return alive

    async def members(self, room: str) -> list[MemberInfo]:
        try:
            return [m for _, m in (await self._read_members(room)).values()]
        except Unavailable:
            return []

    async def rooms(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        try:
            for key in await self.transport.scan(self.keys.members_pattern):
                origins = [f.split("/", 1)[0] for f in await self.transport.hkeys(key)]
                alive = await self._alive(set(origins) - {self.replica_id}) | {self.replica_id}
                count = sum(1 for o in origins if o in alive)
                if count:
                    counts[self.keys.room_of_members(key)] = count
        except Unavailable:
            pass  # a partial answer while the store is away; /readyz says so
        return counts

    # -- publishing --------------------------------------------------------------------

    def publish(
        self, room: str, events: Sequence[Event], current: Sequence[MemberInfo], gone: Sequence[str]
    ) -> None:
        if self._alone:
            return  # nobody to tell, nobody to read the hash
        link = self.rooms_open.link(room)
        if link is not None:
            self._send(self.rooms_open.events(room, link, events, current, gone, self.clock()))

    def publish_full_state(self, room: str, members: Sequence[MemberInfo]) -> None:
        """Coalesced: while answering (:meth:`send_full_states`), sent at once; otherwise
        marked due, and sent within SYNC_DELAY with the members as they are then."""
        if self._alone:
            return
        link = self.rooms_open.link(room)
        if link is None:
            return
        if self._answering == room:
            self._send(self.rooms_open.full_state(room, link, members, self.clock()))
        else:
            self._owe(link, OWED)

    def publish_holds(self, room: str, held: Sequence[Held]) -> None:
        if self._alone or not held:
            return
        self._send(self.rooms_open.hold(room, held, self.clock(), self.wall()))

    def _expire_holds(self, now: float) -> None:
        """Delete our fields of holds that lapsed."""
        lapsed = self.rooms_open.expire_holds(now)
        if lapsed and not self._alone:
            self._send(self.rooms_open.holds_lapsed(lapsed))

    def _owe(self, link: Link, why: int) -> None:
        link.due = max(link.due, why)
        self._schedule()

    def _schedule(self) -> None:
        if self._driver is not None and self.listener is not None:
            self._driver.soon()

    def send_full_states(self) -> None:
        """Send the full states due: one per room, however many asked (called
        SYNC_DELAY after the first request; tests call it)."""
        for room, link in list(self.links.items()):
            if not link.due or link.opening is not None or self.listener is None:
                continue  # a room still opening answers once open
            owed, seq = link.due, link.seq
            self._answering = room
            try:
                self.listener.on_sync_request(room)  # publish_full_state, if it has members
            except Exception:
                log.exception("sending a full state failed", extra={"room": room})
            finally:
                self._answering = None
            if link.seq == seq and owed == OWED and self.links.get(room) is link:
                # Re-announced: none of ours here.
                self._send(self.rooms_open.full_state(room, link, [], self.clock()))
            link.due = 0

    def request_sync(self, room: str) -> None:
        if not self._alone:
            self._ask(room)

    def _ask(self, room: str, target: str | None = None) -> None:
        self._send([self.rooms_open.ask(room, target)])

    def _envelope(self, message: dict[str, Any]) -> bytes:
        return codec.envelope(self.replica_id, message)

    def _send(self, ops: Sequence[Op]) -> None:
        if ops:
            self.transport.send(ops)
