"""What the WebSocket endpoints share: an outbox bound to a socket, and its writer task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

from starlette.websockets import WebSocket, WebSocketDisconnect

from presence.server.hub import Hub
from presence.server.outbox import Encoder, Outbox


def socket_outbox(
    websocket: WebSocket, hub: Hub, encoder: Encoder[Any], *, binary: bool
) -> Outbox[Any]:
    async def send(frame: Any) -> None:
        if binary:
            await websocket.send_bytes(frame)
        else:
            await websocket.send_text(frame)

    async def close(code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await websocket.close(code, reason)

    return Outbox(
        send,
        close,
        encoder,
        max_backlog=hub.settings.send_backlog,
        clock=hub.clock,
        metrics=hub.metrics,
    )


@contextlib.asynccontextmanager
async def session(hub: Hub, room: str, outbox: Outbox[Any]) -> AsyncIterator[None]:
    """A connection's life in a room: its writer runs for the block; when the block ends,
    however it ends (the client went away, a close), its members leave at once."""
    writer = asyncio.create_task(outbox.run())
    try:
        with contextlib.suppress(WebSocketDisconnect):
            yield
    finally:
        hub.disconnect(room, outbox)
        if not writer.done():
            writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer


async def incoming(
    websocket: WebSocket, hub: Hub, outbox: Outbox[Any], kind: Literal["text", "bytes"]
) -> AsyncIterator[Any]:
    """The client's messages until it leaves or the connection is closed; a frame of the
    other kind closes the connection with 1003."""
    while not outbox.closed:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        hub.metrics.messages_in += 1
        data = message.get(kind)
        if data is None:
            hub.metrics.error("binary_frame" if kind == "text" else "text_frame")
            await websocket.close(
                1003,
                "binary frames are not supported here; send JSON text"
                if kind == "text"
                else "y-websocket messages are binary frames",
            )
            return
        yield data
