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
logged once, and so is the recovery. A refusal (presence does not accept the mirror's
credentials for the room: close 4401, 4403 or 1008, or HTTP 401/403 to the handshake)
is no outage: it is logged once for the whole mirror, retried slowly (seconds to
minutes), and its end is logged once.

On JupyterHub, with presence as a hub service, the rooms are ``<user>/<server>:<room
id>`` (:func:`hub_scope`) and the mirror sends the server's own API token
(``headers``), which the hub gives the scope ``custom:presence:mirror!server=...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from presence.jupyter.awareness import Ownership, Room
from presence.yjs import codec as yjs

Log = logging.Logger | logging.LoggerAdapter[Any]

USER_FIELDS = ("username", "name", "display_name", "initials", "color", "avatar_url")
MAX_TEXT = 200  # longest string kept from a state
MAX_IDS = 8  # presence accepts this many client IDs per connection
RENEW_EVERY = 15.0  # presence expires states after 30 s by default, as y-protocols
SEND_TIMEOUT = 10.0  # a send stalled this long: reconnect
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0  # presence unreachable: seconds between attempts
REFUSED_MIN, REFUSED_MAX = 5.0, 300.0  # presence refuses the mirror: the same, slower
ROOM_NAME_MAX = 128
_NOT_ROOM_CHARS = re.compile(r"[^A-Za-z0-9_.:~-]")
# Scopes may also hold what presence's room names allow besides (a hub user's "@", "+",
# and the "/" between a hub user and their server), never a "/" first, last or doubled.
_NOT_SCOPE_CHARS = re.compile(r"[^A-Za-z0-9_.:~@+/-]")
_STRAY_SLASH = re.compile(r"(?<![^/])/|/(?![^/])")
_NOT_HUB_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.~@+-]")
# Closes that refuse the mirror itself (its credentials or its room name): no outage,
# retried slowly and logged once for the whole mirror. 1008 is also presence's answer to
# an invalid room name or identity token.
_REFUSAL_CODES = {1008, 4401, 4403}
_REFUSAL_STATUSES = {401, 403}  # the same, as the answer to the handshake
# Closes that concern one room or message (unsupported, invalid, too big, try later):
# no outage either, retried as one.
_REJECTED = {1003, 1007, 1009, 1013}


def sanitize(text: str) -> str:
    """``text`` in presence's room-name alphabet (other characters become ``_``)."""
    return _NOT_ROOM_CHARS.sub("_", text)


def hub_scope(user: str, server: str = "") -> str:
    """The scope of a hub server's rooms in presence as a hub service: ``<user>/<server>``,
    ``alice/`` for alice's default server and ``alice/gpu`` for her server ``gpu``, whose
    rooms are ``alice/:<room id>`` and ``alice/gpu:<room id>``. Characters presence's room
    names cannot hold become ``_``: presence refuses those rooms to the mirror, whose token
    mirrors the server under its exact name (such a server has no rooms there)."""
    return f"{_NOT_HUB_NAME_CHARS.sub('_', user)}/{_NOT_HUB_NAME_CHARS.sub('_', server)}"


def _scope_name(scope: str) -> str:
    """``scope`` as it begins room names (a "/" may end it: a colon follows)."""
    return _STRAY_SLASH.sub("_", _NOT_SCOPE_CHARS.sub("_", scope) + ":")[:-1]


def room_name(scope: str, room_id: str) -> str:
    """``<scope>:<room id>``; over 128 characters, the tail is replaced by a hash.

    The room id keeps ``A-Z a-z 0-9 - _ . : ~`` (other characters become ``_``); the scope
    also keeps ``@``, ``+`` and a ``/`` between two other characters (a :func:`hub_scope`),
    and stays whole when it is shorter than 111 characters: only the room id is cut."""
    name = f"{_scope_name(scope)}:{sanitize(room_id)}"
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
        out["user"] = {k: v for k in USER_FIELDS if (v := _text(user.get(k)))}
    current = _text(state.get("current"))
    if current:
        out["current"] = current
    cursors = state.get("cursors")
    if isinstance(cursors, list):
        out["cursors"] = len(cursors)
        out["selection"] = any(isinstance(c, dict) and c.get("empty") is False for c in cursors)
    return out


