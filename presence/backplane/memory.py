"""The in-memory transport: replicas in one process share a bus.

It is the default backplane of a single process: a :class:`MemoryBackplane` given no
bus has one of its own, which no other replica can join, and is *alone*: replication
publishes nothing and writes nothing then, and a publish costs a method call.

It is also what the replication tests run on: they deliver messages when they choose
(``MemoryBus(manual=True)`` and :meth:`pump`), lose chosen ones (:attr:`MemoryBus.drop`),
freeze a replica (:meth:`freeze`), make the store refuse writes
(:attr:`MemoryBus.refuse_writes`), as Redis could, and act while a replica reads a hash
(:attr:`MemoryBus.on_read`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from presence.backplane.replication import Replication
from presence.backplane.transport import (
    DelKey,
    HashDel,
    HashReplace,
    Op,
    Publish,
    SetKey,
    Transport,
)

OOM = "OOM command not allowed (MemoryBus.refuse_writes)"


class MemoryBus:
    """What Redis is to the Redis transport: channels, hashes, expiring keys."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, manual: bool = False):
        self.clock = clock
        self.manual = manual  # deliver on pump() only, not on the next loop turn
        self.subscribers: dict[str, set[MemoryTransport]] = {}
        self.hashes: dict[str, dict[str, bytes]] = {}
        self.expiry: dict[str, float] = {}  # key -> when it goes
        self.queue: deque[tuple[MemoryTransport, str, bytes]] = deque()
        self.frozen: set[str] = set()  # replicas whose messages wait until thawed
        # Tests: return True to lose a message (channel, data, receiving replica).
        self.drop: Callable[[str, bytes, str], bool] | None = None
        self.refuse_writes = False
        # Tests: called with the key as a replica reads a hash, before it is read; what
        # it publishes (and pumps) arrives while the replica waits for the read.
        self.on_read: Callable[[str], None] | None = None
        self._scheduled = False

    def publish(self, channel: str, data: bytes) -> None:
        for peer in self.subscribers.get(channel, ()):
            self.queue.append((peer, channel, data))  # ourselves too, as Redis does
        if not self.manual and not self._scheduled and self.queue:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.pump)

    def pump(self) -> int:
        """Deliver what is queued (and what that causes), in order; returns how many."""
        self._scheduled = False
        delivered = 0
        held: deque[tuple[MemoryTransport, str, bytes]] = deque()
        while self.queue:
            peer, channel, data = item = self.queue.popleft()
            if peer.name in self.frozen:
                held.append(item)
            elif self.drop is None or not self.drop(channel, data, peer.name):
                delivered += 1
                peer.deliver(channel, data)
        self.queue = held
        return delivered

    def freeze(self, replica: str) -> None:
        self.frozen.add(replica)

    def thaw(self, replica: str) -> None:
        self.frozen.discard(replica)

    def alive(self, key: str) -> bool:
        expires = self.expiry.get(key)
        if expires is not None and expires <= self.clock():
            self.hashes.pop(key, None)
            del self.expiry[key]
            return False
        return key in self.hashes or key in self.expiry


class MemoryTransport(Transport):
    kind = "memory"

    def __init__(self, bus: MemoryBus, name: str) -> None:
        super().__init__()
        self.bus = bus
        self.name = name
        self.channels: set[str] = set()

    async def start(self, receiver: Any) -> None:
        await super().start(receiver)
        receiver.on_up()

    async def stop(self) -> None:
        for channel in list(self.channels):
            self.unsubscribe(channel)
        await super().stop()

    @property
    def ready(self) -> bool:
        return self.write_error is None

    def deliver(self, channel: str, data: bytes) -> None:
        if self.receiver is not None and channel in self.channels:
            self.receiver.on_message(channel, data)

    async def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        self.bus.subscribers.setdefault(channel, set()).add(self)

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        subscribers = self.bus.subscribers.get(channel)
        if subscribers is not None:
            subscribers.discard(self)
            if not subscribers:
                del self.bus.subscribers[channel]

    def send(self, ops: Sequence[Op]) -> None:
        bus = self.bus
        for op in ops:
            if isinstance(op, Publish):
                bus.publish(op.channel, op.data)  # works when writes do not, as in Redis
                continue
            deletes = isinstance(op, HashDel | DelKey) or (
                isinstance(op, HashReplace) and not op.fields
            )
            if bus.refuse_writes and not deletes:
                self.wrote(OOM)
                continue
            if isinstance(op, SetKey):
                bus.expiry[op.key] = bus.clock() + op.ttl_ms / 1000
            elif isinstance(op, DelKey):
                bus.hashes.pop(op.key, None)
                bus.expiry.pop(op.key, None)
            elif isinstance(op, HashDel):
                fields = bus.hashes.get(op.key, {})
                for field in op.fields:
                    fields.pop(field, None)
            else:
                fields = bus.hashes.setdefault(op.key, {})
                if isinstance(op, HashReplace):
                    for field in [f for f in fields if f.startswith(op.prefix)]:
                        del fields[field]
                fields.update(op.fields)
                if op.fields:
                    bus.expiry[op.key] = bus.clock() + op.ttl_ms / 1000
            if not deletes:
                self.wrote(None)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        await asyncio.sleep(0)  # a read takes a while: messages may arrive meanwhile
        if self.bus.on_read is not None:
            self.bus.on_read(key)
        return dict(self.bus.hashes.get(key, {})) if self.bus.alive(key) else {}

    async def hkeys(self, key: str) -> list[str]:
        return list(self.bus.hashes.get(key, {})) if self.bus.alive(key) else []

    async def ttl(self, key: str) -> float:
        if not self.bus.alive(key):
            return 0.0
        return max(0.0, self.bus.expiry.get(key, float("inf")) - self.bus.clock())

    async def scan(self, pattern: str) -> list[str]:
        keys = [*self.bus.hashes, *self.bus.expiry]
        return sorted({k for k in keys if fnmatch.fnmatchcase(k, pattern) and self.bus.alive(k)})


class MemoryBackplane(Replication):
    """Replication over a :class:`MemoryBus` (a new one if none is given)."""

    def __init__(
        self,
        replica_id: str,
        bus: MemoryBus | None = None,
        clock: Callable[[], float] | None = None,
        **options: Any,
    ) -> None:
        self.bus = bus or MemoryBus(clock or time.monotonic)
        transport = MemoryTransport(self.bus, replica_id)
        transport.alone = bus is None  # a bus of its own: nobody else can ever hear it
        super().__init__(replica_id, transport, clock=clock or self.bus.clock, **options)
