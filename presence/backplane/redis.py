"""The Redis backplane: pub/sub per room, replica heartbeats, a members hash per room.

Keys and channels of a room share one hash slot (``{room}`` hash tag), so the backplane
works on Redis Cluster; with ``sharded=True`` it uses SPUBLISH/SSUBSCRIBE (Redis >= 7),
which keeps a room's traffic inside the shard that owns it.

- ``presence:{room}``: the room's channel. Messages: events (``e``), a replica's complete
  member set (``f``), and sync requests (``q``). A replica subscribes only to the rooms
  it has members in.
- ``presence:{room}:members``: hash ``origin/member_id`` -> latest member state with the
  sequence number of the message that wrote it; read once by a replica that opens the
  room, so that its first member's snapshot includes every replica's members.
- ``presence:replicas`` (``presence:{replicas}`` when sharded): heartbeats and goodbyes.
  A replica not heard for ``down_after`` is dead; its members are removed, at most
  ``replica_timeout`` after it died (timings: ``RedisBackplane.__init__``).
- ``presence:scope:{scope}:live`` and ``:expiry``: the live identities of an identity
  scope (hash username -> identity) and when each expires (sorted set, Redis's clock in
  ms). Claims are checked and made in one script (``SCOPE_SCRIPT``); both keys expire
  with the scope's longest-lived identity.
- ``presence:replica:ID``: expires ``down_after`` after the last heartbeat, when the other
  replicas count it as dead too; lets a snapshot skip the members of replicas that are
  gone, and its remaining time tells a replica that never heard this one when it last
  beat.

Pub/sub is at-most-once. After any connection loss the backplane resubscribes and asks
the hub to re-announce its members and to request everybody else's (``on_reconnected``):
state is re-synchronised, never replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from presence.backplane.base import Backplane, Unavailable
from presence.backplane.resp import RespConnection, pack
from presence.codecs import replica as codec
from presence.core.distinct import Claim
from presence.core.events import Event, Joined, Left, MemberInfo
from presence.core.identity import Identity

log = logging.getLogger("presence.redis")

HASH_TTL_MS = 24 * 3600 * 1000  # backstop for hashes left by replicas that all died
MAX_BACKOFF = 5.0
MAX_REPORT_INTERVAL = 600.0  # seconds between "still unavailable" logs of a long outage
HASH_INTERVAL = 1.0  # seconds between writes of a moving member's state to the hash

# Replace this replica's fields of a room's members hash with the given ones, atomically.
FULL_STATE_SCRIPT = """
local prefix = ARGV[1]
local keep = {}
for i = 2, #ARGV, 2 do keep[ARGV[i]] = true end
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, #prefix) == prefix and not keep[field] then
    redis.call('HDEL', KEYS[1], field)
  end
end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
redis.call('PEXPIRE', KEYS[1], TTL)
return 1
""".replace("TTL", str(HASH_TTL_MS))

# An identity scope: forget the expired identities, then, given a claim (ARGV: username,
# identity as JSON, ttl in ms, exclusive colour "1"/"0"), hold it unless another live
# identity shows its name or initials (or its colour, if exclusive): the check of
# presence.core.distinct.clashes, atomic across replicas. Returns {1} when held, else
# {0, the live identities as HGETALL gives them}. TIME is Redis's clock, the same for all
# replicas; replicate_commands lets a script write after reading it on Redis < 7.
SCOPE_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, username in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], username)
  redis.call('ZREM', KEYS[2], username)
end
local held = redis.call('HGETALL', KEYS[1])
if #ARGV == 0 then return {0, held} end
local me, ttl, exclusive = ARGV[1], tonumber(ARGV[3]), ARGV[4] == '1'
local mine = cjson.decode(ARGV[2])
for i = 1, #held, 2 do
  if held[i] ~= me then
    local other = cjson.decode(held[i + 1])
    if other.n == mine.n or other.i == mine.i or (exclusive and other.c == mine.c) then
      return {0, held}
    end
  end
end
redis.call('HSET', KEYS[1], me, ARGV[2])
redis.call('ZADD', KEYS[2], now + ttl, me)
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return {1}
"""


