"""presence.jupyter.singleuser without a hub: faces, the awareness rewrite and revocation,
with stand-ins for JupyterHub's HubAuth and tornado handlers and an injected clock.
(tests/test_jupyterhub_story.py runs the same code on a real hub.)"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import orjson
import pytest
from pycrdt import Awareness, Doc, write_var_uint
from tornado.websocket import WebSocketHandler

from presence.core.colors import WHITE, contrast_ratio
from presence.core.identity import Identity
from presence.jupyter import awareness
from presence.jupyter.hub import ANONYMOUS_MARK
from presence.jupyter.singleuser import (
    REFUSAL_SECONDS,
    REVOKED,
    Faces,
    Guard,
    local_faces,
    user_field,
)
from presence.yjs import codec as yjs

pytestmark = pytest.mark.unit

log = logging.getLogger("test")
KEY = b"k" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def faces(anonymous: bool, clock: Clock | None = None) -> Faces:
    return Faces(anonymous=anonymous, key=KEY, fallback=local_faces(KEY), clock=clock or Clock())


def hub_user(user: str, **info: Any) -> dict[str, Any]:
    return {"name": user, "user_info": info, "scopes": ["access:servers!server=alice/"]}


def test_under_hub_names_the_hubs_user_info_is_shown() -> None:
    shown = faces(False).shown(hub_user("ada", name="Ada L", initials="AL", color="#332288"))
    assert shown == Identity("ada", "Ada L", "AL", "#332288")
    bare = faces(False).shown(hub_user("bob"))
    assert (bare.username, bare.name, bare.initials) == ("bob", "bob", "B")
    assert contrast_ratio(WHITE, bare.color) >= 4.5  # JupyterLab writes initials in white


def test_anonymous_faces_never_show_the_hub_user() -> None:
    made = faces(True)
    hubs = made.shown(
        hub_user(
            "alice", name="Quick Crane", initials="QC", color="#332288", **{ANONYMOUS_MARK: True}
        )
    )
    assert (hubs.name, hubs.initials, hubs.color) == ("Quick Crane", "QC", "#332288")
    assert hubs.username.startswith("anonymous-") and "alice" not in hubs.username
    # A user who logged in before the hook (their user_info names them): a local face.
    old = made.shown(hub_user("bob", name="Bob Smith", initials="BS", color="#0072B2"))
    assert "bob" not in orjson.dumps(old).decode().lower()
    assert old.name != "Bob Smith" and old.username == made.username("bob")
    assert made.shown(hub_user("bob")) == old  # stable


def test_a_servers_collaborators_are_told_apart() -> None:
    clock = Clock()
    made = faces(True, clock)
    same = {"name": "Quick Crane", "initials": "QC", "color": "#332288", ANONYMOUS_MARK: True}
    first = made.shown(hub_user("alice", **same))
    second = made.shown(hub_user("bob", **same))
    assert first.name == "Quick Crane" and second.name == "Quick Crane 2"
    assert first.initials != second.initials and first.color != second.color
    assert contrast_ratio(WHITE, second.color) >= 4.5
    assert made.shown(hub_user("bob", **same)) == second  # held while live
    clock.now += 3601  # alice gone for an hour: bob's next request may take the plain face
    assert made.shown(hub_user("bob", **same)).name == "Quick Crane"


# -- the awareness rewrite --------------------------------------------------------------


class Provider:
    def __init__(self, hub_auth: Any, users: dict[Any, Any]) -> None:
        self.hub_auth = hub_auth
        self.users = users

    async def get_user(self, handler: Any) -> Any:
        return self.users.get(handler)


class HubAuth:
    """What Guard uses of JupyterHub's HubOAuth."""

    tokens_of: dict[Any, str] = {}  # noqa: RUF012 (for handlers that are no Socket)
    access_scopes = frozenset({"access:servers!server=alice/"})

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.cache = type("Cache", (), {"values": {}, "timestamps": {}})()
        self.cache_max_age = 300
        self.asked: list[str] = []

    tokens_of: dict[Any, str]

    def get_token(self, handler: Any) -> str:
        return getattr(handler, "token", None) or self.tokens_of[handler]

    async def user_for_token(self, token: str, use_cache: bool, sync: bool) -> Any:
        assert not use_cache and not sync
        self.asked.append(token)
        answer = self.answers.get(token)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def check_scopes(self, required: frozenset[str], model: dict[str, Any]) -> set[str]:
        return set(required) & set(model["scopes"])


