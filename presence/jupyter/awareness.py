"""No ghost cursors in jupyter-collaboration: a socket's awareness states leave with it.

pycrdt-websocket's ``YRoom.serve`` drops a collaboration socket when it closes but keeps
the awareness states it sent, and browsers send no "I left" message: a closed tab stays on
everyone's screen until y-protocols' 30 s timeout. This hook, installed on
jupyter-server-ydoc's ``YDocWebSocketHandler`` (which is itself the channel ``YRoom``
reads), removes the states a socket *owns* as soon as it closes, and sends the removal to
the room's other sockets.

Ownership: a socket owns a client ID when it advanced that ID's clock (sent a clock newer
than the room's, as ``Awareness.apply_awareness_update`` requires), checked when
``__anext__`` hands the message to ``YRoom.serve``, just before the room applies it.
Browsers send every state they receive back to the server with an unchanged clock: those
echoes never make a socket an owner, so closing a tab never removes anybody else.

This reaches into private internals; :func:`problems` checks their shape before anything
is patched (tests/test_jupyter_contract.py checks it in detail).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import itertools
import logging
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from pycrdt import Awareness, Doc, write_var_uint

from presence.yjs import codec as yjs

SUPPORTED = "jupyter-collaboration 5.0 (jupyter-server-ydoc 3.0) with pycrdt-websocket 0.16"
HANDLER_MODULE = "jupyter_server_ydoc.handlers"
HANDLER_CLASS = "YDocWebSocketHandler"
# Removals are applied with this origin, not "local": for "local", YRoom broadcasts to
# room.clients, which still holds the closing socket during on_close (write errors). We
# send the removal to the other sockets ourselves.
ORIGIN = "presence.jupyter"
# Client IDs removed at close are remembered (per room, the latest ones) to recognise a
# client that comes back on a new socket with its old clock: see Ownership.received.
REMEMBERED_REMOVALS = 1024
_MARK = "__presence_hook__"
# What ``received`` returns for a message with nothing to apply or relay: the socket's
# next message is read instead (an empty update would still be relayed to everyone).
NOTHING = b""


class Room(Protocol):
    """What we use of a pycrdt-websocket ``YRoom``."""

    clients: set[Any]
    awareness: Awareness


class StateGuard(Protocol):
    """Who speaks for whom: states a socket sends for its own clients, and ownership."""

    def rewrite(self, socket: Any, state: bytes) -> bytes | None:
        """The state to apply instead (``state`` itself if right), None to drop it."""

    def person(self, socket: Any) -> str | None:
        """Whose ``socket`` is (None: unknown). A client ID moves only between one
        person's sockets: a reconnect, before or after the old socket is seen closed."""


class Listener(Protocol):
    """Told about rooms and sockets (the mirror listens)."""

    def room_seen(self, room: Room, room_id: str) -> None: ...

    def socket_closed(self, socket: Any) -> None: ...


@dataclass(eq=False)
class _Socket:
    joined: int  # sequence number of its first read (see Ownership._seq)
    owned: set[int] = field(default_factory=set)
    open: bool = True


@dataclass(eq=False)
class _Room:
    owners: dict[int, Any] = field(default_factory=dict)  # client ID -> owning socket
    # client ID -> (clock, sequence number, whose) of our removal; no reference to the room
    removed: OrderedDict[int, tuple[int, int, str | None]] = field(default_factory=OrderedDict)


def _is_null(state: bytes) -> bool:
    return state in (b"", b"null")