def _text(value: Any) -> str | None:
    """A string to relay, cut to MAX_TEXT; None for others and for what UTF-8 cannot
    carry (a lone surrogate, which JSON from a browser may hold)."""
    if not isinstance(value, str) or not value:
        return None
    text: str = value[:MAX_TEXT]
    try:
        text.encode()
    except UnicodeEncodeError:
        return None
    return text


def _http_reason(exc: InvalidStatus) -> str:
    """``HTTP 403: <what the body says>`` (presence's JSON ``message``, else its text)."""
    response = exc.response
    text = (response.body or b"").decode(errors="replace").strip()
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        text = body["message"]
    status = f"HTTP {response.status_code}"
    return f"{status}: {text[:MAX_TEXT]}" if text else status


class Backoff:
    """Seconds to wait before the next attempt: ``low`` doubling up to ``high``, each
    drawn between half of it and all of it (jitter: links that failed together do not
    come back together)."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.delay = low

    def next(self) -> float:
        wait = self.delay * random.uniform(0.5, 1.0)
        self.delay = min(self.delay * 2, self.high)
        return wait

    def reset(self) -> None:
        self.delay = self.low


class Health:
    """What a mirror's links know together about presence, and log once for all of them.

    - An outage (presence unreachable): logged when it starts, and when presence accepts
      a link again ("is back"). A connection that opens and is then refused is not back.
    - A refusal (presence answers, and does not accept the mirror): logged when the first
      link is refused, and once more when a link is accepted while no link is refused any
      longer ("accepts the mirror again"). A link refused for good (its room, say) beside
      accepted ones is logged once, not at each of its retries or at each acceptance.
    """

    def __init__(
        self,
        url: str,
        log: Log,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.url = url
        self.log = log
        self.sleep = sleep  # the links' waits between attempts (tests: no wall clock)
        self.ok = True  # no outage going on
        self.refusing = False  # a refusal was logged, and no resumption since
        self.refused: set[Any] = set()  # the links whose last attempt was refused

    def accepted(self, link: Any) -> None:
        """``link`` was accepted: presence sent it the room."""
        self.refused.discard(link)
        resumed = self.refusing and not self.refused
        if not self.ok:
            self.log.info("presence.jupyter: presence at %s is back; mirroring resumed", self.url)
        elif resumed:
            self.log.info(
                "presence.jupyter: presence at %s accepts the mirror again; mirroring resumed",
                self.url,
            )
        self.ok = True
        if resumed:
            self.refusing = False

    def forget(self, link: Any) -> None:
        """``link`` closed: it is refused no longer (nor accepted)."""
        self.refused.discard(link)

    def down(self, error: BaseException) -> None:
        if self.ok:
            self.ok = False
            self.log.warning(
                "presence.jupyter: presence at %s is unreachable (%s); collaboration is not "
                "affected, the mirror retries",
                self.url,
                str(error) or type(error).__name__,
            )

    def refuse(self, link: Any, reason: str, *, credentials: bool = True) -> None:
        """presence answered ``link``, and refused it (``credentials``: the mirror's token,
        or its room; else a room or message for now, e.g. a full room, or a hub presence
        could not ask). Presence is reachable, so an outage is over; it is not *back*
        before it accepts a link."""
        self.ok = True
        self.refused.add(link)
        if self.refusing:
            return
        self.refusing = True
        if credentials:
            self.log.warning(
                "presence.jupyter: presence at %s refuses the mirror (%s); check "
                "PresenceJupyter.url and, on JupyterHub, the server token's scopes "
                "(docs/jupyter.md). Collaboration is not affected; the mirror retries every "
                "few minutes",
                self.url,
                reason,
            )
        else:
            self.log.warning(
                "presence.jupyter: presence at %s turned the mirror away (%s); "
                "collaboration is not affected, the mirror retries",
                self.url,
                reason,
            )


class Link:
    """One Jupyter socket's collaborators, relayed over one connection to presence."""

    def __init__(
        self,
        url: str,
        health: Health,
        log: Log,
        renew_every: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self.health = health
        self.log = log
        self.renew_every = renew_every
        self.headers = dict(headers) if headers else None  # sent with the handshake
        # Fresh presence client IDs per link: a client ID moving to another Jupyter socket
        # never meets its old binding in presence (no ordering between two connections).
        self.ids: dict[int, int] = {}  # Jupyter client ID -> presence client ID
        self.states: dict[int, dict[str, Any]] = {}  # presence client ID -> summary
        self.pending: set[int] = set()  # presence client IDs to send (absent: a null)
        self.clock = 0
        self.wake = asyncio.Event()
        self.closing = False
        self.connected = False
        self.accepted = False  # this connection got the room from presence
        self.outages = Backoff(BACKOFF_MIN, BACKOFF_MAX)
        self.refusals = Backoff(REFUSED_MIN, REFUSED_MAX)
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
        self.health.forget(self)
        if not self.connected:
            self.task.cancel()

    async def _run(self) -> None:
        while not self.closing:
            self.accepted = False
            backoff = self.outages
            try:
                async with connect(
                    self.url,
                    additional_headers=self.headers,
                    open_timeout=5,
                    close_timeout=2,
                    max_size=1 << 20,
                    max_queue=16,
                ) as ws:
                    self.connected = True
                    try:
                        await self._serve(ws)
                    finally:
                        self.connected = False
            except asyncio.CancelledError:
                raise
            except ConnectionClosed as exc:
                if self.closing:
                    return
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = f"{code} {exc.rcvd.reason}".strip() if exc.rcvd is not None else ""
                if code in _REFUSAL_CODES:
                    self.health.refuse(self, reason)
                    backoff = self.refusals
                elif code in _REJECTED:
                    self.health.refuse(self, reason, credentials=False)
                elif not self.accepted:
                    self.health.down(exc)
                # else: an accepted connection dropped; the next attempt says more
            except InvalidStatus as exc:
                if self.closing:
                    return
                if exc.response.status_code in _REFUSAL_STATUSES:
                    self.health.refuse(self, _http_reason(exc))
                    backoff = self.refusals
                else:  # 404, 502, 503: the address, a proxy or presence itself is not there
                    self.health.down(exc)
            except Exception as exc:  # OSError, handshake errors, timeouts
                if self.closing:
                    return
                self.health.down(exc)
            if self.closing:
                return
            await self.health.sleep(backoff.next())

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
                    protocol = ws.protocol  # closed cleanly (1000, 1001): no exception
                    raise ConnectionClosed(
                        protocol.close_rcvd, protocol.close_sent, protocol.close_rcvd_then_sent
                    )
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
        # Its first message (the room, sent once it let us in) says we are accepted: a
        # refusal closes the connection without one.
        async for _ in ws:
            if not self.accepted:
                self.accepted = True
                self.outages.reset()
                self.refusals.reset()
                self.health.accepted(self)

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
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        self.renew_every = renew_every
        self._scope = scope
        self.scope: str | None = None
        self.hook = hook
        self.log = log
        # Sent with every handshake: on JupyterHub, the server's own API token
        # ({"Authorization": "token <JUPYTERHUB_API_TOKEN>"}).
        self.headers = dict(headers) if headers else None
        self.health = Health(url, log)
        self.links: dict[Any, Link] = {}  # Jupyter socket -> its link

    def room_seen(self, room: Room, room_id: str) -> None:
        if self.scope is None:  # the port is known once the server listens
            self.scope = _scope_name(self._scope())
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
                link = self.links[owner] = Link(
                    url, self.health, self.log, self.renew_every, self.headers
                )
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
