"""One connection's outgoing side: a bounded queue, a writer task, coalescing.

A fast connection gets the frames its room encoded once for everybody (an
:class:`Encoder` encodes a batch once per tick; ``frames`` only picks this connection's
share, for example leaving out a Yjs client's own states). A connection that
falls behind (its queue passes ``max_backlog`` batches) has its queued batches merged
into one, latest state per member, and encoded for it alone when it catches up: its
memory is bounded by the room's size, not by how long it has been stalled. A send that
does not complete within the slow-client timeout gets the connection closed (the hub's
sweep checks :attr:`Outbox.sending_since`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from presence.core.events import Batch
from presence.server.metrics import Metrics

F = TypeVar("F", str, bytes)


class Encoder(Protocol[F]):
    """A wire format's encoding of room batches, shared by the connections that use it."""

    def shared(self, batch: Batch) -> Any:
        """Encode a batch once, for every connection of the room using this format."""

    def frames(self, shared: Any, outbox: Outbox[F]) -> list[F]:
        """The frames one connection gets from a shared encoding."""


@dataclass(slots=True)
class _Item:
    frames: list[Any] | None  # a direct reply (welcome, error): never merged
    batch: Batch | None = None
    shared: Any = None  # the batch's shared encoding; None: encode when sending


class Outbox(Generic[F]):
    def __init__(
        self,
        send: Callable[[F], Awaitable[None]],
        close: Callable[[int, str], Awaitable[None]],
        encoder: Encoder[F],
        *,
        max_backlog: int,
        clock: Callable[[], float],
        metrics: Metrics,
    ) -> None:
        self._send: Callable[[F], Awaitable[None]] = send
        self._close = close
        self.members: set[str] = set()  # the member ids this connection speaks for
        # Yjs: the clock of the last state of each client ID sent to this connection, to
        # recognise the copies that stock clients send back.
        self.told: dict[int, int] = {}
        # A JSON member that expires has a dead client: close. A Yjs client ID expires
        # on its own (y-protocols), its connection stays.
        self.close_on_expiry = True
        self._task: asyncio.Task[None] | None = None
        self._abort: tuple[int, str] | None = None
        self.encoder: Encoder[F] = encoder
        self.max_backlog = max_backlog
        self._clock = clock
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self.closed = False
        self.sending_since: float | None = None
        self._metrics = metrics

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, frames: list[F]) -> None:
        """Queue frames meant for this connection only."""
        self._put(_Item(frames))

    def push_batch(self, batch: Batch, shared: Any) -> None:
        """Queue a room batch with its shared encoding."""
        self._put(_Item(None, batch, shared))

    def _put(self, item: _Item) -> None:
        if self.closed:
            return
        self._queue.append(item)
        if len(self._queue) > self.max_backlog:
            self._merge_backlog()
        self._wakeup.set()

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

    async def run(self) -> None:
        """Write queued frames until closed; after :meth:`abort`, close the socket."""
        self._task = asyncio.current_task()
        try:
            await self._write()
        except asyncio.CancelledError:
            if self._abort is None:
                raise
        if self._abort is not None:
            await self._close(*self._abort)

    async def _write(self) -> None:
        while not self.closed:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            item = self._queue.popleft()
            frames = item.frames
            if frames is None:
                assert item.batch is not None
                shared = item.shared
                if shared is None:
                    shared = self.encoder.shared(item.batch)
                frames = self.encoder.frames(shared, self)
            for frame in frames:
                self.sending_since = self._clock()
                await self._send(frame)
                self.sending_since = None
                self._metrics.messages_out += 1

    def close(self) -> None:
        self.closed = True
        self._queue.clear()
        self._wakeup.set()

    def abort(self, code: int, reason: str) -> None:
        """Drop what is queued, stop a stalled send, and close the socket with ``code``."""
        self._abort = (code, reason)
        self.close()
        if self._task is not None:
            self._task.cancel()
