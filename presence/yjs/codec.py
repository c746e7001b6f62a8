"""The y-websocket wire protocol, awareness part (``/yjs/{room}``).

Messages are ``varUint(type)`` followed by a payload: 0 sync, 1 awareness, 2 auth,
3 query awareness. An awareness update is ``varUint(n)`` then n times ``varUint(clientID)
varUint(clock) varString(JSON state or "null")``.

Encoding uses pycrdt's helpers. Decoding is our own :class:`Reader`: pycrdt's ``Decoder``
trusts its input (a length past the end silently truncates), and this endpoint reads
bytes from anybody.

A pure codec: bytes and states in and out, no clock and no connection (the room's Yjs
view, with its clocks, is ``presence.yjs.view``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
from pycrdt import YMessageType, YSyncMessageType, create_awareness_message, write_var_uint

from presence.core.events import MemberInfo
from presence.core.identity import Identity

SYNC = int(YMessageType.SYNC)
AWARENESS = int(YMessageType.AWARENESS)
AUTH = 2
QUERY_AWARENESS = 3
# JSON members get client IDs above the 32-bit range of Yjs clients, derived from their
# member id, so that every replica gives a member the same ID. Yjs sockets may only use
# 32-bit client IDs (presence.yjs.endpoint): yrs clients (pycrdt) draw from 53 bits by
# default, and must be given 32-bit ones (``Doc(client_id=...)``), as Yjs makes them.
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


@lru_cache(maxsize=4096)  # every state sent to a Yjs peer carries it: built once
def yjs_user(identity: Identity) -> dict[str, Any]:
    """The ``user`` field JupyterLab and y-codemirror.next read (``colorLight`` there);
    shared between calls, so read-only."""
    user = identity.to_json()
    user["colorLight"] = user["color_light"]
    return user


def yjs_state(member: MemberInfo) -> dict[str, Any]:
    """A member as Yjs peers see it: its state as its owner set it (``null`` fields
    included), a ``user`` if it has none, and the idle mark."""
    state = dict(member.state)
    if "user" not in state:
        state["user"] = yjs_user(member.identity)
    state["presence"] = {"idle": member.idle}
    return state


Line = tuple[int, bytes]  # (clock, encoded entry) of one client in an awareness update


def entry(client_id: int, clock: int, state: bytes) -> bytes:
    """One client's line of an awareness update (its state JSON-encoded, or ``null``)."""
    return write_var_uint(client_id) + write_var_uint(clock) + write_var_uint(len(state)) + state


def awareness_message(entries: list[bytes]) -> bytes:
    return create_awareness_message(write_var_uint(len(entries)) + b"".join(entries))
