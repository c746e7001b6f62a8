"""The private internals presence.jupyter.awareness hooks, checked for shape and
behaviour: when one of these fails after an upgrade of jupyter-collaboration,
jupyter-server-ydoc, pycrdt-websocket or pycrdt, the hook needs reviewing (and the pins
of the ``jupyter`` extra moving) before it can be trusted again.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

import pytest
from pycrdt import Awareness, Doc, create_awareness_message, write_var_uint
from pycrdt.websocket import YRoom

from presence.jupyter import awareness
from presence.yjs import codec as yjs

pytestmark = pytest.mark.unit

UPGRADE = f"presence.jupyter.awareness was written for {awareness.SUPPORTED}"


def handler() -> type[Any]:
    cls = awareness.handler_class()
    assert cls is not None, f"jupyter_server_ydoc.handlers.YDocWebSocketHandler is gone; {UPGRADE}"
    return cls


def update(client_id: int, clock: int, state: bytes) -> bytes:
    """An awareness update (the payload of an awareness message)."""
    return write_var_uint(1) + yjs.entry(client_id, clock, state)


def test_the_hook_finds_everything_it_needs() -> None:
    assert awareness.problems() == [], UPGRADE


async def test_the_handler_is_the_channel_its_queue_feeds_anext() -> None:
    cls = handler()
    assert inspect.iscoroutinefunction(cls.__anext__), f"__anext__ is not async; {UPGRADE}"
    # initialize() needs a whole Tornado application; __anext__ only needs the queue.
    socket = object.__new__(cls)
    socket._message_queue = asyncio.Queue()
    socket._message_queue.put_nowait(b"\x01abc")
    socket._message_queue.put_nowait(b"")
    assert await socket.__anext__() == b"\x01abc", f"__anext__ no longer reads the queue; {UPGRADE}"
    with pytest.raises(StopAsyncIteration):
        await socket.__anext__()  # b"" ends the iteration: the hook's "drained"
    socket._room_id = "json:notebook:x"
    assert socket.path == "json:notebook:x", f"path is no longer the room id; {UPGRADE}"


def test_on_close_ends_the_iteration_and_leaves_awareness_alone() -> None:
    source = inspect.getsource(handler().on_close)
    assert '_message_queue.put_nowait(b"")' in source, f"on_close changed; {UPGRADE}"
    assert ".awareness" not in source, f"on_close now touches awareness itself; {UPGRADE}"
    assert not inspect.iscoroutinefunction(handler().on_close)


def test_the_handler_keeps_its_room_in_room_and_sends_with_send() -> None:
    cls = handler()
    assert "self.room" in inspect.getsource(cls.prepare), f"prepare sets no room; {UPGRADE}"
    assert "self.room" in inspect.getsource(cls.initialize), f"no room attribute; {UPGRADE}"
    assert inspect.iscoroutinefunction(cls.send), f"send is not async; {UPGRADE}"
    assert list(inspect.signature(cls.send).parameters) == ["self", "message"], UPGRADE


class Channel:
    """The smallest channel YRoom.serve accepts; notes the room's awareness clock of one
    client ID each time the room asks for the next message."""

    path = "contract"

    def __init__(self, room: YRoom, client_id: int) -> None:
        self.room = room
        self.client_id = client_id
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.sent: list[bytes] = []
        self.clocks_seen: list[int | None] = []

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> bytes:
        meta = self.room.awareness.meta.get(self.client_id)
        self.clocks_seen.append(None if meta is None else meta["clock"])
        message = await self.inbox.get()
        if not message:
            raise StopAsyncIteration
        return message

    async def send(self, message: bytes) -> None:
        self.sent.append(message)

    async def recv(self) -> bytes:
        return await self.inbox.get()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_yroom_applies_awareness_between_two_reads_and_forgets_closed_channels() -> None:
    async with YRoom() as room:
        assert isinstance(room.clients, set), f"YRoom.clients is not a set; {UPGRADE}"
        assert isinstance(room.awareness, Awareness), f"YRoom.awareness changed; {UPGRADE}"
        channel, other = Channel(room, 42), Channel(room, 42)
        serving = [asyncio.create_task(room.serve(c)) for c in (channel, other)]
        await settle()
        assert room.clients == {channel, other}
        channel.inbox.put_nowait(create_awareness_message(update(42, 5, b'{"a":1}')))
        await settle()
        # Not applied when __anext__ returned it (the hook judges ownership then), applied
        # before the next read.
        assert channel.clocks_seen == [None, 5], f"YRoom.serve applies elsewhere; {UPGRADE}"
        assert room.awareness.states[42] == {"a": 1}
        # A removal with an origin other than "local" is not broadcast by the room (the
        # hook sends it itself, to the other sockets only).
        sent = len(other.sent)
        room.awareness.remove_awareness_states([42], awareness.ORIGIN)
        await settle()
        assert len(other.sent) == sent, f"YRoom broadcasts non-local removals now; {UPGRADE}"
        channel.inbox.put_nowait(b"")
        await asyncio.wait_for(serving[0], 2)
        assert room.clients == {other}
        other.inbox.put_nowait(b"")
        await asyncio.wait_for(serving[1], 2)


def test_awareness_clock_rules() -> None:
    assert awareness.awareness_problems() == [], UPGRADE
    server = Awareness(Doc())
    server.apply_awareness_update(update(7, 2, b'{"x":1}'), "test")
    server.apply_awareness_update(update(7, 2, b'{"x":2}'), "test")
    assert server.states[7] == {"x": 1}, "an echo (same clock) must not be applied"
    server.apply_awareness_update(update(7, 3, b'{"x":3}'), "test")
    assert server.states[7] == {"x": 3} and server.meta[7]["clock"] == 3
    changes: list[tuple[str, Any]] = []
    server.observe(lambda topic, event: changes.append((topic, event)))
    server.remove_awareness_states([7], awareness.ORIGIN)
    assert 7 not in server.states and server.meta[7]["clock"] == 3
    assert ("change", ({"added": [], "updated": [], "removed": [7]}, awareness.ORIGIN)) in changes
    # Once removed, the same clock no longer brings it back (why a returning client's
    # clock is bumped) ...
    server.apply_awareness_update(update(7, 3, b'{"x":3}'), "test")
    assert 7 not in server.states
    # ... and a null with the same clock removes it from peers.
    peer = Awareness(Doc())
    peer.apply_awareness_update(update(7, 3, b'{"x":3}'), "test")
    peer.apply_awareness_update(server.encode_awareness_update([7]), "test")
    assert 7 not in peer.states


def test_changed_internals_are_logged_once_and_nothing_is_patched(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cls = handler()
    before = (cls.__anext__, cls.on_close)
    monkeypatch.setattr(awareness, "problems", lambda: ["YRoom.clients is not declared"])
    log = logging.getLogger("contract")
    with caplog.at_level(logging.ERROR, "contract"):
        assert awareness.install(log) is None
    assert (cls.__anext__, cls.on_close) == before
    [record] = caplog.records
    assert "YRoom.clients is not declared" in record.getMessage()
    assert awareness.SUPPORTED in record.getMessage()


def test_install_wraps_once_and_uninstall_restores() -> None:
    cls = handler()
    before = (cls.__anext__, cls.on_close)
    log = logging.getLogger("contract")
    try:
        hook = awareness.install(log)
        assert hook is not None and awareness.install(log) is hook
        assert cls.__anext__.__wrapped__ is before[0] and cls.on_close.__wrapped__ is before[1]
    finally:
        awareness.uninstall()
    assert (cls.__anext__, cls.on_close) == before
