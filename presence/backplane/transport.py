"""What replication needs from a message bus and a store: publish, subscribe, a few hash
and key operations. Two implementations: in memory (one process, tests) and Redis.

Everything a replica writes (publishes, hash and key writes) goes through :meth:`send`,
in order, on one path: a goodbye never overtakes the events before it. Writes are not
awaited; a transport reports what became of them through its state (:attr:`ready`,
:meth:`status`). Reads are awaited and raise :class:`Unavailable`. Subscribing is
awaited too: a room's members are read once its messages are sure to come.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("presence.backplane")


@dataclass(frozen=True, slots=True)
class Publish:
    channel: str
    data: bytes


@dataclass(frozen=True, slots=True)
class HashSet:
    key: str
    fields: dict[str, bytes]
    ttl_ms: int  # the hash expires this long after its last write


@dataclass(frozen=True, slots=True)
class HashDel:
    key: str
    fields: list[str]


@dataclass(frozen=True, slots=True)
class HashReplace:
    """Make the fields of ``key`` that start with ``prefix`` exactly ``fields``."""

    key: str
    prefix: str
    fields: dict[str, bytes]
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class SetKey:
    """A key that exists for ``ttl_ms`` (a replica's liveness)."""

    key: str
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class DelKey:
    key: str


Op = Publish | HashSet | HashDel | HashReplace | SetKey | DelKey


def messages(ops: Sequence[Op | tuple[str, str]]) -> int:
    """How many of ``ops`` are messages (publishes): what ``dropped`` counts."""
    return sum(1 for op in ops if isinstance(op, Publish))


class Receiver(Protocol):
    """What a transport tells replication."""

    def on_message(self, channel: str, data: bytes) -> None:
        """A message on a subscribed channel (our own ones included)."""

    def on_up(self) -> None:
        """Connected, or back after an outage or a stall: messages may have been lost."""


class Transport(ABC):
    kind = "store"  # what logs call it

    def __init__(self) -> None:
        self.receiver: Receiver | None = None
        self.dropped = 0  # messages (publishes) not sent because the transport was down
        self.connect_failures = 0
        self.reconnects = 0
        # Why the last write was refused (Redis out of memory, read-only, ...), until one
        # succeeds: publishing still works then, but late joiners' snapshots go stale.
        self.write_error: str | None = None

    def wrote(self, error: str | None) -> None:
        """The outcome of a write (a hash or key operation): logged when it changes."""
        if error is None:
            if self.write_error is not None:
                log.info(f"{self.kind} accepts writes again", extra={"error": self.write_error})
                self.write_error = None
        elif self.write_error is None:
            self.write_error = error
            log.warning(
                f"{self.kind} refuses writes, not ready until it accepts them: {error}",
                extra={"error": error},
            )

    async def start(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def stop(self) -> None:
        """Send what is queued (within a short grace), then close."""
        self.receiver = None

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Connected, answering, and accepting writes."""

    def status(self) -> dict[str, Any] | None:
        return None

    # No other replica can ever hear this one (a memory bus of its own): replication
    # publishes nothing, writes nothing, and costs next to nothing.
    alone = False

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Receive the channel's messages; returns once those published from now on are
        sure to come (when connected: otherwise the connection subscribes, and the
        receiver's ``on_up`` follows). Never raises."""

    @abstractmethod
    def unsubscribe(self, channel: str) -> None: ...

    @abstractmethod
    def send(self, ops: Sequence[Op]) -> None:
        """Queue writes, to be carried out in order; never blocks, never raises."""

    @abstractmethod
    async def hgetall(self, key: str) -> dict[str, bytes]: ...

    @abstractmethod
    async def hkeys(self, key: str) -> list[str]: ...

    @abstractmethod
    async def ttl(self, key: str) -> float:
        """Seconds ``key`` has left; 0 if it does not exist."""

    @abstractmethod
    async def scan(self, pattern: str) -> list[str]:
        """Keys matching a glob pattern."""
