"""The y-websocket wire protocol, awareness part (``/yjs/{room}``).

Messages are ``varUint(type)`` followed by a payload: 0 sync, 1 awareness, 2 auth,
3 query awareness. An awareness update is ``varUint(n)`` then n times ``varUint(clientID)
varUint(clock) varString(JSON state or "null")``.

Encoding uses pycrdt's helpers. Decoding is our own :class:`Reader`: pycrdt's ``Decoder``
trusts its input (a length past the end silently truncates), and this endpoint reads
bytes from anybody.

Clocks: the server re-announces states (idle marks, renewals, a reconnecting client) so
the clocks peers see are the server's, not the clients': each announcement gets
``max(last + 1, now in ms)``. They only grow, also for a client that comes back on
another replica, so a returning client is never ignored as "old".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from pycrdt import YMessageType, YSyncMessageType, create_awareness_message, write_var_uint

from presence.core.events import Batch, Joined, Left, MemberInfo
from presence.core.identity import Identity

if TYPE_CHECKING:
    from presence.core.room import Room
    from presence.server.outbox import Outbox

SYNC = int(YMessageType.SYNC)
AWARENESS = int(YMessageType.AWARENESS)
AUTH = 2
QUERY_AWARENESS = 3
# JSON members get client IDs above Yjs's 32-bit range, derived from their member id,
# so that every replica gives a member the same ID and none collides with a Yjs client.
JSON_CLIENT_BASE = 1 << 32
MAX_CLIENT_ID = (1 << 53) - 1  # what a JavaScript number holds exactly
SERVER_FIELDS = ("presence",)  # set by the server in relayed states; stripped from input


class MalformedMessage(ValueError):
    """Bytes that are not a y-websocket message (truncated, garbage, out of range)."""


class Reader:
    """A bounds-checked reader of lib0 encodings."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def var_uint(self) -> int:
        value = shift = 0
        while True:
            if self.pos >= len(self.data):
                raise MalformedMessage("truncated varint")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise MalformedMessage("varint too long")

    def var_bytes(self) -> bytes:
        length = self.var_uint()
        end = self.pos + length
        if end > len(self.data):
            raise MalformedMessage("length past the end of the message")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


@dataclass(frozen=True, slots=True)
class Entry:
    """One client's line in an awareness update; the state is still raw JSON bytes."""

    client_id: int
    clock: int
    state: bytes  # b"null" for a removal


def read_message(data: bytes) -> tuple[int, Reader]:
    reader = Reader(data)
    return reader.var_uint(), reader


def read_awareness(reader: Reader) -> Iterator[Entry]:
    update = Reader(reader.var_bytes())
    for _ in range(update.var_uint()):
        client_id = update.var_uint()
        clock = update.var_uint()
        state = update.var_bytes()
        if client_id > MAX_CLIENT_ID:
            raise MalformedMessage("client ID out of range")
        yield Entry(client_id, clock, state)
    if not update.done:
        raise MalformedMessage("trailing bytes after the awareness update")


def is_sync_step1(reader: Reader) -> bool:
    return reader.var_uint() == YSyncMessageType.SYNC_STEP1


# The reply to a client's sync step 1: "nothing you lack" (an empty Yjs update). The
# service holds no documents; this marks the provider as synced so it works normally.
EMPTY_SYNC_STEP2 = (
    bytes([YMessageType.SYNC, YSyncMessageType.SYNC_STEP2]) + write_var_uint(2) + b"\x00\x00"
)


def parse_state(raw: bytes) -> dict[str, Any] | None:
    """A state object, or None for a removal; MalformedMessage for anything else."""
    try:
        state = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise MalformedMessage("awareness state is not valid JSON") from None
    if state is not None and not isinstance(state, dict):
        raise MalformedMessage("awareness state must be an object or null")
    return state


def client_id_of(member_id: str) -> int:
    """The Yjs client ID under which a member appears."""
    if member_id.startswith("y"):
        return int(member_id[1:])
    return JSON_CLIENT_BASE + int(member_id, 16) % (MAX_CLIENT_ID - JSON_CLIENT_BASE)


