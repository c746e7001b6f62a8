"""A y-websocket client for tests: pycrdt's Awareness behind a real WebSocket, behaving
like the stock JavaScript client (including sending back every update it receives)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

import websockets
from pycrdt import (
    Awareness,
    Decoder,
    Doc,
    YMessageType,
    create_awareness_message,
    create_sync_message,
)


class YClient:
    def __init__(self, ws: websockets.ClientConnection, client_id: int | None, echo: bool) -> None:
        self.ws = ws
        # A 32-bit client ID, as Yjs makes them (pycrdt's own default has 53 bits, which
        # presence refuses from Yjs sockets).
        doc = Doc(client_id=client_id if client_id is not None else random.randrange(1, 1 << 32))
        self.awareness = Awareness(doc)
        self.echo = echo
        self.received: list[bytes] = []
        self.synced = False
        self.error: Exception | None = None
        self.changed = asyncio.Event()
        self.awareness.observe(self._on_change)
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls,
        url: str,
        state: dict[str, Any] | None = None,
        *,
        client_id: int | None = None,
        echo: bool = True,
    ) -> YClient:
        client = cls(await websockets.connect(url), client_id, echo)
        # What WebsocketProvider does on open, without waiting for anything.
        await client.ws.send(create_sync_message(client.awareness_doc))
        if state is not None:
            await client.set(state)
        return client

    @property
    def awareness_doc(self) -> Doc:
        return Doc()

    @property
    def id(self) -> int:
        return self.awareness.client_id

    @property
    def states(self) -> dict[int, dict[str, Any]]:
        return {c: s for c, s in self.awareness.states.items() if c != self.id}

    async def set(self, state: dict[str, Any] | None) -> None:
        self.awareness.set_local_state(state)
        await self.send_update([self.id])

    async def send_update(self, client_ids: list[int]) -> None:
        update = self.awareness.encode_awareness_update(client_ids)
        await self.ws.send(create_awareness_message(update))

    def _on_change(self, topic: str, changes: tuple[dict[str, Any], Any]) -> None:
        self.changed.set()
        summary, origin = changes
        if topic == "update" and origin == "remote" and self.echo:
            ids = summary["added"] + summary["updated"] + summary["removed"]
            if ids:
                # Stock clients send every received change back to the server.
                asyncio.get_running_loop().create_task(self._echo(ids))

    async def _echo(self, ids: list[int]) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.send_update(ids)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                assert isinstance(message, bytes)
                self.received.append(message)
                if message[0] == YMessageType.AWARENESS:
                    payload = Decoder(message[1:]).read_message()
                    assert payload is not None
                    self.awareness.apply_awareness_update(payload, "remote")
                elif message[:2] == b"\x00\x01":
                    self.synced = True
                self.changed.set()
        except websockets.ConnectionClosed:
            pass
        except Exception as exc:  # surfaced by until(), not lost in a task
            self.error = exc
            self.changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.error is not None:
                raise RuntimeError("the client's reader failed") from self.error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"condition not met; states: {self.states}; last messages: {self.received[-3:]}"
                )
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.2))

    async def close(self) -> None:
        """A clean close, as the stock client does it: own state to null first."""
        await self.set(None)
        await self.ws.close()
        self.reader.cancel()

    def abort(self) -> None:
        """The network goes away: no null state, no close frame."""
        self.ws.transport.abort()
        self.reader.cancel()
