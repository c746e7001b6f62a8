"""What the WebSocket endpoints share: an outbox bound to a socket, and its writer task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.websockets import WebSocket

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
async def writing(outbox: Outbox[Any]) -> AsyncIterator[None]:
    """Run the outbox's writer for the duration of the block."""
    writer = asyncio.create_task(outbox.run())
    try:
        yield
    finally:
        if not writer.done():
            writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