class Socket(WebSocketHandler):
    def __init__(self, token: str) -> None:  # no tornado application here
        self.token = token
        self.ws_connection = object()
        self.closed_with: tuple[int, str] | None = None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        self.closed_with = (code or 0, reason or "")
        self.ws_connection = None


class Request:
    """A tornado RequestHandler that is no WebSocket."""


class JupyterUser:
    """jupyterhub.singleuser's JupyterHubUser: a jupyter_server User with hub_user."""

    def __init__(self, hub: dict[str, Any]) -> None:
        self.hub_user = hub
        self.username = self.name = self.display_name = hub["name"]
        self.initials: str | None = None
        self.color: str | None = None


async def guarded(anonymous: bool = True) -> tuple[Guard, HubAuth, dict[Any, Any]]:
    hub_auth, users = HubAuth(), {}
    guard = Guard(Provider(hub_auth, users), faces(anonymous), "alice", 10.0, log)
    guard.install()
    return guard, hub_auth, users


async def test_a_socket_can_only_show_its_own_user() -> None:
    guard, _, users = await guarded()
    bob = Socket("bob-token")
    users[bob] = JupyterUser(hub_user("bob"))
    user = await guard.provider.get_user(bob)
    assert user.username.startswith("anonymous-") and user.name != "bob"  # /api/me
    claim = orjson.dumps({"user": {"username": "alice", "name": "alice"}, "cursors": []})
    rewritten = guard.rewrite(bob, claim)
    assert rewritten is not None
    assert orjson.loads(rewritten) == {"user": user_field(guard._users[bob]), "cursors": []}
    assert "bob" not in rewritten.decode()
    assert guard.rewrite(bob, rewritten) is rewritten  # already right: untouched
    # What orjson cannot read (browsers might: a lone surrogate, 1e400), and no object.
    for odd in (b"not json", b"[1]", b"1e400", b'{"z":1e400}', b'{"a":' + b"[" * 300):
        assert guard.rewrite(bob, odd) is None, odd
    deep = b'{"a":' + b"[" * 300 + b"]" * 300 + b"}"  # orjson reads it, cannot write it
    assert guard.rewrite(bob, deep) is None
    # A lone surrogate (a file name that is no UTF-8), which browsers read: replaced.
    odd_name = guard.rewrite(bob, b'{"current":"notebook:x\\ud800.ipynb"}')
    assert odd_name is not None and orjson.loads(odd_name)["current"] == "notebook:x?.ipynb"
    assert guard.rewrite(Socket("x"), claim) is None  # a socket of nobody known
    bob2 = Socket("bob-other-token")
    users[bob2] = JupyterUser(hub_user("bob"))
    await guard.provider.get_user(bob2)
    assert guard.person(bob) == guard.person(bob2) is not None
    assert guard.person(Socket("x")) is None
    assert guard._task is not None
    guard._task.cancel()


class Guarded:
    """A StateGuard that names the states it rewrote, and knows who is who."""

    def __init__(self, people: dict[Any, str]) -> None:
        self.people = people

    def rewrite(self, socket: Any, state: bytes) -> bytes | None:
        return b'{"user":{"name":"%s"}}' % self.people[socket].encode()

    def person(self, socket: Any) -> str | None:
        return self.people.get(socket)


def message(*entries: tuple[int, int, bytes]) -> bytes:
    body = write_var_uint(len(entries)) + b"".join(yjs.entry(*e) for e in entries)
    return bytes([1]) + write_var_uint(len(body)) + body


def relayed(data: bytes) -> list[tuple[int, int, bytes]]:
    if data is awareness.NOTHING:
        return []
    return [(e.client_id, e.clock, e.state) for e in yjs.read_awareness(yjs.read_message(data)[1])]


def room_with(*names: str) -> tuple[awareness.Ownership, Any, list[Any]]:
    hook = awareness.Ownership(log)
    room = type("Room", (), {})()
    room.awareness, room.clients = Awareness(Doc()), set()
    sockets = [type("Sock", (), {"room": room, "path": "r"})() for _ in names]
    hook.guard = Guarded(dict(zip(sockets, names, strict=True)))
    return hook, room, sockets


