"""The Redis transport: pub/sub, the members hashes and the liveness keys in Redis, for
:class:`presence.backplane.replication.Replication` (what the keys and channels are:
:mod:`presence.backplane.keys`).

Keys and channels of a room share one hash slot (``{room}`` hash tag), so this works on
Redis Cluster; with ``sharded=True`` it uses SPUBLISH/SSUBSCRIBE (Redis >= 7), which
keeps a room's traffic inside the shard that owns it.

- Everything written goes out in order on one lean connection per Redis node
  (:mod:`presence.backplane.resp`): publishes, hash and key writes, heartbeats, the
  goodbye. Subscriptions have a connection of their own per node. Reads go through
  redis-py, with timeouts (so do identity scopes, :mod:`presence.scopes.redis`).
- Health: every connection is PINGed every ``timeout / 2``; a reply due for longer than
  ``timeout`` means Redis stalled (frozen, swapping, blocked by a slow command): not
  ready, logged, and the connections are kept, so that it is back the moment Redis
  answers. A stall longer than ``GIVE_UP_AFTER`` drops them and reconnects. A round in
  which the watcher itself woke late (this process paused) judges nothing: replies sat
  unread in our socket, not in a stalled Redis.
- A refused write (``maxmemory`` with ``noeviction``, a read-only replica) makes the
  replica not ready until a write succeeds again (the heartbeat writes its liveness key
  every beat); publishing goes on, and with it liveness.
- Connection loss: reconnect with backoff, resubscribe, and tell replication
  (``on_up``), which re-synchronises. Whatever a write raises (under uvloop, writing on a
  connection Redis just closed raises RuntimeError a loop turn before ``connection_lost``)
  counts as a lost connection; no background task dies of an error, and one that
  somehow does is logged and leaves the replica not ready, never silently stuck.
- While connected, writes wait in a queue for the writer's next turn; more than
  ``MAX_QUEUED`` of them (the writer stuck) counts as a lost connection too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from presence.backplane.base import Unavailable
from presence.backplane.replication import Replication
from presence.backplane.resp import Handler, RespConnection, pack
from presence.backplane.transport import (
    DelKey,
    HashDel,
    HashSet,
    Op,
    Publish,
    Receiver,
    SetKey,
    Transport,
    messages,
)

log = logging.getLogger("presence.redis")

MAX_BACKOFF = 5.0
MAX_REPORT_INTERVAL = 600.0  # seconds between "still unavailable" logs of a long outage
CONNECT_TIMEOUT = 5.0  # seconds to connect (and for redis-py's reads)
GIVE_UP_AFTER = 20.0  # seconds without a reply before a stalled connection is dropped
MAX_QUEUED = 100_000  # writes waiting for the writer before the connection is given up

# Replace the fields of a hash that start with a prefix (ARGV[1]) with the given ones
# (ARGV[3:]), and make the hash expire ARGV[2] ms later, atomically. With no fields it
# only deletes, which Redis allows even when it refuses writes (maxmemory).
REPLACE_SCRIPT = """
local prefix = ARGV[1]
local keep = {}
for i = 3, #ARGV, 2 do keep[ARGV[i]] = true end
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, #prefix) == prefix and not keep[field] then
    redis.call('HDEL', KEYS[1], field)
  end
end
if #ARGV > 2 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""


