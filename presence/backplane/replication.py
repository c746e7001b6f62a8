"""Replication: how the replicas share their rooms, over any transport (memory, Redis).

Sans-I/O at heart: messages come in through :meth:`Replication.on_message`, time through
:meth:`Replication.tick` and the injected clock; everything sent goes to the transport
in order. A thin task calls ``tick`` every ``check_interval``.

Names (``{room}`` is a hash tag: a room's keys and channel share one Redis Cluster slot):

- ``presence:{room}``: the room's channel. Messages (:mod:`presence.codecs.replica`):
  events (``e``) and complete member sets (``f``), numbered per sender and room (``s``);
  state requests (``q``, to everyone or to one replica, ``t``; with the number of the
  sender's last message in the room).
- ``presence:{room}:members``: hash ``origin/member_id`` -> latest state and the number
  of the message that wrote it; read by a replica that opens the room (its snapshot).
- ``presence:replicas`` (``presence:{replicas}`` when sharded): heartbeats (``h``) and
  goodbyes (``b``).
- ``presence:replica:ID``: exists while a replica heartbeats (deleted after its
  goodbye); tells a replica that never heard another whether that one is alive, and
  when it last beat.

Liveness follows Phoenix.Tracker. A replica not heard for ``down_after`` is *down*: its
members leave our views. It is judged from heartbeats *received* (publishing works when
Redis refuses writes), and only while we hear our own heartbeats: a frozen Redis or a
stalled subscription is not taken for everyone's death. Anything from a down replica
brings it back up, and we ask it for its full state. A replica whose own timers ran
late by more than ``down_after`` (stopped, starved) knows the others gave up on it and
re-announces itself. After ``permdown_after`` of silence a replica is forgotten and its
fields are deleted from the hashes of the rooms we have open (other rooms' hashes keep
them until they expire, ``HASH_TTL_MS`` after their last write; readers skip the fields
of replicas whose liveness key is gone). A replica that said goodbye deleted its own.

Pub/sub is at-most-once: a gap in a sender's numbers (a subscriber buffer overflow, a
lost message) makes us ask that sender for its full state in that room; an outage makes
everyone re-announce (``on_reconnected``). State is re-synchronised, never replayed. A
replica numbers its messages in a room on from where it left off in all rooms: one that
closes a room and opens it again jumps; its first message there, an untargeted request,
carries its number, which is where the others count from.

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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from presence.backplane.base import Backplane, Held, Listener, Unavailable
from presence.backplane.keys import Keys
from presence.backplane.transport import (
    DelKey,
    HashDel,
    HashReplace,
    HashSet,
    Op,
    Publish,
    SetKey,
    Transport,
)
from presence.codecs import replica as codec
from presence.core.events import Event, Joined, Left, MemberInfo

log = logging.getLogger("presence.replication")

HASH_TTL_MS = 24 * 3600 * 1000  # backstop for hashes left by replicas that all died
HASH_INTERVAL = 1.0  # seconds between writes of a moving member's state to the hash
# A room's held client IDs outlive their grace in Redis by this much at most: the key
# expires then, and each writer deletes its own fields once they lapsed.
HOLD_MARGIN_MS = 5000
SYNC_DELAY = 0.05  # seconds requests for a full state are gathered before it is sent
MAX_CLOSED = 100_000  # rooms closed lately, remembered to be emptied after an outage

# Link.due: a full state is owed in the room because someone asked for it (sent if we
# have members there), or because we must re-announce ourselves (sent even if empty).
ASKED, OWED = 1, 2


@dataclass(slots=True)
class Peer:
    """Another replica, as heard from here."""

    last_seen: float
    down_since: float | None = None  # None while up
    gone: bool = False  # said goodbye: whatever comes after is a straggler
    protocol: int | None = None  # the format it speaks, once a heartbeat said
    refused: bool = False  # it speaks a format too old for this replica: not heard


@dataclass(slots=True)
class Link:
    """A room this replica has open."""

    seq: int  # the number of our last message in the room
    heard: dict[str, int] = field(default_factory=dict)  # replica -> its last number here
    opening: list[tuple[str, dict[str, Any]]] | None = None  # arrived during the snapshot
    pending: dict[str, MemberInfo | None] = field(default_factory=dict)  # hash writes due
    hash_written: float = -float("inf")
    due: int = 0  # a full state owed: 0, ASKED or OWED


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
        # A replica killed just after a heartbeat was last heard at the kill, and is
        # declared down at the first check after down_after: at most down_after +
        # check_interval (0.8 x replica_timeout) later; killed just before one, no sooner
        # than down_after - heartbeat_interval (0.5 x). The rest is slack for late timers
        # and the flush to clients. A live replica is declared down only after missing
        # three heartbeats in a row.
        self.replica_timeout = replica_timeout
        self.heartbeat_interval = replica_timeout / 5
        self.check_interval = replica_timeout / 10
        self.down_after = replica_timeout - self.heartbeat_interval - self.check_interval
        self.permdown_after = max(permdown_after, replica_timeout)
        self._me = replica_id.encode()
        self.peers: dict[str, Peer] = {}
        self.links: dict[str, Link] = {}
        # Rooms closed while Redis was away (or shortly before), by when: their last
        # leaves may have been lost, so they are emptied when it is back.
        self._closed: dict[str, float] = {}
        self._sent = 0  # messages sent in all rooms: a reopened room's numbers go on
        # Our fields in rooms' holds keys, by when they lapse (monotonic), to delete.
        self._holds_out: deque[tuple[float, str, str]] = deque()
        self._holds_last: dict[tuple[str, str], float] = {}  # the latest lapse of each
        self._alone = transport.alone
        self._answering: str | None = None  # the room whose full state goes out now
        self._answer_handle: asyncio.TimerHandle | None = None
        self._heard_self = -float("inf")  # when our last heartbeat came back to us
        self._last_tick: float | None = None
        self._last_beat = -float("inf")
        self._ticking = ticking
        self._task: asyncio.Task[None] | None = None
        self.gaps = 0  # messages found missing from another replica
        self.stalls = 0  # times this replica found its own timers far behind
        self.downs = 0  # times another replica was declared down

    # -- names (presence.backplane.keys) ----------------------------------------------

    def channel(self, room: str) -> str:
        return self.keys.channel(room)

    def members_key(self, room: str) -> str:
        return self.keys.members(room)

    def holds_key(self, room: str) -> str:
        return self.keys.holds(room)

    @property
    def replicas_channel(self) -> str:
        return self.keys.replicas_channel

    def replica_key(self, replica: str) -> str:
        return self.keys.replica(replica)

    def _room_of(self, channel: str) -> str | None:
        return self.keys.room_of_channel(channel)

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

    @property
    def replicas_up(self) -> int:
        return sum(1 for p in self.peers.values() if p.down_since is None)

    async def start(self, listener: Listener) -> None:
        await super().start(listener)
        self._last_tick = self.clock()
        await self.transport.subscribe(self.replicas_channel)
        await self.transport.start(self)
        if self._ticking and not self._alone:
            self._task = asyncio.create_task(self._tick_forever(), name="replication")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._answer_handle is not None:
            self._answer_handle.cancel()  # a goodbye follows: nobody needs our state
        # After the last events, on the same path: it cannot overtake them. Our members'
        # fields went with their leaves; the liveness key goes after the goodbye.
        if not self._alone:
            self._send(
                [
                    Publish(self.replicas_channel, self._envelope({"k": "b"})),
                    DelKey(self.replica_key(self.replica_id)),
                ]
            )
        await self.transport.stop()
        await super().stop()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                self.tick()
            except Exception:
                log.exception("replication tick failed")

    def tick(self) -> None:
        """Heartbeat, and judge the other replicas; called every ``check_interval``."""
        now = self.clock()
        if self._last_tick is not None and now - self._last_tick > self.down_after:
            # Our own timers ran that late: this process was stopped or starved, and the
            # others have presumably given up on us. Say who we are again.
            self.stalls += 1
            late = round(now - self._last_tick, 1)
            log.warning(
                f"this replica stalled for {late:g} s (over {self.down_after:g} s): "
                "announcing its members again",
                extra={"stalled_for": late},
            )
            self._last_tick = now
            self.on_up()
        self._last_tick = now
        if now - self._last_beat >= self.heartbeat_interval:
            self._beat(now)
        self._expire_holds(now)
        if self._closed and self.transport.ready:
            for room, closed in list(self._closed.items()):  # oldest first
                if now - closed <= self.replica_timeout:
                    break
                del self._closed[room]
        for origin, peer in list(self.peers.items()):
            silent = now - peer.last_seen
            if peer.down_since is None:
                # Silent for down_after while the bus demonstrably worked: our own
                # heartbeat came back after it had missed most of that time.
                heard = self._heard_self - peer.last_seen
                if silent > self.down_after and heard > self.down_after - self.heartbeat_interval:
                    self._down(origin, peer, now)
            elif silent > self.permdown_after:
                del self.peers[origin]
                log.info("replica forgotten", extra={"replica": origin})
                if not peer.gone:  # a replica that said goodbye deleted its fields
                    prefix = origin + "/"
                    self._send(
                        [HashReplace(self.members_key(r), prefix, {}, 0) for r in self.links]
                    )

    def _down(self, origin: str, peer: Peer, now: float) -> None:
        peer.down_since = now
        self.downs += 1
        silent = round(now - peer.last_seen, 1)
        log.info("replica down", extra={"replica": origin, "silent_for": silent})
        if self.listener is not None:
            self.listener.on_replica_down(origin)

    def _beat(self, now: float) -> None:
        self._last_beat = now
        ops: list[Op] = [
            SetKey(self.replica_key(self.replica_id), round(self.down_after * 1000)),
            Publish(self.replicas_channel, self._envelope({"k": "h", "v": codec.PROTOCOL})),
        ]
        for room, link in self.links.items():
            if link.pending and now - link.hash_written >= HASH_INTERVAL:
                ops += self._hash_ops(room, link, now)
        self._send(ops)

    # -- what the transport tells us (transport.Receiver) -------------------------------

    def on_up(self) -> None:
        """Connected, or back after an outage or a stall: messages were lost."""
        if self._alone:
            return
        now = self.clock()
        for link in self.links.values():
            link.heard.clear()  # numbers from before are no basis for finding gaps
        for peer in self.peers.values():
            if peer.down_since is None:
                peer.last_seen = max(peer.last_seen, now)  # we could not hear them
        self._beat(now)
        # Rooms we closed meanwhile: the leaves that emptied them may be lost; an empty
        # full state removes our members there (and our fields of the hash).
        closed, self._closed = self._closed, {}
        for room in closed:
            if room not in self.links and not self._alone:
                self._full_state(room, None, [])
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
            if channel == self.replicas_channel:
                self._heard_self = now
            return
        if self.listener is None:
            return
        message = codec.loads(body)
        origin = sender.decode()
        peer = self.peers.get(origin)
        if peer is None:
            peer = self.peers[origin] = Peer(now)
        elif peer.gone:
            return
        if message.get("k") == "h":
            self._heard_protocol(origin, peer, message.get("v", 1), now)
        if peer.refused:
            # Down for us while it runs (its members are not shown); forgotten only once
            # silent, as any replica.
            peer.last_seen = now
            return
        down_since, peer.down_since, peer.last_seen = peer.down_since, None, now
        if message.get("k") == "b":
            peer.gone, peer.down_since = True, now
            self.listener.on_replica_down(origin)
            return
        if down_since is not None:
            log.info(
                "replica back: asking for its state",
                extra={"replica": origin, "down_for": round(now - down_since, 1)},
            )
            for name, open_link in self.links.items():
                open_link.heard.pop(origin, None)  # asked already: a gap need not ask again
                self._ask(name, origin)
        room = self._room_of(channel)
        link = self.links.get(room) if room is not None else None
        if room is None or link is None:
            return
        if link.opening is not None:
            link.opening.append((origin, message))
        else:
            self._deliver(room, link, origin, message)

    def _heard_protocol(self, origin: str, peer: Peer, version: Any, now: float) -> None:
        """A heartbeat said which format ``origin`` speaks: say so when it is not ours,
        and stop hearing it if it is too old (as if it had gone: its members leave)."""
        if version == peer.protocol or not isinstance(version, int):
            return
        peer.protocol = version
        extra = {"replica": origin, "protocol": version, "ours": codec.PROTOCOL}
        if version < codec.OLDEST_PROTOCOL:
            peer.refused, peer.down_since = True, now
            log.warning(
                f"replica {origin} speaks replication protocol {version}, older than this "
                f"replica reads ({codec.OLDEST_PROTOCOL} to {codec.PROTOCOL}): not heard "
                "until it is upgraded; its members are not shown here",
                extra=extra,
            )
            if self.listener is not None:
                self.listener.on_replica_down(origin)
        elif version != codec.PROTOCOL:
            log.info(
                f"replica {origin} speaks replication protocol {version} (this one "
                f"{codec.PROTOCOL}): relaying with it",
                extra=extra,
            )

    def _deliver(self, room: str, link: Link, origin: str, message: dict[str, Any]) -> None:
        assert self.listener is not None
        kind, seq = message.get("k"), message.get("s")
        if kind in ("e", "f") and message.get("r") == 1 and isinstance(seq, int):
            last = link.heard.get(origin)
            link.heard[origin] = seq if last is None else max(last, seq)
            if kind == "e" and last is not None and seq > last + 1:
                self.gaps += 1
                log.info(
                    "messages from a replica lost: asking for its state",
                    extra={"replica": origin, "room": room, "missing": seq - last - 1},
                )
                self._ask(room, origin)
        if kind == "e":
            self.listener.on_events(room, codec.events_from_json(message["e"]))
        elif kind == "f":
            members = [codec.member_from_json(m) for m in message["m"]]
            self.listener.on_full_state(room, origin, members)
        elif kind == "o":
            self.listener.on_holds(room, _holds(message.get("h")))
        elif kind == "q":
            target = message.get("t")
            if target is None:
                # To everyone: sent by a replica that opens the room (its numbering here
                # jumps if it had it open before), or that lost messages. Count from it.
                if message.get("r") == 1 and isinstance(seq, int):
                    link.heard[origin] = seq
                else:
                    link.heard.pop(origin, None)
            if target is None or target == self.replica_id:
                self._owe(room, link, ASKED)
        # Other kinds: a newer replica's (rolling deploy); ignored.

    # -- rooms -------------------------------------------------------------------------

    async def open_room(self, room: str) -> list[Event]:
        link = self.links[room] = Link(seq=self._sent, opening=[])
        self._closed.pop(room, None)
        if self._alone:
            link.opening = None
            return []
        snapshot: dict[str, tuple[int, MemberInfo]] = {}
        try:
            # Subscribed before the read: a message published meanwhile is either in
            # the snapshot or buffered, and the buffer is sorted out below.
            await self.transport.subscribe(self.channel(room))
            snapshot = await self._read_members(room)
            await self._read_holds(room)
        except Unavailable:
            pass  # the answers to the request below fill the room
        except Exception:
            log.exception("reading a room's members failed", extra={"room": room})
        finally:
            buffered, link.opening = link.opening or [], None  # never left buffering
        events = self._merge(room, link, snapshot, buffered)
        # The hash lags behind the messages (a moving member's state is written at most
        # every HASH_INTERVAL), and Redis may have been away: the other replicas' answers
        # bring their current state (only differences become events). This request
        # also tells them where our numbering in the room starts.
        self._ask(room)
        if link.due:
            self._schedule()  # requests that came while we were opening
        return events

    def _merge(
        self,
        room: str,
        link: Link,
        snapshot: dict[str, tuple[int, MemberInfo]],
        buffered: list[tuple[str, dict[str, Any]]],
    ) -> list[Event]:
        """The snapshot as events, followed by what arrived while it was read, in order,
        less what it already has. A field of the hash holds the number of its writer's
        last message when it was written: a message not newer is in the snapshot."""
        events: list[Event] = [Joined(m) for _, m in snapshot.values()]
        seqs = {m.id: s for s, m in snapshot.values()}  # member -> its record's number
        newest: dict[str, int] = {}  # replica -> the newest number of its fields
        present = {m.id: m.origin for _, m in snapshot.values()}  # as the events stand
        for s, m in snapshot.values():
            newest[m.origin] = max(newest.get(m.origin, s), s)
        for origin, message in buffered:
            kind, seq = message.get("k"), message.get("s")
            try:
                if kind in ("q", "o"):
                    self._deliver(room, link, origin, message)
                    continue
                if kind not in ("e", "f"):
                    continue
                if message.get("r") == 1 and isinstance(seq, int):
                    link.heard[origin] = max(link.heard.get(origin, seq), seq)
                if kind == "e":
                    for event in codec.events_from_json(message["e"]):
                        member_id = event.member.id if isinstance(event, Joined) else event.id
                        if isinstance(seq, int) and seqs.get(member_id, -1) >= seq:
                            continue  # the snapshot has this or newer
                        events.append(event)
                        if isinstance(event, Joined):
                            present[member_id] = origin
                        elif isinstance(event, Left):
                            present.pop(member_id, None)
                    continue
                # A full state older than the snapshot's fields of its sender would
                # bring back members who left since (their leaves are in the snapshot,
                # or buffered before it): skipped. A newer one replaces them.
                if isinstance(seq, int) and newest.get(origin, -1) >= seq:
                    continue
                members = [codec.member_from_json(m) for m in message["m"]]
                ids = {m.id for m in members if m.origin == origin}
                for member_id, o in list(present.items()):
                    if o == origin and member_id not in ids:
                        events.append(Left(member_id))
                        del present[member_id]
                for m in members:
                    if m.origin == origin:
                        events.append(Joined(m))
                        present[m.id] = origin
            except Exception:
                log.exception("bad backplane message ignored")
        return events

    def close_room(self, room: str) -> None:
        self.links.pop(room, None)
        if not self._alone:
            self.transport.unsubscribe(self.channel(room))
            self._closed.pop(room, None)  # kept in the order they were closed
            self._closed[room] = self.clock()
            while len(self._closed) > MAX_CLOSED:
                del self._closed[next(iter(self._closed))]

    async def _read_members(self, room: str) -> dict[str, tuple[int, MemberInfo]]:
        """The room's members hash, less our own members and those of replicas down."""
        raw = await self.transport.hgetall(self.members_key(room))
        snapshot: dict[str, tuple[int, MemberInfo]] = {}
        bad = 0
        for name, value in raw.items():
            if not name.startswith(self.replica_id + "/"):
                try:
                    entry = codec.loads(value)
                    snapshot[name] = (int(entry["s"]), codec.member_from_json(entry["m"]))
                except Exception:
                    bad += 1
        if bad:
            log.warning(
                "unreadable fields in a room's members hash skipped",
                extra={"room": room, "fields": bad},
            )
        alive = await self._alive({m.origin for _, m in snapshot.values()})
        return {f: (s, m) for f, (s, m) in snapshot.items() if m.origin in alive}

    async def _read_holds(self, room: str) -> None:
        """Pass the room's held client IDs that have not lapsed to the listener."""
        now, held = self.wall(), []
        for name, value in (await self.transport.hgetall(self.holds_key(room))).items():
            try:
                entry = codec.loads(value)
                seconds = entry["u"] / 1000 - now
                if seconds > 0:
                    held.append([name.split("/", 1)[0], entry["k"], seconds])
            except Exception:
                continue  # lapses with the key
        if held and self.listener is not None:
            self.listener.on_holds(room, _holds(held))

    async def _alive(self, origins: set[str]) -> set[str]:
        """The replicas up, as we hear them; for one we never heard, its liveness key,
        whose remaining time tells when it last beat (no fresh grace period for a
        replica that just died)."""
        alive = set()
        for origin in origins:
            peer = self.peers.get(origin)
            if peer is None:
                left = await self.transport.ttl(self.replica_key(origin))
                if left <= 0:
                    continue
                peer = self.peers.setdefault(origin, Peer(self.clock() - self.down_after + left))
            if peer.down_since is None:
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

    def _link(self, room: str) -> Link | None:
        link = self.links.get(room)
        if link is None:
            # The hub publishes only in rooms it has open: a bug. Numbered out of any
            # link, the message would make the others count a gap (and ask us in vain).
            log.error("publishing in a room not open: dropped", extra={"room": room})
        return link

    def _next(self, link: Link) -> int:
        self._sent += 1
        link.seq += 1
        return link.seq

    def publish(
        self, room: str, events: Sequence[Event], current: Sequence[MemberInfo], gone: Sequence[str]
    ) -> None:
        if self._alone:
            return  # nobody to tell, nobody to read the hash
        link = self._link(room)
        if link is None:
            return
        seq = self._next(link)
        events_json = codec.events_to_json(events)
        message = self._envelope({"k": "e", "s": seq, "r": 1, "e": events_json})
        # The members hash only serves replicas that open the room later: it is written
        # on joins and leaves at once, and otherwise at most every HASH_INTERVAL, not on
        # every tick of a moving cursor.
        for m in current:
            link.pending[m.id] = m
        for member_id in gone:
            link.pending[member_id] = None
        now = self.clock()
        urgent = any(isinstance(e, Joined | Left) for e in events)
        due = urgent or now - link.hash_written >= HASH_INTERVAL
        ops = self._hash_ops(room, link, now) if due else []
        ops.append(Publish(self.channel(room), message))
        self._send(ops)

    def _hash_ops(self, room: str, link: Link, now: float) -> list[Op]:
        """Write our members' due fields, with the number of our last message: they
        reflect at least everything up to it."""
        link.hash_written = now
        due, link.pending = link.pending, {}
        key, prefix = self.members_key(room), self.replica_id + "/"
        fields = {
            prefix + member_id: codec.dumps({"s": link.seq, "m": codec.member_to_json(m)})
            for member_id, m in due.items()
            if m is not None
        }
        gone = [prefix + member_id for member_id, m in due.items() if m is None]
        ops: list[Op] = []
        if fields:
            ops.append(HashSet(key, fields, HASH_TTL_MS))
        if gone:
            ops.append(HashDel(key, gone))
        return ops

    def publish_full_state(self, room: str, members: Sequence[MemberInfo]) -> None:
        """Coalesced: while answering (:meth:`send_full_states`), sent at once; otherwise
        marked due, and sent within SYNC_DELAY with the members as they are then."""
        if self._alone:
            return
        link = self._link(room)
        if link is None:
            return
        if self._answering == room:
            self._full_state(room, link, members)
        else:
            self._owe(room, link, OWED)

    def _full_state(self, room: str, link: Link | None, members: Sequence[MemberInfo]) -> None:
        """Send our complete set of members in ``room`` (``link``: None if not open)."""
        if link is None:
            self._sent += 1
            seq = self._sent
        else:
            seq = self._next(link)
            link.pending.clear()  # superseded
            link.hash_written = self.clock()
            link.due = 0
        fields = {
            f"{m.origin}/{m.id}": codec.dumps({"s": seq, "m": codec.member_to_json(m)})
            for m in members
        }
        message = {"k": "f", "s": seq, "r": 1, "m": [codec.member_to_json(m) for m in members]}
        self._send(
            [
                HashReplace(self.members_key(room), self.replica_id + "/", fields, HASH_TTL_MS),
                Publish(self.channel(room), self._envelope(message)),
            ]
        )

    def publish_holds(self, room: str, held: Sequence[Held]) -> None:
        if self._alone or not held:
            return
        now, wall_ms = self.clock(), self.wall() * 1000
        fields = {}
        for h in held:
            field = f"{h.item}/{self.replica_id}"  # ours alone: we delete it when it lapses
            fields[field] = codec.dumps({"k": h.key, "u": round(wall_ms + h.seconds * 1000)})
            self._holds_out.append((now + h.seconds, room, field))
            self._holds_last[(room, field)] = now + h.seconds
        longest = max(h.seconds for h in held)
        message = {"k": "o", "h": [[h.item, h.key, round(h.seconds, 3)] for h in held]}
        # Before the leaves that follow (one ordered path): no replica sees the client ID
        # free in between.
        self._send(
            [
                HashSet(self.holds_key(room), fields, round(longest * 1000) + HOLD_MARGIN_MS),
                Publish(self.channel(room), self._envelope(message)),
            ]
        )

    def _expire_holds(self, now: float) -> None:
        """Delete our fields of holds that lapsed (the key itself expires a grace after
        its last write, but a busy room's key may live on)."""
        lapsed: dict[str, list[str]] = {}
        while self._holds_out and self._holds_out[0][0] <= now:
            _, room, field = self._holds_out.popleft()
            if self._holds_last.get((room, field), 0.0) <= now:  # not held again since
                self._holds_last.pop((room, field), None)
                lapsed.setdefault(room, []).append(field)
        if lapsed and not self._alone:
            self._send([HashDel(self.holds_key(room), fields) for room, fields in lapsed.items()])

    def _owe(self, room: str, link: Link, why: int) -> None:
        link.due = max(link.due, why)
        self._schedule()

    def _schedule(self) -> None:
        if self._ticking and self._answer_handle is None and self.listener is not None:
            loop = asyncio.get_running_loop()
            self._answer_handle = loop.call_later(SYNC_DELAY, self.send_full_states)

    def send_full_states(self) -> None:
        """Send the full states due: one per room, however many asked (called
        SYNC_DELAY after the first request; tests call it)."""
        self._answer_handle = None
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
                self._full_state(room, link, [])  # re-announced: none of ours here
            link.due = 0

    def request_sync(self, room: str) -> None:
        if not self._alone:
            self._ask(room)

    def _ask(self, room: str, target: str | None = None) -> None:
        """Ask every replica (or only ``target``) for its full state in ``room``, saying
        where our numbering there stands."""
        link = self.links.get(room)
        message: dict[str, Any] = {"k": "q"}
        if link is not None:
            message.update(s=link.seq, r=1)
        if target is not None:
            message["t"] = target
        self._send([Publish(self.channel(room), self._envelope(message))])

    def _envelope(self, message: dict[str, Any]) -> bytes:
        return codec.envelope(self.replica_id, message)

    def _send(self, ops: Sequence[Op]) -> None:
        if ops:
            self.transport.send(ops)


MAX_HOLD_SECONDS = 3600.0  # a replica's claim is believed up to this long


def _holds(data: Any) -> list[Held]:
    """Held client IDs from a message (``[[item, key, seconds], …]``); what is malformed
    is skipped."""
    held = []
    for entry in data if isinstance(data, list) else ():
        try:
            item, key, seconds = entry
            if isinstance(item, str) and (key is None or isinstance(key, str)):
                held.append(Held(item, key, min(float(seconds), MAX_HOLD_SECONDS)))
        except (TypeError, ValueError):
            continue
    return held