def member_id_of(client_id: int) -> str:
    return f"y{client_id}"


def yjs_user(identity: Identity) -> dict[str, Any]:
    """The ``user`` field JupyterLab and y-codemirror.next read (``colorLight`` there)."""
    user = identity.to_json()
    user["colorLight"] = user["color_light"]
    return user


def yjs_state(member: MemberInfo) -> dict[str, Any]:
    """A member as Yjs peers see it: its state, a ``user`` and the idle mark."""
    state = dict(member.state)
    if not isinstance(state.get("user"), dict):
        state["user"] = yjs_user(member.identity)
    state["presence"] = {"idle": member.idle}
    return state


Line = tuple[int, bytes]  # (clock, encoded entry) of one client in an awareness update


def entry(client_id: int, clock: int, state: bytes) -> bytes:
    """One client's line of an awareness update (its state JSON-encoded, or ``null``)."""
    return write_var_uint(client_id) + write_var_uint(clock) + write_var_uint(len(state)) + state


def awareness_message(entries: list[bytes]) -> bytes:
    return create_awareness_message(write_var_uint(len(entries)) + b"".join(entries))


class YjsView:
    """One room as its Yjs connections on this replica see it: the clocks announced so
    far, and the encoding of batches (once per tick, shared by those connections)."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.clocks: dict[int, int] = {}
        self.last_renewal = 0.0

    def _clock(self, client_id: int) -> int:
        clock = max(self.clocks.get(client_id, 0) + 1, int(time.time() * 1000))
        self.clocks[client_id] = clock
        return clock

    def _member_entry(self, member: MemberInfo, clock: int | None = None) -> Line:
        client_id = client_id_of(member.id)
        clock = self._clock(client_id) if clock is None else clock
        return clock, entry(client_id, clock, orjson.dumps(yjs_state(member)))

    def shared(self, batch: Batch) -> dict[int, Line]:
        """The latest state (or removal) of every member the batch touched."""
        entries: dict[int, Line] = {}
        for event in batch.events():
            member_id = event.member.id if isinstance(event, Joined) else event.id
            if isinstance(event, Left) or member_id not in self.room:
                client_id = client_id_of(member_id)
                clock = self._clock(client_id)
                entries[client_id] = (clock, entry(client_id, clock, b"null"))
                # Forget it, or churn would grow this table: clocks are times, so one
                # handed out later is still newer.
                self.clocks.pop(client_id, None)
            else:
                member = self.room.member(member_id)
                entries[client_id_of(member_id)] = self._member_entry(member)
        return entries

    def _pick(self, shared: dict[int, Line], outbox: Outbox[bytes]) -> list[bytes]:
        """The entries for one connection, noting the clocks it is told (see echoes)."""
        own = {client_id_of(m) for m in outbox.members}
        picked = []
        for client_id, (clock, line) in shared.items():
            if client_id in own:
                # A client's own states are never sent back to it: it would apply the
                # server's clock to itself and send the state back again.
                continue
            outbox.told[client_id] = clock
            picked.append(line)
        return picked

    def frames(self, shared: dict[int, Line], outbox: Outbox[bytes]) -> list[bytes]:
        entries = self._pick(shared, outbox)
        return [awareness_message(entries)] if entries else []

    def snapshot(self, *, renew: bool) -> dict[int, Line]:
        """Every member's entry: with fresh clocks when renewing, else the ones announced."""
        entries = {}
        for member in self.room.snapshot():
            client_id = client_id_of(member.id)
            clock = None if renew else self.clocks.get(client_id)
            entries[client_id] = self._member_entry(member, clock)
        return entries

    def full(self, shared: dict[int, Line], outbox: Outbox[bytes]) -> bytes:
        """A complete awareness update for one connection, even if empty: a lone
        y-websocket client closes a socket that stays silent for 30 s."""
        return awareness_message(self._pick(shared, outbox))
