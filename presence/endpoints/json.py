"""The JSON WebSocket endpoint, ``/rooms/{room}``: one member per connection."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from presence.access.admission import Admission, refused
from presence.codecs import json as codec
from presence.core.access import AccessError
from presence.core.events import MemberInfo
from presence.core.identity import InvalidToken
from presence.core.room import ROOM_NAME_RULE, RoomError, is_valid_room_name
from presence.hub.hub import Hub, RoomFull
from presence.hub.outbox import Outbox
from presence.hub.updates import RateLimitedUpdates

if TYPE_CHECKING:
    from presence.websocket.connection import Connection

MAX_CONSECUTIVE_ERRORS = 10


@dataclass(frozen=True, slots=True)
class Membership:
    """What a JSON connection gets back from :func:`join`."""

    room: str
    member: MemberInfo
    token: str
    others: list[MemberInfo]


async def join(hub: Hub, room_name: str, outbox: Outbox[str], token: str | None) -> Membership:
    """Add a member for a new JSON connection; raises InvalidToken or RoomFull."""
    identity = hub.identities.verify(token) if token else None
    room = await hub.open(room_name)
    hub.attach(room, outbox)
    member_id = secrets.token_hex(8)
    hub.admit(room, outbox, member_id, identity)
    return Membership(
        room_name,
        room.member(member_id).copy(),
        hub.identities.token(identity or room.member(member_id).identity),
        [m for m in room.snapshot() if m.id != member_id],
    )


class JsonEndpoint:
    text: ClassVar[bool] = True
    protocol: ClassVar[str] = "json"

    def __init__(self, connection: Connection, hub: Hub, room: str) -> None:
        self.connection = connection
        self.hub = hub
        self.room = room
        self.outbox: Outbox[str] = Outbox(
            connection,
            codec.ENCODER,
            max_backlog=hub.settings.send_backlog,
            clock=hub.clock,
            metrics=hub.metrics,
        )
        connection.outbox = self.outbox
        self.membership: Membership | None = None
        self.updates: RateLimitedUpdates | None = None
        self.errors = 0
        self.admission: Admission | None = None

    async def open(self) -> None:
        hub, connection = self.hub, self.connection
        if not is_valid_room_name(self.room):
            connection.close(1008, f"invalid room name: use {ROOM_NAME_RULE}")
            return
        token = connection.query.get("token")
        try:
            self.admission = await Admission.of(connection.access, connection, self.room)
        except AccessError as exc:
            connection.send([codec.error(exc.code, exc.message)])
            refused(connection, exc)
            return
        grant = self.admission.grant
        try:
            if grant is not None and grant.has_identity:
                # The token's name, colour, username in place of the usual ones.
                room = await hub.open(self.room)
                claimed = grant.identity(
                    lambda: (
                        hub.identities.verify(token)
                        if token
                        else hub.identities.create(room.names(), room.colors())
                    )
                )
                token = hub.identities.token(claimed) if claimed else token
            membership = await join(hub, self.room, self.outbox, token)
        except InvalidToken as exc:
            hub.metrics.error("invalid_token")
            connection.send([codec.error("invalid_token", str(exc))])
            connection.close(1008, "invalid identity token")
            return
        except RoomFull as exc:
            connection.close(1013, str(exc))
            return
        self.membership = membership
        self.updates = RateLimitedUpdates(hub, self.room, membership.member.id)
        # Sent before any batch can be: the snapshot and the events after it line up.
        self.outbox.push(
            [
                codec.welcome(
                    membership.member,
                    membership.token,
                    self.room,
                    membership.others,
                    {
                        "idle_after": hub.settings.idle_after,
                        "expire_after": hub.settings.expire_after,
                        "heartbeat_interval": hub.settings.heartbeat_interval,
                    },
                )
            ]
        )

    def receive(self, text: str) -> None:
        assert self.membership is not None and self.updates is not None
        try:
            command = codec.decode(text, max_depth=self.hub.settings.max_depth)
            if isinstance(command, codec.Update):
                self.updates.submit(command.patch)
            else:
                self.hub.heartbeat(self.room, self.membership.member.id)
            self.errors = 0
        except (codec.ProtocolError, RoomError) as exc:
            self.hub.metrics.error(exc.code)
            self.errors += 1
            if self.errors > MAX_CONSECUTIVE_ERRORS:
                self.connection.close(1008, "too many invalid messages")
                return
            self.outbox.push([codec.error(exc.code, str(exc))])

    def spoke_for(self) -> list[str]:
        return [] if self.membership is None else [self.membership.member.id]

    def closed(self) -> None:
        if self.admission is not None:
            self.admission.cancel()
        if self.updates is not None:
            self.updates.cancel()
        self.hub.disconnect(self.room, self.outbox)
