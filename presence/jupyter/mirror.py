"""Mirror jupyter-collaboration awareness into presence rooms (``PresenceJupyter.url``).

Each collaboration room ``<room id>`` (``json:notebook:<fileId>``,
``JupyterLab:globalAwareness``, …) appears in presence as the room
``<scope>:<room id>``. Every collaboration socket that owns awareness client IDs (see
:mod:`presence.jupyter.awareness`) gets one y-websocket connection of its own to
presence's ``/yjs/<room>``, which speaks for its collaborators there: presence binds
those IDs to that connection and removes them at once when it closes, so closing the
connection when the Jupyter socket closes is the whole "leave".

Only a small summary of each state is sent, never document content (Yjs cursors are
relative positions into the document): see :func:`summary`.

Presence being away, restarting or slow never touches collaboration: every state change
only updates a dict (latest state per client wins) and sets an event; connections,
sends, renewals and reconnects (with backoff) run in background tasks. An outage is
logged once, and so is the recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from presence.codecs import yjs
from presence.jupyter.awareness import Ownership, Room

Log = logging.Logger | logging.LoggerAdapter[Any]

USER_FIELDS = ("username", "name", "display_name", "initials", "color", "avatar_url")
MAX_TEXT = 200  # longest string kept from a state
MAX_IDS = 8  # presence accepts this many client IDs per connection
RENEW_EVERY = 15.0  # presence expires states after 30 s by default, as y-protocols
SEND_TIMEOUT = 10.0  # a send stalled this long: reconnect
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0
ROOM_NAME_MAX = 128
_NOT_ROOM_CHARS = re.compile(r"[^A-Za-z0-9_.:~-]")
# Closes that concern one room (refused, invalid), not an outage of presence.
_REFUSED = {1003, 1007, 1008, 1009, 1013}


def sanitize(text: str) -> str:
    """``text`` in presence's room-name alphabet (other characters become ``_``)."""
    return _NOT_ROOM_CHARS.sub("_", text)


def room_name(scope: str, room_id: str) -> str:
    """``<scope>:<room id>``; over 128 characters, the tail is replaced by a hash."""
    name = sanitize(f"{scope}:{room_id}")
    if len(name) > ROOM_NAME_MAX:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = f"{name[: ROOM_NAME_MAX - 17]}~{digest}"
    return name


def yjs_url(base: str, room: str) -> str:
    """presence's ``/yjs/<room>`` endpoint under ``base`` (http, https, ws or wss)."""
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not an http(s) or ws(s) URL: {base!r}")
    return urlunsplit((scheme, parts.netloc, f"{parts.path.rstrip('/')}/yjs/{room}", "", ""))


def summary(state: dict[str, Any]) -> dict[str, Any]:
    """What presence gets of a Jupyter awareness state, JSON-safe and small.

    - ``user``: the identity fields JupyterLab shows (strings only);
    - ``current``: the document the collaborator has in front (the Lab-wide room);
    - ``cursors``: how many cursors they have in this document, and ``selection``:
      whether one of them selects text (JupyterLab's ``cursors`` list; positions are
      left out: they only mean something inside the server's document).
    """
    out: dict[str, Any] = {}
    user = state.get("user")
    if isinstance(user, dict):
        out["user"] = {
            k: v[:MAX_TEXT] for k in USER_FIELDS if isinstance(v := user.get(k), str) and v
        }
    current = state.get("current")
    if isinstance(current, str):
        out["current"] = current[:MAX_TEXT]
    cursors = state.get("cursors")
    if isinstance(cursors, list):
        out["cursors"] = len(cursors)
        out["selection"] = any(isinstance(c, dict) and c.get("empty") is False for c in cursors)
    return out


class Health:
    """Logs an outage of presence once, and its end once."""

    def __init__(self, url: str, log: Log) -> None:
        self.url = url
        self.log = log
        self.ok = True

    def up(self) -> None:
        if not self.ok:
            self.ok = True
            self.log.info("presence.jupyter: presence at %s is back; mirroring resumed", self.url)

    def down(self, error: BaseException) -> None:
        if self.ok:
            self.ok = False
            self.log.warning(
                "presence.jupyter: presence at %s is unreachable (%s); collaboration is not "
                "affected, the mirror retries",
                self.url,
                str(error) or type(error).__name__,
            )


