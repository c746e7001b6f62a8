"""The y-websocket endpoint, ``/yjs/{room}``: awareness for stock Yjs clients.

Each Yjs client ID is a member of the room (id ``y<clientID>``), bound to the connection
that introduced it: other connections can neither change nor remove it, and when that
connection closes, cleanly or not, its client IDs are removed for everyone at once. A
client ID that left stays reserved for ``yjs_id_grace`` seconds: only its socket, or a
socket with the same identity token (a stock client reconnecting), may take it back
meanwhile (:class:`~presence.yjs.holds.Holds`). Client IDs are 32-bit, as Yjs
makes them: those above are JSON members' and never a Yjs socket's.

A Yjs state is a whole state: it replaces the member's (``Room.replace``), ``null``
fields included, so that Yjs peers get it as its owner set it. The room's Yjs-only
bookkeeping (clocks, renewals) is its :class:`~presence.yjs.view.YjsView`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from presence.access.admission import Admission, refused
from presence.core.access import AccessError
from presence.core.identity import InvalidToken
from presence.core.room import ROOM_NAME_RULE, RoomError, is_valid_room_name
from presence.hub.hub import Hub, RoomFull
from presence.hub.outbox import Outbox
from presence.yjs import codec as yjs
from presence.yjs.client import YjsClient
from presence.yjs.view import YjsView

if TYPE_CHECKING:
    from presence.websocket.connection import Connection

log = logging.getLogger("presence.yjs")

# Bytes per member that an echoed snapshot holds beyond the states themselves (client
# ID, clock, length, the server's "presence" field), with room to spare.
ECHO_OVERHEAD = 128


class YjsEndpoint:
    text: ClassVar[bool] = False
    protocol: ClassVar[str] = "yjs"

    @staticmethod
    def max_message_bytes(settings: Any) -> int:
        """Stock providers send every awareness change they receive back, in one
        message: a joiner's echo of its snapshot holds the whole room's states (a class of
        300 sent 1009-closed sockets in a loop while the limit was 16 KiB): the room's
        states together, and per member its entry's header and the fields the server
        adds. Each state is still held to ``max_state_bytes``."""
        limit: int = settings.max_message_bytes
        room: int = getattr(settings, "max_room_state_bytes", 0)
        members: int = getattr(settings, "max_room_members", 0)
        return limit + room + members * ECHO_OVERHEAD

    def __init__(self, connection: Connection, hub: Hub, room: str) -> None:
        self.connection = connection
        self.hub = hub
        self.room = room
        self.outbox: Outbox[bytes] | None = None
        self.client: YjsClient | None = None
        self.view: YjsView | None = None
        self.admission: Admission | None = None

    async def open(self) -> None:
        hub, connection = self.hub, self.connection
        if not is_valid_room_name(self.room):
            connection.close(1008, f"invalid room name: use {ROOM_NAME_RULE}")
            return
        try:
            self.admission = await Admission.of(connection.access, connection, self.room)
        except AccessError as exc:
            refused(connection, exc)
            return
        token = connection.query.get("token")
        try:
            identity = hub.identities.verify(token) if token else None
        except InvalidToken as exc:
            hub.metrics.error("invalid_token")
            connection.close(1008, f"invalid identity token: {exc}"[:120])
            return
        room = await hub.open(self.room)
        if self.admission.grant is not None:  # the token's name, colour, username
            identity = (
                self.admission.grant.identity(
                    lambda: identity or hub.identities.create(room.names(), room.colors())
                )
                or identity
            )
        view = self.view = hub.observer(room, YjsView)
        outbox = self.outbox = Outbox(
            connection,
            view,
            max_backlog=hub.settings.send_backlog,
            clock=hub.clock,
            metrics=hub.metrics,
        )
        connection.outbox = outbox
        told = view.attach(outbox, identity.username if identity is not None else None)
        hub.attach(room, outbox)
        # Stock clients never ask (query-awareness): push the room's states on join.
        outbox.push([view.full(view.snapshot(), outbox)])
        self.client = YjsClient(hub, room, outbox, identity, told, view, self.admission.grant)

    def receive(self, data: bytes) -> None:
        assert self.outbox is not None and self.client is not None and self.view is not None
        hub, outbox, view = self.hub, self.outbox, self.view
        if view.echoes.echoed(outbox, data):
            hub.metrics.yjs_echoes += 1
            return
        try:
            kind, reader = yjs.read_message(data)
            if kind == yjs.AWARENESS:
                for entry in yjs.read_awareness(reader):
                    try:
                        self.client.receive(entry)
                    except yjs.MalformedMessage as exc:
                        hub.metrics.error("invalid_state")  # one bad state: skip it
                        log.debug("ignored awareness entry: %s", exc)
                    except RoomFull as exc:
                        self.connection.close(1013, str(exc))
                        return
                    except RoomError as exc:
                        hub.metrics.error(exc.code)
            elif kind == yjs.SYNC:
                if yjs.is_sync_step1(reader):
                    outbox.push([yjs.EMPTY_SYNC_STEP2])
                # Document updates are not ours to keep: this service holds no documents.
            elif kind == yjs.QUERY_AWARENESS:
                outbox.push([view.full(view.snapshot(), outbox)])
            elif kind != yjs.AUTH:
                hub.metrics.error("unknown_type")
                self.connection.close(1003, f"unsupported y-websocket message type {kind}")
        except yjs.MalformedMessage as exc:
            hub.metrics.error("malformed")
            self.connection.close(1007, f"malformed message: {exc}")

    def spoke_for(self) -> list[str]:
        """Its client IDs, those whose state went null too (a stock client nulls its
        own before closing): every ID it announced a state of (``clocks``)."""
        if self.client is None:
            return []
        ids = {yjs.member_id_of(client_id) for client_id in self.client.clocks}
        return sorted(ids | self.client.outbox.members)

    def closed(self) -> None:
        if self.admission is not None:
            self.admission.cancel()
        if self.client is not None:
            self.client.close()
        if self.outbox is not None:
            if self.view is not None:
                self.view.detach(self.outbox)
            self.hub.disconnect(self.room, self.outbox)