class Ownership:
    """Which socket owns which client ID, per room; removes a socket's IDs when it closes.

    Sockets are jupyter-server-ydoc handlers; rooms are pycrdt-websocket YRooms. Both are
    held weakly: a room that jupyter-collaboration deletes takes its records along.
    """

    def __init__(self, log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        self.log = log
        self.listeners: list[Listener] = []
        # On a hub (presence.jupyter.singleuser): what a socket may say. Set, only what
        # the room applies is relayed, with the states rewritten by it.
        self.guard: StateGuard | None = None
        self._sockets: weakref.WeakKeyDictionary[Any, _Socket] = weakref.WeakKeyDictionary()
        self._rooms: weakref.WeakKeyDictionary[Any, _Room] = weakref.WeakKeyDictionary()
        # Orders removals and sockets' first reads: a socket that started reading after a
        # removal cannot have been sent the removed state.
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._failed = False

    # -- queries (for listeners) --------------------------------------------------------

    def owner(self, room: Room, client_id: int) -> Any | None:
        record = self._rooms.get(room)
        return None if record is None else record.owners.get(client_id)

    def is_open(self, socket: Any) -> bool:
        record = self._sockets.get(socket)
        return record is not None and record.open

    # -- hook points ----------------------------------------------------------------------

    def reading(self, socket: Any) -> None:
        """Before each ``__anext__``: note when the socket started reading."""
        if socket not in self._sockets:
            self._sockets[socket] = _Socket(next(self._seq))

    def received(self, socket: Any, message: bytes) -> bytes:
        """A message ``YRoom.serve`` is about to apply: note the IDs the socket owns.

        Returns the message to apply: the same one, or one that ``guard`` changed (see
        there), or, when a client that was removed at
        close comes back on a new socket with its unchanged clock (y-websocket re-sends
        its current clock on reconnect), one with that clock plus one. Peers that saw the
        removal would ignore the old clock until the client's next change or renewal.
        """
        if not message or message[0] != yjs.AWARENESS:
            return message
        room = getattr(socket, "room", None)
        if room is None:
            return message
        try:
            entries = list(yjs.read_awareness(yjs.read_message(message)[1]))
        except yjs.MalformedMessage:
            # The room deals with it; under a guard it gets nothing: pycrdt reads more
            # than we do (trailing bytes, larger client IDs), unchecked.
            return message if self.guard is None else NOTHING
        record = self._rooms.get(room)
        if record is None:
            record = self._rooms[room] = _Room()
            for listener in self.listeners:
                listener.room_seen(room, str(socket.path))
        mine = self._sockets.get(socket)
        if mine is None:
            mine = self._sockets[socket] = _Socket(next(self._seq))
        awareness: Awareness = room.awareness
        meta, states = awareness.meta, awareness.states
        guard = self.guard
        kept: list[yjs.Entry] = []
        changed = False
        for entry in entries:
            cid = entry.client_id
            known = meta.get(cid)
            clock = 0 if known is None else int(known["clock"])
            live = not _is_null(entry.state)
            if cid == awareness.client_id:
                # The server's own state: nobody owns it, and under a guard nobody may
                # speak for it (its renewals would carry what they said to everyone).
                changed |= guard is not None
                if guard is None:
                    kept.append(entry)
                continue
            removed = record.removed.get(cid)
            if entry.clock > clock:
                if guard is not None:
                    owner = record.owners.get(cid)
                    whose = guard.person(socket)
                    if (
                        owner is not None
                        and owner is not socket
                        and self.is_open(owner)
                        and guard.person(owner) != whose
                    ) or (removed is not None and removed[2] != whose):
                        changed = True  # another person's client: not theirs to change
                        continue
                    if live:
                        state = guard.rewrite(socket, entry.state)
                        if state is None:
                            changed = True
                            continue
                        if state is not entry.state:
                            entry = yjs.Entry(cid, entry.clock, state)
                            changed = True
                self._own(record, socket, mine, cid, live)
                kept.append(entry)
                continue
            if (
                removed is not None
                and removed[0] == entry.clock == clock
                and removed[1] < mine.joined
                and cid not in states
                and live
                and (guard is None or removed[2] == guard.person(socket))
            ):
                back = entry.state if guard is None else guard.rewrite(socket, entry.state)
                changed = True
                if back is not None:
                    kept.append(yjs.Entry(cid, clock + 1, back))
                    self._own(record, socket, mine, cid, True)
                continue
            if guard is not None:
                # What the room does not apply, it still relays: a peer that does not
                # know the client's clock would take a stale state back, or a null
                # meant to remove someone else. Relay only a null of one's own client.
                if entry.clock == clock and not live and record.owners.get(cid) is socket:
                    self._own(record, socket, mine, cid, False)
                else:
                    changed = True
                    continue
            kept.append(entry)
        if not changed:
            return message
        if not kept:
            return NOTHING
        return yjs.awareness_message([yjs.entry(e.client_id, e.clock, e.state) for e in kept])

    def _own(self, record: _Room, socket: Any, mine: _Socket, cid: int, live: bool) -> None:
        record.removed.pop(cid, None)
        previous = record.owners.get(cid)
        if previous is not None and previous is not socket:
            prev = self._sockets.get(previous)
            if prev is not None:
                prev.owned.discard(cid)
        if live:
            record.owners[cid] = socket
            mine.owned.add(cid)
        else:  # the client set itself to null: nothing left to remove at close
            record.owners.pop(cid, None)
            mine.owned.discard(cid)

    def closed(self, socket: Any) -> None:
        """``on_close``: remove the socket's states at once, tell the listeners."""
        mine = self._sockets.get(socket)
        if mine is None or not mine.open:
            return
        mine.open = False
        self._release(socket)
        for listener in self.listeners:
            listener.socket_closed(socket)

    def drained(self, socket: Any) -> None:
        """The room has applied everything the socket sent: messages still queued at
        ``on_close`` may have brought states back; remove them too."""
        self._release(socket)

    def failed(self, where: str) -> None:
        """A bug of ours must not break collaboration: log it once, carry on."""
        if not self._failed:
            self._failed = True
            self.log.exception("presence.jupyter: the awareness hook failed in %s", where)

    # -- removal ------------------------------------------------------------------------

    def _release(self, socket: Any) -> None:
        mine = self._sockets.get(socket)
        room = getattr(socket, "room", None)  # jupyter-collaboration deletes it later
        if mine is None or room is None or not mine.owned:
            return
        record = self._rooms.get(room)
        owned, mine.owned = mine.owned, set()
        if record is None:
            return
        ids = sorted(cid for cid in owned if record.owners.get(cid) is socket)
        for cid in ids:
            del record.owners[cid]
        awareness: Awareness = room.awareness
        gone = [cid for cid in ids if cid in awareness.states]
        if not gone:
            return
        # The clock stays: y-protocols peers drop a state on a null with the same clock.
        awareness.remove_awareness_states(gone, ORIGIN)
        seq = next(self._seq)
        whose = None if self.guard is None else self.guard.person(socket)
        nulls = []
        for cid in gone:
            clock = int(awareness.meta[cid]["clock"])
            record.removed[cid] = (clock, seq, whose)
            record.removed.move_to_end(cid)
            nulls.append(yjs.entry(cid, clock, b"null"))
        while len(record.removed) > REMEMBERED_REMOVALS:
            record.removed.popitem(last=False)
        message = yjs.awareness_message(nulls)
        others = [client for client in room.clients if client is not socket]
        self._spawn(_send_all(others, message, self.log))
        self.log.debug(
            "presence.jupyter: removed awareness %s of a closed socket in %s", gone, socket.path
        )

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._tasks.discard)


