"""presence.jupyter.singleuser without a hub: faces, the awareness rewrite and revocation,
with stand-ins for JupyterHub's HubAuth and tornado handlers and an injected clock.
(tests/test_jupyterhub_story.py runs the same code on a real hub.)"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from pycrdt import Awareness, Doc, write_var_uint
from tornado.websocket import WebSocketHandler

from presence.codecs import yjs
from presence.core.colors import WHITE, contrast_ratio
from presence.core.identity import Identity
from presence.jupyter import awareness
from presence.jupyter.hub import ANONYMOUS_MARK
from presence.jupyter.singleuser import (
    REVOKED,
    Faces,
    Guard,
    local_faces,
    shorten_cache,
    user_field,
)

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

    access_scopes = frozenset({"access:servers!server=alice/"})

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.cache = type("Cache", (), {"values": {}, "timestamps": {}})()
        self.cache_max_age = 300
        self.asked: list[str] = []

    def get_token(self, handler: Any) -> str:
        return str(handler.token)

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
    rewritten = orjson.loads(guard.rewrite(bob, claim))
    assert rewritten == {"user": user_field(guard._users[bob]), "cursors": []}
    assert "bob" not in orjson.dumps(rewritten).decode()
    same = orjson.dumps(rewritten)
    assert guard.rewrite(bob, same) is same  # already right: untouched
    assert guard.rewrite(bob, b"not json") == b"not json"
    stranger = Socket("x")
    assert guard.rewrite(stranger, claim) is claim  # a socket nobody logged in on


async def test_the_ownership_hook_applies_the_rewrite_to_a_sockets_own_states() -> None:
    hook = awareness.Ownership(log)
    room = type("Room", (), {})()
    room.awareness, room.clients = Awareness(Doc()), set()
    socket = type("Sock", (), {"room": room, "path": "r"})()
    hook.rewrite = lambda s, state: b'{"user":{"name":"shown"}}'

    def message(cid: int, clock: int, state: bytes) -> bytes:
        body = write_var_uint(1) + yjs.entry(cid, clock, state)
        return bytes([1]) + write_var_uint(len(body)) + body

    applied = hook.received(socket, message(7, 1, b'{"user":{"name":"claimed"}}'))
    states = [e.state for e in yjs.read_awareness(yjs.read_message(applied)[1])]
    assert states == [b'{"user":{"name":"shown"}}']
    room.awareness.apply_awareness_update(yjs.read_message(applied)[1].var_bytes(), "test")
    echo = message(7, 1, b'{"user":{"name":"claimed"}}')  # an unchanged clock: an echo
    assert hook.received(socket, echo) is echo
    removal = message(7, 2, b"null")
    assert hook.received(socket, removal) is removal


# -- revocation -----------------------------------------------------------------------


async def test_revoked_collaborators_sockets_close_and_their_cached_answers_go() -> None:
    guard, hub_auth, users = await guarded(anonymous=False)
    owner, bob, bob2, dave = Socket("alice-t"), Socket("bob-t"), Socket("bob-t"), Socket("dave-t")
    for socket, name in ((owner, "alice"), (bob, "bob"), (bob2, "bob"), (dave, "dave")):
        users[socket] = JupyterUser(hub_user(name))
        await guard.provider.get_user(socket)
    assert guard._task is not None
    guard._task.cancel()  # the test drives the checks
    ok = {"name": "x", "scopes": ["access:servers!server=alice/"]}
    hub_auth.answers = {"bob-t": ok, "dave-t": ok}
    assert await guard.recheck_all() == 0
    assert sorted(hub_auth.asked) == ["bob-t", "dave-t"]  # once per token; the owner never

    import hashlib

    digest = hashlib.sha256(b"bob-t").hexdigest()
    hub_auth.cache.values[f"token::{digest}"] = ok
    hub_auth.cache.timestamps[f"token::{digest}"] = 0.0
    hub_auth.answers = {"bob-t": {"name": "bob", "scopes": []}, "dave-t": RuntimeError("away")}
    assert await guard.recheck_all() == 2
    assert bob.closed_with == bob2.closed_with == (REVOKED, "access to this server was revoked")
    assert dave.closed_with is None and owner.closed_with is None  # the hub away: kept
    assert not hub_auth.cache.values  # bob's next request asks the hub
    hub_auth.answers["dave-t"] = None  # the token is gone
    assert await guard.recheck_all() == 1 and dave.closed_with is not None
    assert await guard.recheck_all() == 0


class App:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config


def test_hub_answers_are_kept_as_long_as_a_recheck_unless_chosen() -> None:
    hub_auth = HubAuth()
    hub_auth.cache.max_age = hub_auth.cache.purge_interval = 300
    shorten_cache(hub_auth, App({}), 10.0, log)
    assert hub_auth.cache_max_age == 10 and hub_auth.cache.max_age == 10
    chosen = HubAuth()
    shorten_cache(chosen, App({"HubOAuth": {"cache_max_age": 600}}), 10.0, log)
    assert chosen.cache_max_age == 300
