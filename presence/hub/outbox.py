"""One connection's outgoing side: frames written at once, coalescing while it lags.

A connection whose socket accepts data gets the frames its room encoded once for
everybody, written synchronously in the flush that made them (an :class:`Encoder`
encodes a batch once per tick; ``frames`` picks this connection's share, for example
leaving out a Yjs client's own states). No task, no queue: that is what keeps an idle
connection small and a busy one cheap. When the socket's buffer is full (the client
stopped reading), batches wait here; past ``max_backlog`` of them they are merged into
one, latest state per member, and encoded for this connection alone when it catches
up, so memory is bounded by the room's size, not by how long the client lags. A client
that lags for longer than the slow-client timeout is closed (the hub's sweep checks
:attr:`Outbox.blocked_since`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from presence.core.events import Batch
from presence.metrics import Metrics

F = TypeVar("F", str, bytes)


class Encoder(Protocol[F]):
    """A wire format's encoding of room batches, shared by the connections that use it."""

    # 'json', 'yjs' or 'sse': the label of its sessions and fan-out delays on /metrics.
    protocol: str

    def shared(self, batch: Batch) -> Any:
        """Encode a batch once, for every connection of the room using this format."""

    def frames(self, shared: Any, outbox: Outbox[F]) -> list[F]:
        """The frames one connection gets from a shared encoding."""


class Sink(Protocol):
    """Where an outbox writes: a WebSocket connection."""

    @property
    def writable(self) -> bool:
        """False while the socket's send buffer is full."""

    def send(self, frames: list[Any]) -> None:
        """Write messages now (never blocks)."""

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake."""


@dataclass(slots=True)
class _Item:
    frames: list[Any] | None  # a direct reply (welcome, error): never merged
    batch: Batch | None = None
    shared: Any = None  # the batch's shared encoding; None: encode when sending


class Outbox(Generic[F]):
    def __init__(
        self,
        sink: Sink,
        encoder: Encoder[F],
        *,
        max_backlog: int,
        clock: Callable[[], float],
        metrics: Metrics,
    ) -> None:
        self.sink = sink
        self.members: set[str] = set()  # the member ids this connection speaks for
        self.encoder: Encoder[F] = encoder
        self.max_backlog = max_backlog
        self._clock = clock
        self._queue: deque[_Item] = deque()
        self.closed = False
        self.blocked_since: float | None = None
        self._metrics = metrics

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, frames: list[F]) -> None:
        """Send frames meant for this connection only."""
        self._put(_Item(frames))

    def push_batch(self, batch: Batch, shared: Any) -> None:
        """Send a room batch with its shared encoding."""
        if not self._queue and self.sink.writable and not self.closed:
            # The common case, once per connection and tick: straight to the socket.
            frames = self.encoder.frames(shared, self)
            if frames:
                self.sink.send(frames)
                self._metrics.messages_out += len(frames)
            return
        self._put(_Item(None, batch, shared))

    def _put(self, item: _Item) -> None:
        if self.closed:
            return
        if not self._queue and self.sink.writable:
            self._write(item)
            return
        if self.blocked_since is None:
            self.blocked_since = self._clock()
        self._queue.append(item)
        if len(self._queue) > self.max_backlog:
            self._merge_backlog()

    def _write(self, item: _Item) -> None:
        frames = item.frames
        if frames is None:
            assert item.batch is not None
            shared = item.shared
            if shared is None:
                shared = self.encoder.shared(item.batch)
            frames = self.encoder.frames(shared, self)
        if frames:
            self.sink.send(frames)
            self._metrics.messages_out += len(frames)

    def _merge_backlog(self) -> None:
        merged = Batch()
        kept: deque[_Item] = deque()
        for item in self._queue:
            if item.batch is None:
                kept.append(item)
            else:
                merged.extend(item.batch)
        self._metrics.updates_coalesced += merged.coalesced
        merged.coalesced = 0
        kept.append(_Item(None, merged))
        self._queue = kept

    def resume(self) -> None:
        """The socket accepts data again: send what waited, while it does."""
        while self._queue and self.sink.writable and not self.closed:
            self._write(self._queue.popleft())
        if not self._queue:
            self.blocked_since = None

    def close(self) -> None:
        self.closed = True
        self._queue.clear()

    def abort(self, code: int, reason: str) -> None:
        """Drop what waits and close the socket with ``code``."""
        self.close()
        self.sink.close(code, reason)