async def _send_all(
    clients: list[Any], message: bytes, log: logging.Logger | logging.LoggerAdapter[Any]
) -> None:
    for client in clients:
        try:
            await client.send(message)
        except Exception as exc:  # one broken socket must not keep the others uninformed
            log.debug("presence.jupyter: could not send a removal: %s", exc)


# -- checks and installation ------------------------------------------------------------


def handler_class() -> type[Any] | None:
    try:
        module = importlib.import_module(HANDLER_MODULE)
    except ImportError:
        return None
    cls = getattr(module, HANDLER_CLASS, None)
    return cls if isinstance(cls, type) else None


def _params(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def problems() -> list[str]:
    """What is missing or changed in the internals the hook relies on ([] when fine)."""
    found: list[str] = []
    cls = handler_class()
    if cls is None:
        return [f"{HANDLER_MODULE}.{HANDLER_CLASS} cannot be imported"]
    anext_ = getattr(cls, "__anext__", None)
    if anext_ is None or not inspect.iscoroutinefunction(anext_) or _params(anext_) != ["self"]:
        found.append(f"{HANDLER_CLASS}.__anext__ is not `async def __anext__(self)`")
    on_close = getattr(cls, "on_close", None)
    if on_close is None or inspect.iscoroutinefunction(on_close) or _params(on_close) != ["self"]:
        found.append(f"{HANDLER_CLASS}.on_close is not `def on_close(self)`")
    send = getattr(cls, "send", None)
    if send is None or not inspect.iscoroutinefunction(send) or len(_params(send)) != 2:
        found.append(f"{HANDLER_CLASS}.send is not `async def send(self, message)`")
    if not isinstance(getattr(cls, "path", None), property):
        found.append(f"{HANDLER_CLASS}.path (the room id) is not a property")
    try:
        from pycrdt.websocket import YRoom
    except ImportError:
        return [*found, "pycrdt.websocket.YRoom cannot be imported"]
    if "clients" not in getattr(YRoom, "__annotations__", {}):
        found.append("YRoom.clients is not declared")
    found.extend(awareness_problems())
    return found


def awareness_problems() -> list[str]:
    """pycrdt's Awareness: the clock rules and methods the hook relies on, tried out."""
    found: list[str] = []
    for name, params in {
        "apply_awareness_update": ["update", "origin"],
        "remove_awareness_states": ["client_ids", "origin"],
        "observe": ["callback"],
    }.items():
        method = getattr(Awareness, name, None)
        if method is None or _params(method)[1:] != params:
            found.append(f"Awareness.{name}({', '.join(params)}) is missing or changed")
    if found:
        return found
    try:
        server = Awareness(Doc())
        cid, state = 1_000_001, b'{"user":{"name":"x"}}'

        def update(clock: int, raw: bytes) -> bytes:
            return write_var_uint(1) + yjs.entry(cid, clock, raw)

        server.apply_awareness_update(update(3, state), "test")
        if server.meta.get(cid, {}).get("clock") != 3 or cid not in server.states:
            found.append("Awareness.apply_awareness_update does not record states and clocks")
        server.apply_awareness_update(update(3, b'{"echo":1}'), "test")
        if server.states.get(cid) != {"user": {"name": "x"}}:
            found.append("Awareness accepts a state with an unchanged clock")
        server.remove_awareness_states([cid], ORIGIN)
        if cid in server.states or server.meta.get(cid, {}).get("clock") != 3:
            found.append("Awareness.remove_awareness_states changes the clock or keeps the state")
    except Exception as exc:  # any surprise is a changed shape
        found.append(f"Awareness behaves differently: {exc!r}")
    return found


def install(log: logging.Logger | logging.LoggerAdapter[Any]) -> Ownership | None:
    """Patch ``YDocWebSocketHandler``; None (and one error logged) if its internals
    changed, in which case collaboration works as without this hook."""
    found = problems()
    if found:
        log.error(
            "presence.jupyter: ghost cursors are NOT removed on close: the installed "
            "jupyter-collaboration internals changed (%s); supported: %s",
            "; ".join(found),
            SUPPORTED,
        )
        return None
    cls = handler_class()
    assert cls is not None
    existing = getattr(cls, _MARK, None)
    if isinstance(existing, Ownership):
        return existing  # loaded twice: one hook
    hook = Ownership(log)
    original_anext: Callable[[Any], Awaitable[bytes]] = cls.__anext__
    original_on_close: Callable[[Any], None] = cls.on_close

    async def __anext__(self: Any) -> bytes:
        while True:
            try:
                hook.reading(self)
            except Exception:
                hook.failed("__anext__")
            try:
                message = await original_anext(self)
            except StopAsyncIteration:
                try:
                    hook.drained(self)
                except Exception:
                    hook.failed("__anext__")
                raise
            try:
                received = hook.received(self, message)
            except Exception:
                hook.failed("__anext__")
                # Without a guard collaboration goes on as if we were not there; with
                # one, an awareness message we could not judge is not applied.
                guarded = hook.guard is not None and message[:1] == bytes([yjs.AWARENESS])
                received = NOTHING if guarded else message
            if received is not NOTHING:
                return received

    def on_close(self: Any) -> None:
        try:
            original_on_close(self)
        finally:
            try:
                hook.closed(self)
            except Exception:
                hook.failed("on_close")

    __anext__.__wrapped__ = original_anext  # type: ignore[attr-defined]
    on_close.__wrapped__ = original_on_close  # type: ignore[attr-defined]
    cls.__anext__ = __anext__
    cls.on_close = on_close
    setattr(cls, _MARK, hook)
    return hook


def uninstall() -> None:
    """Undo :func:`install` (for tests)."""
    cls = handler_class()
    if cls is None or getattr(cls, _MARK, None) is None:
        return
    cls.__anext__ = cls.__anext__.__wrapped__
    cls.on_close = cls.on_close.__wrapped__
    delattr(cls, _MARK)