def apply(room: Any, data: bytes) -> None:
    room.awareness.apply_awareness_update(yjs.read_message(data)[1].var_bytes(), "test")


async def test_under_a_guard_only_what_the_room_applies_is_relayed_as_its_sockets() -> None:
    hook, room, (bob, bob_again, eve) = room_with("bob", "bob", "eve")
    sent = hook.received(bob, message((7, 1, b'{"user":{"name":"alice"}}')))
    assert relayed(sent) == [(7, 1, b'{"user":{"name":"bob"}}')]  # its own face
    apply(room, sent)
    # An echo (an unchanged clock) is not applied: relayed, it could bring a state back to
    # a peer that never saw its clock.
    assert relayed(hook.received(eve, message((7, 1, b'{"user":{"name":"x"}}')))) == []
    # Nobody speaks for the server's own client.
    server = room.awareness.client_id
    assert relayed(hook.received(eve, message((server, 99, b'{"user":{}}')))) == []
    # Nor changes another person's client while its socket is open, or removes it.
    assert relayed(hook.received(eve, message((7, 2, b'{"user":{}}')))) == []
    assert relayed(hook.received(eve, message((7, 1, b"null")))) == []
    # The same person's new socket may take it over (a reconnect before the close).
    taken = hook.received(bob_again, message((7, 2, b'{"user":{}}')))
    assert relayed(taken) == [(7, 2, b'{"user":{"name":"bob"}}')]
    apply(room, taken)
    # Its owner may remove it at its clock; a null is relayed as it is.
    assert relayed(hook.received(bob_again, message((7, 2, b"null")))) == [(7, 2, b"null")]
    # What we cannot read whole (pycrdt would read more: trailing bytes, larger client
    # IDs) is not applied at all; nor is a message with nothing left to apply.
    body = write_var_uint(1) + yjs.entry(8, 1, b"{}") + yjs.entry(7, 9, b'{"user":{}}')
    smuggled = bytes([1]) + write_var_uint(len(body)) + body  # one entry more than it says
    assert all(cid != 7 for cid, _, _ in relayed(hook.received(eve, smuggled)))
    assert hook.received(eve, message((1 << 60, 1, b"{}"))) is awareness.NOTHING
    assert hook.received(eve, message((7, 1, b"{}"))) is awareness.NOTHING


async def test_a_client_removed_at_close_comes_back_only_for_its_person() -> None:
    hook, room, (bob, eve, bob_again) = room_with("bob", "eve", "bob")
    room.clients = {bob, eve, bob_again}
    hook.reading(bob)
    first = hook.received(bob, message((7, 3, b'{"user":{}}')))
    apply(room, first)
    hook.closed(bob)  # bob's tab sleeps: his client is removed, its clock remembered
    assert 7 not in room.awareness.states
    hook.reading(eve)
    hook.reading(bob_again)
    # eve saw bob's client and clock: she may not take it, at that clock or a later one.
    assert hook.received(eve, message((7, 3, b'{"user":{}}'))) is awareness.NOTHING
    assert hook.received(eve, message((7, 9, b'{"user":{}}'))) is awareness.NOTHING
    # bob, back on a new socket with his old clock, is shown at once (clock + 1).
    back = hook.received(bob_again, message((7, 3, b'{"user":{}}')))
    assert relayed(back) == [(7, 4, b'{"user":{"name":"bob"}}')]


async def test_without_a_guard_messages_are_relayed_as_sent() -> None:
    hook, room, (bob,) = room_with("bob")
    hook.guard = None
    first = message((7, 1, b'{"user":{"name":"claimed"}}'))
    assert hook.received(bob, first) is first
    apply(room, first)
    echo = message((7, 1, b'{"x":1}'))
    assert hook.received(bob, echo) is echo


# -- revocation -----------------------------------------------------------------------


