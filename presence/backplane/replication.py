"""Replication: how the replicas share their rooms, over any transport (memory, Redis).

Sans-I/O at heart: messages come in through :meth:`Replication.on_message`, time through
:meth:`Replication.tick` and the injected clock; everything sent goes to the transport
in order. A thin task calls ``tick`` every ``check_interval``.

Names (``{room}`` is a hash tag: a room's keys and channel share one Redis Cluster slot):

- ``presence:{room}``: the room's channel. Messages (:mod:`presence.codecs.replica`):
  events (``e``) and complete member sets (``f``), numbered per sender and room (``s``);
  state requests (``q``, to everyone or to one replica, ``t``).
- ``presence:{room}:members``: hash ``origin/member_id`` -> latest state and the number
  of the message that wrote it; read by a replica that opens the room (its snapshot).
- ``presence:replicas`` (``presence:{replicas}`` when sharded): heartbeats (``h``) and
  goodbyes (``b``).
- ``presence:replica:ID``: exists while a replica heartbeats; tells a replica that never
  heard another whether that one is alive, and when it last beat.

Liveness follows Phoenix.Tracker. A replica not heard for ``down_after`` is *down*: its
members leave our views. It is judged from heartbeats *received* (publishing works when
Redis refuses writes), and only while we hear our own heartbeats: a frozen Redis or a
stalled subscription is not taken for everyone's death. Anything from a down replica
brings it back up, and we ask it for its full state. A replica whose own timers ran
late by more than ``down_after`` (stopped, starved) knows the others gave up on it and
re-announces itself. After ``permdown_after`` of silence a replica is forgotten and its
fields in our rooms' hashes are deleted.

Pub/sub is at-most-once: a gap in a sender's numbers (a subscriber buffer overflow, a
lost message) makes us ask that sender for its full state in that room; an outage makes
everyone re-announce (``on_reconnected``). State is re-synchronised, never replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from presence.backplane.base import Backplane, Listener, Unavailable
from presence.backplane.transport import (
    HashDel,
    HashReplace,
    HashSet,
    Op,
    Publish,
    SetKey,
    Transport,
)
from presence.codecs import replica as codec
from presence.core.distinct import Claim
from presence.core.events import Event, Joined, Left, MemberInfo
from presence.core.identity import Identity

log = logging.getLogger("presence.replication")

HASH_TTL_MS = 24 * 3600 * 1000  # backstop for hashes left by replicas that all died
HASH_INTERVAL = 1.0  # seconds between writes of a moving member's state to the hash


@dataclass(slots=True)
class Peer:
    """Another replica, as heard from here."""

    last_seen: float
    down_since: float | None = None  # None while up
    gone: bool = False  # said goodbye: whatever comes after is a straggler


@dataclass(slots=True)
class Link:
    """A room this replica has open."""

    seq: int  # the number of our last message in the room
    heard: dict[str, int] = field(default_factory=dict)  # replica -> its last number here
    opening: list[tuple[str, dict[str, Any]]] | None = None  # arrived during the snapshot
    pending: dict[str, MemberInfo | None] = field(default_factory=dict)  # hash writes due
    hash_written: float = -float("inf")


class Replication(Backplane):
    def __init__(
        self,
        replica_id: str,
        transport: Transport,
        *,
        replica_timeout: float = 5.0,
        permdown_after: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        prefix: str = "presence",
        sharded: bool = False,
        ticking: bool = True,  # False: the caller calls tick() (tests)
    ) -> None:
        super().__init__(replica_id)
        self.transport = transport
        self.clock = clock
        self.prefix = prefix
        self.sharded = sharded
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
        self._sent = 0  # messages sent in all rooms: a reopened room's numbers go on
        self._heard_self = -float("inf")  # when our last heartbeat came back to us
        self._last_tick: float | None = None
        self._last_beat = -float("inf")
        self._ticking = ticking
        self._task: asyncio.Task[None] | None = None
        self.gaps = 0  # messages found missing from another replica
        self.stalls = 0  # times this replica found its own timers far behind
        self.downs = 0  # times another replica was declared down

    # -- names -------------------------------------------------------------------------

    def channel(self, room: str) -> str:
        return f"{self.prefix}:{{{room}}}"

    def members_key(self, room: str) -> str:
        return f"{self.prefix}:{{{room}}}:members"

    @property
    def replicas_channel(self) -> str:
        return f"{self.prefix}:{{replicas}}" if self.sharded else f"{self.prefix}:replicas"

    def replica_key(self, replica: str) -> str:
        return f"{self.prefix}:replica:{replica}"

    def _room_of(self, channel: str) -> str | None:
        if channel.startswith(self.prefix + ":{") and channel.endswith("}"):
            return channel[len(self.prefix) + 2 : -1]
        return None

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
        self.transport.subscribe(self.replicas_channel)
        await self.transport.start(self)
        if self._ticking:
            self._task = asyncio.create_task(self._tick_forever(), name="replication")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # After the last events, on the same path: it cannot overtake them.
        self._send([Publish(self.replicas_channel, self._envelope({"k": "b"}))])
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
                prefix = origin + "/"
                self._send([HashReplace(self.members_key(r), prefix, {}, 0) for r in self.links])

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
            Publish(self.replicas_channel, self._envelope({"k": "h"})),
        ]
        for room, link in self.links.items():
            if link.pending and now - link.hash_written >= HASH_INTERVAL:
                ops += self._hash_ops(room, link, now)
        self._send(ops)

    # -- what the transport tells us (transport.Receiver) -------------------------------

    def on_up(self) -> None:
        """Connected, or back after an outage or a stall: messages were lost."""
        now = self.clock()
        for link in self.links.values():
            link.heard.clear()  # numbers from before are no basis for finding gaps
        for peer in self.peers.values():
            if peer.down_since is None:
                peer.last_seen = max(peer.last_seen, now)  # we could not hear them
        self._beat(now)
        if self.listener is not None:
            self.listener.on_reconnected()

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
            for name in self.links:
                self._ask(name, origin)
        room = self._room_of(channel)
        link = self.links.get(room) if room is not None else None
        if room is None or link is None:
            return
        if link.opening is not None:
            link.opening.append((origin, message))
        else:
            self._deliver(room, link, origin, message)

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
        elif kind == "q" and message.get("t", self.replica_id) == self.replica_id:
            self.listener.on_sync_request(room)
        # Other kinds: a newer replica's (rolling deploy); ignored.

    # -- rooms -------------------------------------------------------------------------

    async def open_room(self, room: str) -> list[Event]:
        link = self.links[room] = Link(seq=self._sent, opening=[])
        self.transport.subscribe(self.channel(room))
        try:
            snapshot = await self._read_members(room)
        except Unavailable:
            snapshot = {}  # the answers to the request below fill the room
        buffered, link.opening = link.opening or [], None
        seqs = {m.id: s for s, m in snapshot.values()}
        events: list[Event] = [Joined(m) for _, m in snapshot.values()]
        for origin, message in buffered:
            seq = message.get("s")
            if message.get("k") != "e" or not isinstance(seq, int):
                # After the room has its snapshot.
                asyncio.get_running_loop().call_soon(self._deliver_later, room, origin, message)
                continue
            # Arrived while the snapshot was read: skip what it already has.
            if message.get("r") == 1:
                link.heard[origin] = max(link.heard.get(origin, seq), seq)
            try:
                received = codec.events_from_json(message["e"])
            except Exception:
                log.exception("bad backplane message ignored")
                continue
            for event in received:
                member_id = event.member.id if isinstance(event, Joined) else event.id
                if seqs.get(member_id, -1) < seq:
                    events.append(event)
        # The subscription and the read are not atomic: a message published in between
        # reached neither. The other replicas' answers close that gap (only differences
        # become events).
        self._ask(room)
        return events

    def _deliver_later(self, room: str, origin: str, message: dict[str, Any]) -> None:
        link = self.links.get(room)
        if link is not None and self.listener is not None:
            try:
                self._deliver(room, link, origin, message)
            except Exception:
                log.exception("bad backplane message ignored")

    def close_room(self, room: str) -> None:
        self.links.pop(room, None)
        self.transport.unsubscribe(self.channel(room))

    async def _read_members(self, room: str) -> dict[str, tuple[int, MemberInfo]]:
        """The room's members hash, less our own members and those of replicas down."""
        raw = await self.transport.hgetall(self.members_key(room))
        snapshot: dict[str, tuple[int, MemberInfo]] = {}
        for name, value in raw.items():
            if not name.startswith(self.replica_id + "/"):
                entry = codec.loads(value)
                snapshot[name] = (entry["s"], codec.member_from_json(entry["m"]))
        alive = await self._alive({m.origin for _, m in snapshot.values()})
        return {f: (s, m) for f, (s, m) in snapshot.items() if m.origin in alive}

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
            for key in await self.transport.scan(f"{self.prefix}:{{*}}:members"):
                origins = [f.split("/", 1)[0] for f in await self.transport.hkeys(key)]
                alive = await self._alive(set(origins) - {self.replica_id}) | {self.replica_id}
                count = sum(1 for o in origins if o in alive)
                if count:
                    counts[key[len(self.prefix) + 2 : -len("}:members")]] = count
        except Unavailable:
            pass  # a partial answer while the store is away; /readyz says so
        return counts

    # -- publishing --------------------------------------------------------------------

    def _link(self, room: str) -> Link:
        return self.links.get(room) or Link(seq=self._sent)

    def _next(self, link: Link) -> int:
        self._sent += 1
        link.seq += 1
        return link.seq

    def publish(
        self, room: str, events: Sequence[Event], current: Sequence[MemberInfo], gone: Sequence[str]
    ) -> None:
        link = self._link(room)
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
        link = self._link(room)
        seq = self._next(link)
        link.pending.clear()  # superseded
        link.hash_written = self.clock()
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

    def request_sync(self, room: str) -> None:
        self._ask(room)

    def _ask(self, room: str, target: str | None = None) -> None:
        """Ask every replica (or only ``target``) for its full state in ``room``."""
        message: dict[str, Any] = {"k": "q"} if target is None else {"k": "q", "t": target}
        self._send([Publish(self.channel(room), self._envelope(message))])

    def _envelope(self, message: dict[str, Any]) -> bytes:
        return codec.envelope(self.replica_id, message)

    def _send(self, ops: list[Op]) -> None:
        if ops:
            self.transport.send(ops)

    # -- identity scopes ---------------------------------------------------------------

    async def scope_identities(self, scope: str) -> dict[str, Identity]:
        return await self.transport.scope_identities(scope)

    async def claim_identity(
        self, scope: str, claim: Claim, ttl: float
    ) -> dict[str, Identity] | None:
        return await self.transport.claim_identity(scope, claim, ttl)
