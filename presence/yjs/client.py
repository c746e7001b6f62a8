"""What one y-websocket socket controls: its Yjs client IDs, bound to it as members of the
room (another socket can neither change nor remove them), their last clocks and states,
their rate limits, and the identity their states show."""

from __future__ import annotations

from typing import Any

from presence.core.access import Grant
from presence.core.colors import Colors, parse_hex, pick_color
from presence.core.events import State
from presence.core.identity import DECLARED_PREFIX, Identity, initials_of
from presence.core.room import Room, RoomError
from presence.hub.hub import Hub
from presence.hub.outbox import Outbox
from presence.hub.updates import RateLimitedUpdates
from presence.yjs import codec as yjs
from presence.yjs.view import YjsView

# A y-websocket client speaks for one client ID (a few with several documents); more from
# one socket is somebody filling the room.
MAX_CLIENT_IDS = 8


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
