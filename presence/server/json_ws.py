"""The JSON WebSocket endpoint, ``/rooms/{room}``: one task per connection reads, an
:class:`Outbox` writes."""

from __future__ import annotations

import logging

from starlette.websockets import WebSocket

from presence.codecs import json as codec
from presence.core.identity import InvalidToken
from presence.core.room import ROOM_NAME_RULE, RoomError, is_valid_room_name
from presence.server.hub import Hub, Membership, RoomFull
from presence.server.outbox import Outbox
from presence.server.updates import RateLimitedUpdates
from presence.server.websocket import incoming, session, socket_outbox

log = logging.getLogger("presence.ws")

MAX_CONSECUTIVE_ERRORS = 10


async def json_room(websocket: WebSocket) -> None:
    hub: Hub = websocket.app.state.hub
    room = websocket.path_params["room"]
    await websocket.accept()
    if not is_valid_room_name(room):
        await websocket.close(1008, f"invalid room name: use {ROOM_NAME_RULE}")
        return

    outbox: Outbox[str] = socket_outbox(websocket, hub, codec.ENCODER, binary=False)
    try:
        membership = await hub.join(room, outbox, websocket.query_params.get("token"))
    except InvalidToken as exc:
        hub.metrics.error("invalid_token")
        await websocket.send_text(codec.error("invalid_token", str(exc)))
        await websocket.close(1008, "invalid identity token")
        return
    except RoomFull as exc:
        await websocket.close(1013, str(exc))
        return
    # Queued before any batch can be: the snapshot and the events after it line up.
    outbox.push(
        [
            codec.welcome(
                membership.member,
                membership.token,
                room,
                membership.others,
                {
                    "idle_after": hub.settings.idle_after,
                    "expire_after": hub.settings.expire_after,
                    "heartbeat_interval": hub.settings.heartbeat_interval,
                },
            )
        ]
    )
    updates = RateLimitedUpdates(hub, room, membership.member.id)
    async with session(hub, room, outbox):
        try:
            await _read(websocket, hub, membership, updates, outbox)
        finally:
            updates.cancel()


async def _read(
    websocket: WebSocket,
    hub: Hub,
    membership: Membership,
    updates: RateLimitedUpdates,
    outbox: Outbox[str],
) -> None:
    errors = 0
    max_depth = hub.settings.max_depth
    async for text in incoming(websocket, hub, outbox, "text"):
        try:
            command = codec.decode(text, max_depth=max_depth)
            if isinstance(command, codec.Update):
                updates.submit(command.patch)
            else:
                hub.heartbeat(membership.room, membership.member.id)
            errors = 0
        except (codec.ProtocolError, RoomError) as exc:
            code = exc.code
            hub.metrics.error(code)
            errors += 1
            if errors > MAX_CONSECUTIVE_ERRORS:
                await websocket.close(1008, "too many invalid messages")
                return
            outbox.push([codec.error(code, str(exc))])
