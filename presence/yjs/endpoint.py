"""The y-websocket endpoint, ``/yjs/{room}``: awareness for stock Yjs clients.

Each Yjs client ID is a member of the room (id ``y<clientID>``), bound to the connection
that introduced it: other connections can neither change nor remove it, and when that
connection closes, cleanly or not, its client IDs are removed for everyone at once. A
client ID that left stays reserved for ``yjs_id_grace`` seconds: only its socket, or a
socket with the same identity token (a stock client reconnecting), may take it back
meanwhile (:class:`~presence.yjs.view.Holds`). Client IDs are 32-bit, as Yjs
makes them: those above are JSON members' and never a Yjs socket's.

A Yjs state is a whole state: it replaces the member's (``Room.replace``), ``null``
fields included, so that Yjs peers get it as its owner set it. The room's Yjs-only
bookkeeping (clocks, renewals) is its :class:`~presence.yjs.view.YjsView`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from presence.access.admission import Admission, refused
from presence.core.access import AccessError, Grant
from presence.core.colors import Colors, parse_hex, pick_color
from presence.core.events import State
from presence.core.identity import DECLARED_PREFIX, Identity, InvalidToken, initials_of
from presence.core.room import ROOM_NAME_RULE, Room, RoomError, is_valid_room_name
from presence.hub.hub import Hub, RoomFull
from presence.hub.outbox import Outbox
from presence.hub.updates import RateLimitedUpdates
from presence.yjs import codec as yjs
from presence.yjs.view import YjsView

if TYPE_CHECKING:
    from presence.websocket.connection import Connection

log = logging.getLogger("presence.yjs")

# A y-websocket client speaks for one client ID (a few with several documents); more from
# one socket is somebody filling the room.
MAX_CLIENT_IDS = 8
# Bytes per member that an echoed snapshot holds beyond the states themselves (client
# ID, clock, length, the server's "presence" field), with room to spare.
ECHO_OVERHEAD = 128


class RateLimitedStates(RateLimitedUpdates):
    """Whole states at the rate limit: the latest one waiting replaces the others."""

    def _merge(self, pending: State, state: State) -> None:
        pending.clear()
        pending.update(state)

    def _apply(self, state: State) -> None:
        self.hub.replace(self.room, self.member_id, state)


class YjsClient:
    """What one socket controls: its client IDs, their last clocks and states, their
    rate limits."""

    def __init__(
        self,
        hub: Hub,
        room: Room,
        outbox: Outbox[bytes],
        identity: Identity | None,
        told: dict[int, int],
        view: YjsView,
        grant: Grant | None = None,
    ) -> None:
        self.hub = hub
        self.room = room
        self.outbox = outbox
        self.view = view
        self.identity = identity  # from ?token=, for states that carry no ``user``
        # The room token's: its claimed name, colour, username override the client's.
        self.grant = grant if grant is not None and grant.has_identity else None
        self.told = told  # the clock of each client ID's last state sent to this socket
        self.clocks: dict[int, int] = {}
        self.sent: dict[int, bytes] = {}  # each client ID's last state, as it came
        self.updates: dict[str, RateLimitedStates] = {}

    def receive(self, entry: yjs.Entry) -> None:
        if entry.client_id >= yjs.JSON_CLIENT_BASE:
            # Yjs makes 32-bit client IDs; above are the IDs JSON members appear under,
            # never a Yjs client's to take. Not an error when it is an echo: stock
            # clients send back the JSON members' states they receive.
            if entry.client_id not in self.told:
                self.hub.metrics.error("client_id_range")
            return
        member_id = yjs.member_id_of(entry.client_id)
        mine = member_id in self.outbox.members
        if member_id in self.room and not mine:
            # Another connection's client: an echo of a relayed update (stock clients
            # send every update they receive back), or an attempt to take it over.
            return
        told = self.told.get(entry.client_id)
        if told is not None and entry.clock <= told and not mine:
            # A copy of a state we relayed to this client, arriving after its owner left:
            # adopting it would make this connection the owner of someone else's ID.
            return
        if not mine and not self.view.may_bind(self.outbox, entry.client_id):
            # Reserved for the socket that just had it (issue 13: another socket took a
            # reconnecting client's ID 205 ms after its drop, and kept it).
            self.hub.metrics.error("client_id_held")
            return
        last = self.clocks.get(entry.client_id)
        if last is not None and entry.clock <= last:
            return  # our own client's old state, or an echo of it
        if mine and entry.state == self.sent.get(entry.client_id):
            # y-protocols renews an unchanged state every 15 s: a heartbeat, not a move.
            self.clocks[entry.client_id] = entry.clock
            self.hub.heartbeat(self.room.name, member_id)
            return
        state = yjs.parse_state(entry.state)
        self.clocks[entry.client_id] = entry.clock
        if state is None:
            if mine:
                self._forget(member_id)
                self.hub.leave(self.room.name, member_id, self.outbox)
                self.view.release(self.outbox, [entry.client_id])
            return
        for field in yjs.SERVER_FIELDS:
            state.pop(field, None)
        if self.hub.settings.yjs_anonymous:
            state.pop("user", None)
        self._claim(state)
        if mine:
            limiter = self.updates.get(member_id)
            if limiter is None:
                limiter = self.updates[member_id] = RateLimitedStates(
                    self.hub, self.room.name, member_id
                )
            limiter.submit(state)
        elif len(self.outbox.members) >= MAX_CLIENT_IDS:
            raise RoomError(f"a connection speaks for at most {MAX_CLIENT_IDS} client IDs")
        else:
            # A new client ID, or one that went null or reconnected: bind it here.
            identity = self._identity_of(state.get("user"), entry.client_id)
            self.hub.admit(self.room, self.outbox, member_id, identity, state)
            self.view.bound(self.outbox, entry.client_id)
        self.sent[entry.client_id] = entry.state

    def _claim(self, state: State) -> None:
        """The parts of the identity the room token claims in place of the client's own
        in ``state``'s ``user`` (what Yjs peers see); the rest of it is kept. A ``user``
        that is no object is dropped: peers get the member's identity instead."""
        grant = self.grant
        if grant is None or "user" not in state:
            return
        user = state["user"]
        if not isinstance(user, dict):
            del state["user"]
            return
        user = state["user"] = dict(user)
        if grant.name is not None:
            user["name"] = grant.name
            for key, value in (("display_name", grant.name), ("initials", initials_of(grant.name))):
                if key in user:
                    user[key] = value
        if grant.color is not None:
            colors = Colors.of(grant.color)
            user["color"] = colors.color
            for key, value in (
                ("colorLight", colors.color_light),
                ("color_light", colors.color_light),
                ("text_color", colors.text_color),
            ):
                if key in user:
                    user[key] = value
        if grant.username is not None:
            user["username"] = grant.username

    def _identity_of(self, user: Any, client_id: int) -> Identity | None:
        """The client's own ``user``, if it has a usable one, with the parts the room
        token claims in place; else the token's (claims included) or None (the hub then
        makes an anonymous one)."""
        declared = self._declared(user, client_id)
        if declared is None:
            return self.identity
        if self.grant is None:
            return declared
        return self.grant.identity(lambda: declared) or declared

    def _declared(self, user: Any, client_id: int) -> Identity | None:
        """The identity the client's own ``user`` declares, if it is usable."""
        if not isinstance(user, dict):
            return None
        name = user.get("display_name") or user.get("name")
        if not isinstance(name, str) or not name.strip():
            return None
        name = name.strip()[:100]
        color = user.get("color")
        try:
            parse_hex(color if isinstance(color, str) else "")
        except ValueError:
            # A CSS variable or a colour name: Yjs peers keep it, JSON peers get ours.
            color = pick_color(self.room.colors())
        # Self-declared, so kept apart from the usernames this service hands out.
        username = user.get("username")
        if not isinstance(username, str) or not username:
            username = str(client_id)
        return Identity(f"{DECLARED_PREFIX}{username[:100]}", name, initials_of(name), str(color))

    def _forget(self, member_id: str) -> None:
        self.sent.pop(yjs.client_id_of(member_id), None)
        limiter = self.updates.pop(member_id, None)
        if limiter is not None:
            limiter.cancel()

    def close(self) -> None:
        for member_id in list(self.updates):
            self._forget(member_id)


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
        if view.echoed(outbox, data):
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