async def test_revoked_collaborators_lose_their_cached_answer_and_their_sockets() -> None:
    guard, hub_auth, users = await guarded(anonymous=False)
    owner, bob, bob2, dave = Socket("alice-t"), Socket("bob-t"), Socket("bob-t"), Socket("dave-t")
    rest_only = Request()  # a REST request of carol's: no socket, still a token to check
    for handler, name in ((owner, "alice"), (bob, "bob"), (bob2, "bob"), (dave, "dave")):
        users[handler] = JupyterUser(hub_user(name))
        await guard.provider.get_user(handler)
    carol = JupyterUser(hub_user("carol"))
    users[rest_only] = carol
    hub_auth.tokens_of = {rest_only: "carol-t"}
    await guard.provider.get_user(rest_only)
    assert guard._task is not None
    guard._task.cancel()  # the test drives the checks
    ok = {"name": "x", "scopes": ["access:servers!server=alice/"]}
    hub_auth.answers = {"bob-t": ok, "dave-t": ok, "carol-t": ok}
    assert await guard.recheck_all() == 0
    assert sorted(hub_auth.asked) == ["bob-t", "carol-t", "dave-t"]  # never the owner's

    cached = {}
    for token in ("bob-t", "carol-t", "alice-t"):
        key = "token::" + hashlib.sha256(token.encode()).hexdigest()
        hub_auth.cache.values[key] = ok
        hub_auth.cache.timestamps[key] = 0.0
        cached[token] = key
    bob2.ws_connection = None  # still opening (a kernel waits for its kernel first)
    bob2._on_close_called = False
    gone = {"name": "x", "scopes": []}
    hub_auth.answers = {"bob-t": gone, "carol-t": None, "dave-t": RuntimeError("hub away")}
    assert await guard.recheck_all() == 1
    assert bob.closed_with == (REVOKED, "access to this server was revoked")
    assert dave.closed_with is None and owner.closed_with is None  # the hub away: kept
    assert set(hub_auth.cache.values) == {cached["alice-t"]}  # their next request asks
    bob2.ws_connection = object()  # now open: the next check closes it too
    assert await guard.recheck_all() == 1 and bob2.closed_with is not None
    assert await guard.recheck_all() == 0


async def test_a_refusal_is_believed_for_seconds_only() -> None:
    """bob, revoked, accepts a link again: the hub lets him in, and the server's cached
    refusal (300 s) must not keep him out; a refusal cached within REFUSAL_SECONDS is
    kept, so that his tabs' retries do not each ask the hub."""
    guard, hub_auth, _ = await guarded(anonymous=False)
    refused = Socket("bob-t")  # the provider answers None: the hub's answer refused it
    digest = hashlib.sha256(b"bob-t").hexdigest()
    old, fresh = f"token:a:{digest}", f"token:b:{digest}"
    other = "token::" + hashlib.sha256(b"dave-t").hexdigest()
    # The cache's own clock is time.monotonic (jupyterhub's _ExpiringDict).
    now = time.monotonic()
    for key, at in ((old, now - REFUSAL_SECONDS - 1), (fresh, now), (other, now - 60)):
        hub_auth.cache.values[key] = {"name": "bob", "scopes": []}
        hub_auth.cache.timestamps[key] = at
    assert await guard.provider.get_user(refused) is None
    assert set(hub_auth.cache.values) == {fresh, other}


async def test_a_revoke_of_one_user_asks_the_hub_about_that_user_only() -> None:
    guard, hub_auth, users = await guarded(anonymous=False)
    bob, dave = Socket("bob-t"), Socket("dave-t")
    for handler, name in ((bob, "bob"), (dave, "dave")):
        users[handler] = JupyterUser(hub_user(name))
        await guard.provider.get_user(handler)
    assert guard._task is not None
    guard._task.cancel()
    hub_auth.answers = {"bob-t": {"name": "bob", "scopes": []}, "dave-t": None}
    assert await guard.recheck_all(only="bob") == 1
    assert hub_auth.asked == ["bob-t"] and dave.closed_with is None


async def test_tokens_are_forgotten_once_the_hubs_cache_would_not_answer_for_them() -> None:
    guard, hub_auth, users = await guarded(anonymous=False)
    clock = Clock()
    guard.clock = clock
    request = Request()
    users[request] = JupyterUser(hub_user("bob"))
    hub_auth.tokens_of = {request: "bob-t"}
    await guard.provider.get_user(request)
    assert guard._task is not None
    guard._task.cancel()
    hub_auth.answers = {"bob-t": {"name": "bob", "scopes": ["access:servers!server=alice/"]}}
    await guard.recheck_all()
    clock.now += hub_auth.cache_max_age + guard.recheck + 1
    hub_auth.asked.clear()
    await guard.recheck_all()
    assert hub_auth.asked == []