class RedisTransport(Transport):
    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        sharded: bool = False,
        cluster: bool = False,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,  # health checks and states (tests)
    ) -> None:
        super().__init__()
        self.url = url
        self.clock = clock
        self.sharded = sharded or cluster
        self.timeout = timeout
        self.redis = redis_client(url, cluster=cluster, timeout=timeout)
        self.channels: set[str] = set()
        # Redis node -> its connections for subscribing and for writing
        self._subscribers: dict[str, RespConnection] = {}
        self._links: dict[str, RespConnection] = {}
        self._connected = False  # connections are open (answering or not)
        self._stalled = False  # open, but a reply is overdue
        self._lost = asyncio.Event()
        # The connection as /readyz, /metrics and the logs show it: "connecting" until
        # the first attempt ends, then "up" or "down", since _since (monotonic).
        self.state = "connecting"
        self.error: str | None = None
        self._since = clock()
        self._next_report = 0.0  # when a continuing outage is logged again
        self._queue: deque[Op | tuple[str, str]] = deque()  # ops, (un)subscriptions
        self._writing = False
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._opening = asyncio.Lock()  # one connection opened at a time: no duplicates
        self.crashed: str | None = None  # a background task died: never ready again

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "up" and self.write_error is None and self.crashed is None

    def status(self) -> dict[str, Any]:
        return {
            "state": "down" if self.crashed else self.state,
            "url": _safe(self.url),
            "error": self.crashed or self.error or self.write_error,
            "writable": self.write_error is None,
            "since": round(self.clock() - self._since, 1),  # seconds in this state
        }

    async def start(self, receiver: Receiver) -> None:
        await super().start(receiver)
        self._tasks = [
            asyncio.create_task(self._supervise(), name="redis-supervisor"),
            asyncio.create_task(self._write_forever(), name="redis-writer"),
            asyncio.create_task(self._watch_forever(), name="redis-health"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A background task ended: only stop() may cancel them; anything else is a bug
        that must not leave a replica that publishes nothing saying it is ready."""
        if task.cancelled():
            return
        exc = task.exception() or RuntimeError("it returned")
        self.crashed = f"{task.get_name()} task crashed: {type(exc).__name__}: {exc}"
        log.error(
            f"redis {task.get_name()} task crashed: not ready until restarted",
            exc_info=exc,
            extra={"error": self.crashed},
        )
        self._connection_lost(exc)

    async def stop(self) -> None:
        # Let queued ops (the goodbyes of our members, then ours) go out first.
        for _ in range(50):
            if not (self._queue or self._writing) or not self._connected:
                break
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.remove_done_callback(self._task_done)
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._teardown()  # closing flushes what was written
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
            except Exception as exc:
                if not _network_error(exc):
                    log.exception("connecting to redis failed unexpectedly")
                self.connect_failures += 1
                self._down(exc)
                await self._teardown()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 0.1
            self._connected, self._stalled = True, False
            self._up("reconnected")
            self._tell_up()

    def _tell_up(self) -> None:
        """Tell replication that messages may have been lost (it re-synchronises)."""
        if self.receiver is not None:
            try:
                self.receiver.on_up()
            except Exception:
                log.exception("re-synchronising after a redis outage failed")

    async def _connect(self) -> None:
        await self._teardown()
        if isinstance(self.redis, RedisCluster):
            # The slots as the cluster serves them now: after a failover, the primary we
            # knew is gone and its replica serves them (redis-py would keep the old map).
            await self.redis.nodes_manager.initialize()
        await self.redis.ping()
        subscribed: set[str] = set()
        # Channels subscribed while this runs are done here too; the loop ends with no
        # await between it and the caller marking us connected.
        while pending := self.channels - subscribed:
            for channel in pending:
                conn = await self._connection(channel, subscriber=True)
                conn.send([(pack(self._command("SUBSCRIBE"), channel), None)])
            subscribed |= pending
        self._queue = deque(op for op in self._queue if isinstance(op, Op))

    def _connection_lost(self, exc: BaseException) -> None:
        if self._connected:
            self._connected = False
            self._down(exc, lost=True)
        self._lost.set()

    def _down(self, exc: BaseException, *, lost: bool = False, stalled: bool = False) -> None:
        """Record a failure. An outage is logged when it starts, then at doubling
        intervals from MAX_BACKOFF on: a line per attempt would flood the logs."""
        now = self.clock()
        url, self.error = _safe(self.url), f"{type(exc).__name__}: {exc}"
        extra: dict[str, Any] = {"url": url, "error": self.error}  # fields of JSON logs
        if self.state != "down":
            self.state, self._since, self._next_report = "down", now, now + MAX_BACKOFF
            what = "redis stalled" if stalled else "redis connection lost" if lost else None
            what = what or "redis unavailable"
            log.warning(f"{what} ({url}), retrying with backoff: {self.error}", extra=extra)
        elif now >= self._next_report:
            down_for = now - self._since
            self._next_report = now + min(down_for, MAX_REPORT_INTERVAL)
            log.warning(
                f"redis still unavailable ({url}) after {down_for:.0f} s, retrying every "
                f"{MAX_BACKOFF:g} s: {self.error}",
                extra={**extra, "down_for": round(down_for, 1)},
            )

    def _up(self, again: str) -> None:
        now = self.clock()
        url = _safe(self.url)
        if self.state == "down":
            self.reconnects += 1
            down_for = round(now - self._since, 1)
            log.info(
                f"redis {again} ({url}) after {down_for:g} s",
                extra={"url": url, "down_for": down_for},
            )
        else:
            log.info("redis connected", extra={"url": url})
        self.state, self._since, self.error = "up", now, None

    async def _teardown(self) -> None:
        for conn in self._connections():
            conn.close()
        self._subscribers.clear()
        self._links.clear()

    def _connections(self) -> list[RespConnection]:
        return [*self._subscribers.values(), *self._links.values()]

    def _node(self, name: str) -> tuple[str, str]:
        """The Redis node that serves a key or channel (a room's share its hash slot)."""
        if not isinstance(self.redis, RedisCluster):
            return "", self.url
        node = self.redis.get_node_from_key(name)
        if node is None:
            raise RedisError(f"no cluster node serves {name!r} yet")
        return node.name, _with_host(self.url, node.host, int(node.port))

    async def _connection(self, name: str, *, subscriber: bool) -> RespConnection:
        node, url = self._node(name)
        pool = self._subscribers if subscriber else self._links
        conn = pool.get(node)
        if conn is None:
            async with self._opening:
                conn = pool.get(node)  # opened while we waited
                if conn is None:
                    on_message = self._on_message if subscriber else None
                    conn = await RespConnection.open(
                        url,
                        self._connection_lost,
                        on_message,
                        timeout=CONNECT_TIMEOUT,
                        clock=self.clock,
                    )
                    pool[node] = conn
        if conn.closing:  # lost; under uvloop, connection_lost is a loop turn away
            if pool.get(node) is conn:
                del pool[node]
            raise ConnectionError("the connection to Redis is closing")
        return conn

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if self.receiver is not None:
            self.receiver.on_message(channel.decode(), data)

    # -- health ------------------------------------------------------------------------

    async def _watch_forever(self) -> None:
        due = self.clock() + self.timeout / 2
        while True:
            await asyncio.sleep(max(0.0, due - self.clock()))
            due = self._watch(due)

    def _watch(self, due: float) -> float:
        """A round of the health check, due at ``due``: ping every connection and judge
        the replies overdue. Returns when the next round is due."""
        interval = self.timeout / 2
        now = self.clock()
        late, due = now - due, now + interval
        try:
            if self._connected:
                for conn in self._connections():
                    conn.ping()
                # Woken that late, this process was paused: the replies due may be
                # waiting, unread, in our sockets (uvloop runs timers before it
                # reads). Judge in the next round.
                if late <= interval:
                    self._check()
        except Exception:
            log.exception("redis health check failed")
        return due

    def _check(self) -> None:
        """A reply overdue: Redis stalled. Kept waiting for (it answers the moment it
        thaws) until GIVE_UP_AFTER."""
        waited = max((c.waiting(self.clock()) for c in self._connections()), default=0.0)
        if waited > GIVE_UP_AFTER:
            for conn in self._connections():
                conn.abort()  # connection_lost follows: reconnect
        elif waited > self.timeout and not self._stalled:
            self._stalled = True
            self._down(TimeoutError(f"no reply for {waited:.1f} s"), stalled=True)
            for conn in self._connections():
                conn.on_reply = self._check
        elif waited <= self.timeout and self._stalled:
            self._stalled = False
            for conn in self._connections():
                conn.on_reply = None
            self._up("answering again")
            self._tell_up()  # it may have dropped messages meanwhile

    # -- subscriptions and writes --------------------------------------------------------

    def _command(self, name: str) -> str:
        return "S" + name if self.sharded else name

    async def subscribe(self, channel: str) -> None:
        """Subscribe at once (not through the queue) and wait for Redis to confirm, so
        that a members hash read next misses no message. An UNSUBSCRIBE of the channel
        still queued is skipped by the writer (the channel is wanted again)."""
        self.channels.add(channel)
        if not self._connected:
            return  # _connect subscribes to every channel wanted
        try:
            conn = await self._connection(channel, subscriber=True)
            if self._stalled:  # no confirmation is coming soon; reads will fail anyway
                conn.send([(pack(self._command("SUBSCRIBE"), channel), None)])
            else:
                await conn.subscribe(self._command("SUBSCRIBE"), channel, self.timeout)
        except TimeoutError:
            pass  # Redis stalled: the health check tells, on_up re-synchronises
        except Exception as exc:
            # Lost: the reconnection subscribes to self.channels, on_up re-synchronises.
            if not _network_error(exc):
                log.exception("subscribing failed")
            self._connection_lost(exc)

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        self._enqueue(("UNSUBSCRIBE", channel))

    def send(self, ops: Sequence[Op]) -> None:
        if not self._connected:
            self.dropped += messages(ops)
            return  # lost like any pub/sub message; on_up re-syncs
        self._queue.extend(ops)
        self._wakeup.set()
        if len(self._queue) > MAX_QUEUED:
            # The writer is stuck (opening a connection to a node that does not answer,
            # say): give the connection up, as a full socket buffer would; reconnecting
            # re-synchronises.
            self.dropped += messages(self._queue)
            self._queue.clear()
            self._connection_lost(ConnectionError(f"over {MAX_QUEUED} writes waiting"))

    def _enqueue(self, subscription: tuple[str, str]) -> None:
        if self._connected:  # otherwise _connect subscribes to self.channels
            self._queue.append(subscription)
            self._wakeup.set()

    async def _write_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch = list(self._queue)
            self._queue.clear()
            self._writing = True
            try:
                await self._write(batch)
            except Exception as exc:
                # Whatever the error (RuntimeError from a transport uvloop closed a turn
                # before telling us, a bug), the writer goes on: what was lost is
                # re-synced on reconnection.
                self.dropped += messages(batch)
                if _network_error(exc):
                    log.warning("redis write failed: %s", exc)
                else:
                    log.exception("redis write failed")
                self._connection_lost(exc)
            finally:
                self._writing = False

    async def _write(self, batch: list[Op | tuple[str, str]]) -> None:
        """Everything queued since the last call, in order, one write per Redis node."""
        out: dict[RespConnection, list[tuple[bytes, Handler]]] = {}
        for item in batch:
            if isinstance(item, tuple):
                command, channel = item
                if (channel in self.channels) == (command == "SUBSCRIBE"):  # still wanted
                    conn = await self._connection(channel, subscriber=True)
                    conn.send([(pack(self._command(command), channel), None)])
                continue
            where = item.channel if isinstance(item, Publish) else item.key
            commands = out.setdefault(await self._connection(where, subscriber=False), [])
            commands.extend(self._pack(item))
        for conn, commands in out.items():
            conn.send(commands)

    def _pack(self, op: Op) -> list[tuple[bytes, Handler]]:
        if isinstance(op, Publish):
            return [(pack(self._command("PUBLISH"), op.channel, op.data), self._refused)]
        if isinstance(op, SetKey):
            return [(pack("SET", op.key, "1", "PX", op.ttl_ms), self._written)]
        if isinstance(op, DelKey):
            return [(pack("DEL", op.key), self._refused)]
        if isinstance(op, HashDel):
            return [(pack("HDEL", op.key, *op.fields), self._refused)]
        flat = [x for pair in op.fields.items() for x in pair]
        if isinstance(op, HashSet):
            return [
                (pack("HSET", op.key, *flat), self._written),
                (pack("PEXPIRE", op.key, op.ttl_ms), self._refused),
            ]
        script = pack("EVAL", REPLACE_SCRIPT, 1, op.key, op.prefix, op.ttl_ms, *flat)
        return [(script, self._written if flat else self._refused)]

    def _written(self, reply: Any) -> None:
        """The reply to a write that needs memory: its outcome is the replica's."""
        self.wrote(str(reply) if isinstance(reply, hiredis.ReplyError) else None)

    def _refused(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            self.wrote(str(reply))

    # -- reads -------------------------------------------------------------------------

    async def _read(self, command: Any) -> Any:
        return await read(self.url, command)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        raw = await self._read(self.redis.hgetall(key))
        return {_text(k): v for k, v in raw.items()}

    async def hkeys(self, key: str) -> list[str]:
        return [_text(k) for k in await self._read(self.redis.hkeys(key))]

    async def ttl(self, key: str) -> float:
        return max(0, int(await self._read(self.redis.pttl(key)))) / 1000

    async def scan(self, pattern: str) -> list[str]:
        async def keys() -> list[str]:
            return [_text(k) async for k in self.redis.scan_iter(match=pattern, count=500)]

        return list(await self._read(keys()))


class RedisBackplane(Replication):
    """Replication over Redis."""

    def __init__(
        self,
        replica_id: str,
        url: str,
        *,
        sharded: bool = False,
        cluster: bool = False,
        replica_timeout: float = 5.0,
        permdown_after: float = 300.0,
        prefix: str = "presence",
    ) -> None:
        # A stall is noticed within about twice a heartbeat (and at least a second: a
        # busy machine answers late too); a replica is judged down only later.
        timeout = max(1.0, 0.4 * replica_timeout)
        super().__init__(
            replica_id,
            RedisTransport(url, sharded=sharded, cluster=cluster, timeout=timeout),
            replica_timeout=replica_timeout,
            permdown_after=permdown_after,
            prefix=prefix,
            sharded=sharded or cluster,
        )


def redis_client(url: str, *, cluster: bool, timeout: float) -> Redis | RedisCluster:
    """A redis-py client for reads (and identity scopes), with timeouts; ``timeout``: how
    often an idle connection is checked before use."""
    if cluster:
        return RedisCluster.from_url(
            url, socket_timeout=CONNECT_TIMEOUT, socket_connect_timeout=CONNECT_TIMEOUT
        )
    return Redis.from_url(
        url,
        socket_timeout=CONNECT_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=timeout,
    )


async def read(url: str, command: Awaitable[Any]) -> Any:
    """Await a redis-py command; the network failing raises :class:`Unavailable`."""
    try:
        return await command
    except Exception as exc:
        if not _network_error(exc):
            raise
        raise Unavailable(f"redis unavailable ({_safe(url)}): {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _with_host(url: str, host: str, port: int) -> str:
    """``url`` pointed at another node of the same cluster (same scheme, credentials)."""
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{credentials}{host}:{port}"))


def _network_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the network failing, not a bug: under uvloop, writing on a
    connection the peer has just closed raises RuntimeError ("the handler is closed"),
    in our code and in redis-py's alike, a loop turn before the loss is reported."""
    if isinstance(exc, RedisError | OSError):
        return True
    return isinstance(exc, RuntimeError) and "handler is closed" in str(exc)


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