class Link:
    """One Jupyter socket's collaborators, relayed over one connection to presence."""

    def __init__(self, url: str, health: Health, log: Log, renew_every: float) -> None:
        self.url = url
        self.health = health
        self.log = log
        self.renew_every = renew_every
        # Fresh presence client IDs per link: a client ID moving to another Jupyter socket
        # never meets its old binding in presence (no ordering between two connections).
        self.ids: dict[int, int] = {}  # Jupyter client ID -> presence client ID
        self.states: dict[int, dict[str, Any]] = {}  # presence client ID -> summary
        self.pending: set[int] = set()  # presence client IDs to send (absent: a null)
        self.clock = 0
        self.wake = asyncio.Event()
        self.closing = False
        self.connected = False
        self.refused = False
        self.task = asyncio.get_running_loop().create_task(self._run())

    def set(self, client_id: int, state: dict[str, Any]) -> None:
        pid = self.ids.get(client_id)
        if pid is None:
            if len(self.ids) >= MAX_IDS:
                return
            pid = self.ids[client_id] = random.randrange(1, 1 << 32)
        # Seconds are enough for presence's idle mark, and bound the rate to 1/s per ID.
        state = {**state, "active_at": int(time.time())}
        if self.states.get(pid) != state:
            self.states[pid] = state
            self.pending.add(pid)
            self.wake.set()

    def drop(self, client_id: int) -> None:
        pid = self.ids.pop(client_id, None)
        if pid is not None:
            self.states.pop(pid, None)
            self.pending.add(pid)
            self.wake.set()

    def close(self) -> None:
        """Leave presence: a clean close when connected, else stop trying."""
        self.closing = True
        self.wake.set()
        if not self.connected:
            self.task.cancel()

    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while not self.closing:
            try:
                async with connect(
                    self.url, open_timeout=5, close_timeout=2, max_size=1 << 20, max_queue=16
                ) as ws:
                    self.connected = True
                    try:
                        self.health.up()
                        delay = BACKOFF_MIN
                        await self._serve(ws)
                    finally:
                        self.connected = False
            except asyncio.CancelledError:
                raise
            except ConnectionClosed as exc:
                if self.closing:
                    return
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code in _REFUSED:
                    if not self.refused:
                        self.refused = True
                        self.log.warning("presence.jupyter: presence refused %s: %s", self.url, exc)
                else:
                    self.health.down(exc)
            except Exception as exc:  # OSError, handshake errors, timeouts
                if self.closing:
                    return
                self.health.down(exc)
            if self.closing:
                return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _serve(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._discard(ws))
        reader.add_done_callback(lambda _: self.wake.set())
        try:
            self.pending = set(self.states)  # a new connection knows nothing
            renew_at = loop.time() + self.renew_every
            while not self.closing:
                if reader.done():
                    await reader  # raises ConnectionClosed
                    raise ConnectionClosed(ws.protocol.close_rcvd, ws.protocol.close_sent)
                if loop.time() >= renew_at:
                    self.pending.update(self.states)  # unchanged: presence renews them
                    renew_at = loop.time() + self.renew_every
                self.wake.clear()
                if self.pending:
                    await asyncio.wait_for(ws.send(self._message()), SEND_TIMEOUT)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), max(0.0, renew_at - loop.time()))
        finally:
            reader.cancel()

    async def _discard(self, ws: ClientConnection) -> None:
        # presence sends the room's other members: read them, or it sees a slow client.
        async for _ in ws:
            pass

    def _message(self) -> bytes:
        entries = []
        for pid in sorted(self.pending):
            self.clock += 1
            state = self.states.get(pid)
            raw = b"null" if state is None else orjson.dumps(state)
            entries.append(yjs.entry(pid, self.clock, raw))
        self.pending.clear()
        return yjs.awareness_message(entries)


class Mirror:
    """Listens to the ownership hook: a link per socket, fed by the rooms' awareness."""

    def __init__(
        self,
        url: str,
        scope: Callable[[], str],
        hook: Ownership,
        log: Log,
        renew_every: float = RENEW_EVERY,
    ) -> None:
        self.url = url
        self.renew_every = renew_every
        self._scope = scope
        self.scope: str | None = None
        self.hook = hook
        self.log = log
        self.health = Health(url, log)
        self.links: dict[Any, Link] = {}  # Jupyter socket -> its link

    def room_seen(self, room: Room, room_id: str) -> None:
        if self.scope is None:  # the port is known once the server listens
            self.scope = sanitize(self._scope())
            self.log.info("presence.jupyter: mirrored into presence rooms %s:<room id>", self.scope)
        url = yjs_url(self.url, room_name(self.scope, room_id))
        holders: dict[int, Link] = {}  # Jupyter client ID -> the link relaying it

        def changed(topic: str, event: tuple[dict[str, Any], Any]) -> None:
            if topic != "change":
                return
            try:
                self._changed(room, url, holders, event[0])
            except Exception:
                self.hook.failed("the mirror")

        room.awareness.observe(changed)

    def _changed(self, room: Room, url: str, holders: dict[int, Link], change: Any) -> None:
        states = room.awareness.states
        for cid in [*change["added"], *change["updated"]]:
            owner = self.hook.owner(room, cid)
            if owner is None or not self.hook.is_open(owner) or cid not in states:
                continue
            link = self.links.get(owner)
            if link is None:
                link = self.links[owner] = Link(url, self.health, self.log, self.renew_every)
            held = holders.get(cid)
            if held is not None and held is not link:
                held.drop(cid)  # the client moved to another socket
            holders[cid] = link
            link.set(cid, summary(states[cid]))
        for cid in change["removed"]:
            held = holders.pop(cid, None)
            if held is not None:
                held.drop(cid)

    def socket_closed(self, socket: Any) -> None:
        link = self.links.pop(socket, None)
        if link is not None:
            link.close()