class RedisBackplane(Backplane):
    def __init__(
        self,
        replica_id: str,
        url: str,
        *,
        sharded: bool = False,
        cluster: bool = False,
        replica_timeout: float = 5.0,
        prefix: str = "presence",
    ) -> None:
        super().__init__(replica_id)
        self._me = replica_id.encode()
        self.url = url
        self.sharded = sharded or cluster
        self.cluster = cluster
        self.replica_timeout = replica_timeout
        # A replica killed just after a heartbeat was last heard at the kill, and is
        # declared down at the first check after down_after: at most down_after +
        # check_interval (0.8 x replica_timeout) later; killed just before one, no sooner
        # than down_after - heartbeat_interval (0.5 x). The heartbeat's worth left is
        # slack for late timers and the flush to clients. A live replica is declared down
        # only after missing three heartbeats in a row.
        self.heartbeat_interval = replica_timeout / 5
        self.check_interval = replica_timeout / 10
        self.down_after = replica_timeout - self.heartbeat_interval - self.check_interval
        self.prefix = prefix
        self.redis: Redis | RedisCluster = (
            RedisCluster.from_url(url) if cluster else Redis.from_url(url)
        )
        self._scope_script = self.redis.register_script(SCOPE_SCRIPT)
        # Redis node -> its connections for subscribing and for the commands of each tick
        self._subscribers: dict[str, RespConnection] = {}
        self._links: dict[str, RespConnection] = {}
        self._connected = False
        self._lost = asyncio.Event()
        # The connection as /readyz, /metrics and the logs show it: "connecting" until
        # the first attempt ends, then "up" or "down", since _since (monotonic).
        self.state = "connecting"
        self.error: str | None = None
        self._since = time.monotonic()
        self._next_report = 0.0  # when a continuing outage is logged again
        self._rooms: set[str] = set()
        self._opening: dict[str, list[dict[str, Any]]] = {}
        self._seq = 0
        self._last_seen: dict[str, float] = {}
        self._outgoing: deque[tuple[str, tuple[Any, ...]]] = deque()
        self._hash_pending: dict[str, dict[str, MemberInfo | None]] = {}
        self._hash_written: dict[str, float] = {}
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

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

    def scope_keys(self, scope: str) -> list[str]:
        """The keys of an identity scope; the ``{scope}`` hash tag keeps them in one slot."""
        base = f"{self.prefix}:scope:{{{scope}}}"
        return [base + ":live", base + ":expiry"]

    def _room_of(self, channel: str) -> str | None:
        start = len(self.prefix) + 2
        if channel.startswith(self.prefix + ":{") and channel.endswith("}"):
            return channel[start:-1]
        return None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._connected

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "url": _safe(self.url),
            "error": self.error,
            "since": round(time.monotonic() - self._since, 1),  # seconds in this state
        }

    async def start(self, listener: Any) -> None:
        await super().start(listener)
        self._tasks = [
            asyncio.create_task(self._supervise(), name="redis-supervisor"),
            asyncio.create_task(self._heartbeat_forever(), name="redis-heartbeat"),
            asyncio.create_task(self._watch_forever(), name="redis-watcher"),
            asyncio.create_task(self._publish_forever(), name="redis-publisher"),
        ]

    async def stop(self) -> None:
        # Let queued messages (the goodbyes of our members) go out first.
        for _ in range(50):
            if not self._outgoing or not self._connected:
                break
            await asyncio.sleep(0.01)
        if self._connected:
            with contextlib.suppress(RedisError, OSError):
                await self._send_publish(
                    self.replicas_channel, codec.envelope(self.replica_id, {"k": "b"})
                )
                await self.redis.delete(self.replica_key(self.replica_id))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._teardown()
        with contextlib.suppress(Exception):
            await self.redis.aclose()
        await super().stop()

    # -- connection --------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Connect, and reconnect with backoff whenever a connection is lost."""
        backoff = 0.1
        while True:
            if self._connected:
                await self._lost.wait()
                continue
            self._lost.clear()
            try:
                await self._connect()
                if self._lost.is_set():
                    # A connection opened just now died before we were marked connected:
                    # waiting on the set event below would spin without yielding.
                    raise ConnectionError("a Redis connection was lost while connecting")
            except (RedisError, OSError) as exc:
                self.connect_failures += 1
                self._down(exc)
                await self._teardown()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 0.1
            self._connected = True
            self._up()
            if self.listener is not None:
                self.listener.on_reconnected()

    def _connection_lost(self, exc: BaseException) -> None:
        if self._connected:
            self._connected = False
            self._down(exc, lost=True)
        self._lost.set()

    def _down(self, exc: BaseException, *, lost: bool = False) -> None:
        """Record a failure. An outage is logged when it starts, then at doubling
        intervals from MAX_BACKOFF on: a line per attempt would flood the logs."""
        now = time.monotonic()
        url, self.error = _safe(self.url), f"{type(exc).__name__}: {exc}"
        extra: dict[str, Any] = {"url": url, "error": self.error}  # fields of JSON logs
        if self.state != "down":
            self.state, self._since, self._next_report = "down", now, now + MAX_BACKOFF
            what = "redis connection lost" if lost else "redis unavailable"
            log.warning(f"{what} ({url}), retrying with backoff: {self.error}", extra=extra)
        elif now >= self._next_report:
            down_for = now - self._since
            self._next_report = now + min(down_for, MAX_REPORT_INTERVAL)
            log.warning(
                f"redis still unavailable ({url}) after {down_for:.0f} s, retrying every "
                f"{MAX_BACKOFF:g} s: {self.error}",
                extra={**extra, "down_for": round(down_for, 1)},
            )

    def _up(self) -> None:
        now = time.monotonic()
        url = _safe(self.url)
        if self.state == "down":
            self.reconnects += 1
            down_for = round(now - self._since, 1)
            log.info(
                f"redis reconnected ({url}) after {down_for:g} s",
                extra={"url": url, "down_for": down_for},
            )
        else:
            log.info("redis connected", extra={"url": url})
        self.state, self._since, self.error = "up", now, None

    async def _connect(self) -> None:
        await self._teardown()
        await self.redis.ping()
        await self._subscribe(self.replicas_channel)
        await self._beat()
        subscribed: set[str] = set()
        # Rooms opened while this runs saw us disconnected and left subscribing to us;
        # the loop ends with no await between it and the caller marking us connected.
        while pending := self._rooms - subscribed:
            for room in pending:
                await self._subscribe(self.channel(room))
            subscribed |= pending
        # Everyone gets a fresh grace period: we could not hear them while cut off.
        now = time.monotonic()
        for origin in self._last_seen:
            self._last_seen[origin] = now

    async def _teardown(self) -> None:
        for conn in [*self._subscribers.values(), *self._links.values()]:
            conn.close()
        self._subscribers.clear()
        self._links.clear()

    def _node(self, channel: str) -> tuple[str, str]:
        """The name and URL of the Redis node that serves a channel (and its room's keys:
        they share its hash slot)."""
        if not isinstance(self.redis, RedisCluster):
            return "", self.url
        node = self.redis.get_node_from_key(channel)
        if node is None:
            raise RedisError(f"no cluster node serves {channel!r} yet")
        return node.name, _with_host(self.url, node.host, int(node.port))

    async def _connection(self, channel: str, *, subscriber: bool) -> RespConnection:
        name, url = self._node(channel)
        pool = self._subscribers if subscriber else self._links
        conn = pool.get(name)
        if conn is None:
            on_message = self._on_message if subscriber else None
            conn = pool[name] = await RespConnection.open(url, self._connection_lost, on_message)
        return conn

    def _on_message(self, channel: bytes, data: bytes) -> None:
        try:
            self._dispatch(channel, data)
        except Exception:
            log.exception("bad backplane message ignored")

    async def _subscribe(self, channel: str) -> None:
        conn = await self._connection(channel, subscriber=True)
        conn.send(pack("SSUBSCRIBE" if self.sharded else "SUBSCRIBE", channel))

    async def _unsubscribe(self, channel: str) -> None:
        conn = await self._connection(channel, subscriber=True)
        conn.send(pack("SUNSUBSCRIBE" if self.sharded else "UNSUBSCRIBE", channel))

    # -- heartbeats --------------------------------------------------------------------

    async def _beat(self) -> None:
        await self.redis.set(self.replica_key(self.replica_id), "1", px=int(self.down_after * 1000))
        await self._send_publish(self.replicas_channel, codec.envelope(self.replica_id, {"k": "h"}))

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if not self._connected:
                continue  # we cannot tell who is alive while cut off
            try:
                await self._beat()
            except (RedisError, OSError):
                continue  # the reader notices and reconnects
            now = time.monotonic()
            for room in [r for r in self._hash_pending if r in self._rooms]:
                if now - self._hash_written.get(room, 0.0) >= HASH_INTERVAL:
                    self._queue("hash", room, self._take_hash(room, now))

    async def _watch_forever(self) -> None:
        """Declare down the replicas not heard for ``down_after``."""
        while True:
            await asyncio.sleep(self.check_interval)
            if not self._connected:
                continue  # we cannot tell who is alive while cut off
            now = time.monotonic()
            for origin, seen in list(self._last_seen.items()):
                if now - seen > self.down_after:
                    log.info("replica down", extra={"replica": origin})
                    self._replica_down(origin)
                    await self._forget(origin)

    def _replica_down(self, origin: str) -> None:
        self._last_seen.pop(origin, None)
        if self.listener is not None:
            self.listener.on_replica_down(origin)

    async def _forget(self, origin: str) -> None:
        """Remove a dead replica's members from the hashes of our rooms."""
        prefix = origin + "/"
        with contextlib.suppress(RedisError, OSError):
            for room in list(self._rooms):
                key = self.members_key(room)
                fields = [f for f in await self.redis.hkeys(key) if _text(f).startswith(prefix)]
                if fields:
                    await self.redis.hdel(key, *fields)

    # -- receiving ---------------------------------------------------------------------

    def _dispatch(self, raw_channel: bytes, raw: bytes) -> None:
        sender, body = codec.open_envelope(raw)
        if sender == self._me or self.listener is None:
            return  # our own message, back from Redis
        channel = _text(raw_channel)
        origin = sender.decode()
        data = codec.loads(body)
        data["o"] = origin
        known = origin in self._last_seen
        self._last_seen[origin] = time.monotonic()
        goodbye = channel == self.replicas_channel and data["k"] == "b"
        if not known and not goodbye:
            # A replica we had given up on (a stall longer than the timeout), or never
            # heard, speaks: ask for its state. Whatever it sends first (a heartbeat, or a
            # room message when it was the one that came back) counts.
            for name in self._rooms:
                self.request_sync(name)
        if channel == self.replicas_channel:
            if goodbye:
                self._replica_down(origin)
            return
        room = self._room_of(channel)
        if room is None or room not in self._rooms:
            return
        if room in self._opening:
            self._opening[room].append(data)
            return
        self._deliver(room, data)

    def _deliver(self, room: str, data: dict[str, Any]) -> None:
        assert self.listener is not None
        kind = data["k"]
        if kind == "e":
            self.listener.on_events(room, codec.events_from_json(data["e"]))
        elif kind == "f":
            members = [codec.member_from_json(m) for m in data["m"]]
            self.listener.on_full_state(room, data["o"], members)
        elif kind == "q":
            self.listener.on_sync_request(room)

    async def open_room(self, room: str) -> list[Event]:
        self._rooms.add(room)
        if not self._connected:
            return []  # on_reconnected will sync this room
        self._opening[room] = []
        try:
            await self._subscribe(self.channel(room))
            snapshot = await self._read_members(room)
        except (RedisError, OSError):
            self._opening.pop(room, None)
            return []  # the reader reconnects, and on_reconnected syncs this room
        seqs = {m.id: s for s, m in snapshot.values()}
        events: list[Event] = [Joined(m) for _, m in snapshot.values()]
        for data in self._opening.pop(room):
            # Messages that arrived while the snapshot was read: skip what it already has.
            if data["k"] == "e":
                for event in codec.events_from_json(data["e"]):
                    member_id = event.member.id if isinstance(event, Joined) else event.id
                    if seqs.get(member_id, -1) < data["s"]:
                        events.append(event)
            else:
                asyncio.get_running_loop().call_soon(self._deliver, room, data)
        # SUBSCRIBE returns before Redis has processed it, and the read above went over
        # another connection: a message published in between reached neither. The other
        # replicas' answers to this request close that gap (only differences are events).
        self.request_sync(room)
        return events

    async def _read_members(self, room: str) -> dict[str, tuple[int, MemberInfo]]:
        """The room's members hash, less our own members and those of dead replicas."""
        raw = await self.redis.hgetall(self.members_key(room))
        snapshot: dict[str, tuple[int, MemberInfo]] = {}
        for field, value in raw.items():
            if _text(field).startswith(self.replica_id + "/"):
                continue
            entry = codec.loads(value)
            snapshot[_text(field)] = (entry["s"], codec.member_from_json(entry["m"]))
        alive = await self._alive({m.origin for _, m in snapshot.values()})
        return {f: (s, m) for f, (s, m) in snapshot.items() if m.origin in alive}

    async def _alive(self, origins: set[str]) -> set[str]:
        """The replicas whose liveness key exists. Its remaining time tells when each last
        beat, which starts the clock of one we have not heard yet: no fresh grace period
        for a replica that just died."""
        alive = set()
        for origin in origins:
            ttl = await self.redis.pttl(self.replica_key(origin))
            if ttl > 0:
                alive.add(origin)
                last_beat = time.monotonic() - self.down_after + ttl / 1000
                self._last_seen.setdefault(origin, last_beat)
        return alive

    async def members(self, room: str) -> list[MemberInfo]:
        try:
            return [m for _, m in (await self._read_members(room)).values()]
        except (RedisError, OSError):
            return []

    async def rooms(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        try:
            pattern = f"{self.prefix}:{{*}}:members"
            keys = [_text(k) async for k in self.redis.scan_iter(match=pattern, count=500)]
            for key in keys:
                origins = [_text(f).split("/", 1)[0] for f in await self.redis.hkeys(key)]
                alive = await self._alive(set(origins) - {self.replica_id}) | {self.replica_id}
                count = sum(1 for o in origins if o in alive)
                if count:
                    counts[key[len(self.prefix) + 2 : -len("}:members")]] = count
        except (RedisError, OSError):
            pass  # a partial answer while Redis is away; /readyz says so
        return counts

    def close_room(self, room: str) -> None:
        self._rooms.discard(room)
        self._opening.pop(room, None)
        self._hash_pending.pop(room, None)
        self._hash_written.pop(room, None)
        self._outgoing.append(("unsubscribe", (room,)))
        self._wakeup.set()

    # -- publishing --------------------------------------------------------------------

    def publish(
        self, room: str, events: Sequence[Event], current: Sequence[MemberInfo], gone: Sequence[str]
    ) -> None:
        self._seq += 1
        message = codec.envelope(
            self.replica_id, {"k": "e", "s": self._seq, "e": codec.events_to_json(events)}
        )
        # The members hash only serves replicas that open the room later: it is written on
        # joins and leaves at once, and otherwise at most every HASH_INTERVAL, not on
        # every tick of a moving cursor.
        pending = self._hash_pending.setdefault(room, {})
        for m in current:
            pending[m.id] = m
        for member_id in gone:
            pending[member_id] = None
        now = time.monotonic()
        urgent = any(isinstance(e, Joined | Left) for e in events)
        if urgent or now - self._hash_written.get(room, 0.0) >= HASH_INTERVAL:
            self._queue("events", room, self._take_hash(room, now), message)
        else:
            self._queue("events", room, None, message)

    def _take_hash(self, room: str, now: float) -> dict[str, MemberInfo | None]:
        """The members whose hash fields are due, by field name (None: delete)."""
        self._hash_written[room] = now
        pending = self._hash_pending.pop(room, {})
        return {f"{self.replica_id}/{member_id}": m for member_id, m in pending.items()}

    def publish_full_state(self, room: str, members: Sequence[MemberInfo]) -> None:
        self._seq += 1
        seq = self._seq
        fields = {
            f"{m.origin}/{m.id}": codec.dumps({"s": seq, "m": codec.member_to_json(m)})
            for m in members
        }
        message = codec.envelope(
            self.replica_id,
            {"k": "f", "s": seq, "m": [codec.member_to_json(m) for m in members]},
        )
        self._queue("full", room, fields, message)

    def request_sync(self, room: str) -> None:
        self._queue("request", room, codec.envelope(self.replica_id, {"k": "q"}))

    def _queue(self, kind: str, *args: Any) -> None:
        if not self._connected:
            self.dropped += 1
            return  # lost like any pub/sub message; on_reconnected re-syncs
        self._outgoing.append((kind, args))
        self._wakeup.set()

    async def _send_publish(self, channel: str, message: bytes) -> None:
        if self.sharded:
            await self.redis.execute_command("SPUBLISH", channel, message)
        else:
            await self.redis.publish(channel, message)

    async def _publish_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch = list(self._outgoing)
            self._outgoing.clear()
            try:
                await self._send(batch)
            except (RedisError, OSError) as exc:
                self.dropped += len(batch)
                log.warning("publish failed: %s", exc)
                self._connection_lost(exc)  # what was lost is re-synced on reconnection

    def _write_hash(self, out: list[bytes], key: str, due: dict[str, MemberInfo | None]) -> None:
        # The state is encoded now, with the sequence number of the last message queued:
        # it reflects at least everything up to that message (later ones only repeat it).
        seq = self._seq
        fields = [
            x
            for field, m in due.items()
            if m is not None
            for x in (field, codec.dumps({"s": seq, "m": codec.member_to_json(m)}))
        ]
        gone = [field for field, m in due.items() if m is None]
        if fields:
            out.append(pack("HSET", key, *fields))
        if gone:
            out.append(pack("HDEL", key, *gone))
        out.append(pack("PEXPIRE", key, HASH_TTL_MS))

    async def _send(self, batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Everything queued since the last call, one write per Redis node."""
        publish = "SPUBLISH" if self.sharded else "PUBLISH"
        commands: dict[RespConnection, list[bytes]] = {}
        for kind, args in batch:
            if kind == "unsubscribe":
                (room,) = args
                if room not in self._rooms:
                    await self._unsubscribe(self.channel(room))
                continue
            room = args[0]
            key, channel = self.members_key(room), self.channel(room)
            out = commands.setdefault(await self._connection(channel, subscriber=False), [])
            if kind == "events":
                _, due, message = args
                if due:
                    self._write_hash(out, key, due)
            elif kind == "hash":
                _, due = args
                self._write_hash(out, key, due)
                continue
            elif kind == "full":
                _, fields, message = args
                flat = [x for pair in fields.items() for x in pair]
                out.append(pack("EVAL", FULL_STATE_SCRIPT, 1, key, self.replica_id + "/", *flat))
            else:
                _, message = args
            out.append(pack(publish, channel, message))
        for conn, out in commands.items():
            conn.send(*out)

    # -- identity scopes ---------------------------------------------------------------

    async def scope_identities(self, scope: str) -> dict[str, Identity]:
        _, held = await self._run_scope(scope)
        return held

    async def claim_identity(
        self, scope: str, claim: Claim, ttl: float
    ) -> dict[str, Identity] | None:
        i = claim.identity
        record = codec.dumps({"u": i.username, "n": i.name, "i": i.initials, "c": i.color})
        exclusive = "1" if claim.exclusive_color else "0"
        ttl_ms = max(1, round(ttl * 1000))
        done, held = await self._run_scope(scope, i.username, record, ttl_ms, exclusive)
        return None if done else held

    async def _run_scope(self, scope: str, *args: Any) -> tuple[bool, dict[str, Identity]]:
        try:
            reply = await self._scope_script(keys=self.scope_keys(scope), args=list(args))
        except (RedisError, OSError) as exc:
            raise Unavailable(f"redis unavailable ({_safe(self.url)}): {exc}") from exc
        if reply[0] == 1:
            return True, {}
        flat = reply[1]
        held = {}
        for field, value in zip(flat[::2], flat[1::2], strict=True):
            d = codec.loads(value)
            held[_text(field)] = Identity(d["u"], d["n"], d["i"], d["c"])
        return False, held


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _with_host(url: str, host: str, port: int) -> str:
    """``url`` pointed at another node of the same cluster (same scheme, credentials)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}{host}:{port}"))


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
