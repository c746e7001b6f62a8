"""The presence mirror: a real ``jupyter server`` (presence.jupyter with
``PresenceJupyter.url``) and a real ``presence serve``.

Collaborators appear in the presence room ``<scope>:<room id>`` with their user and a
small summary, leave it within a second of their socket closing, and presence going away
never slows collaboration down; when it comes back, the mirror catches up.

On JupyterHub (presence as a hub service, a stand-in for the hub's API) the mirror sends
its server's token and is let into that server's rooms only, where its collaborators keep
the users they declare. A refusal is no outage: logged once for the whole mirror, retried
slowly. The unit tests drive the links with a stand-in for the WebSocket connection and
for the waits between attempts (no wall clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response

from harness.processes import Server
from presence.core.access import server_of
from presence.core.room import is_valid_room_name
from presence.jupyter import mirror
from presence.jupyter.extension import default_scope
from presence.jupyter.mirror import (
    Health,
    Link,
    Mirror,
    hub_scope,
    room_name,
    sanitize,
    summary,
    yjs_url,
)
from presence.yjs import codec as yjs
from tests.conftest import Client
from tests.jupyter_helpers import Jupyter, lab_state, start_jupyter
from tests.yjs_client import YClient

e2e, unit = pytest.mark.e2e, pytest.mark.unit  # each test says which it is

SCOPE = "mirror-test"


@pytest.fixture(scope="module")
def presence() -> Iterator[Server]:
    # States expire after 4 s here: the mirror renews them every second (see below).
    server = Server(["--seed", "5", "--idle-after", "1", "--expire-after", "4"]).start()
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory: pytest.TempPathFactory, presence: Server) -> Iterator[Jupyter]:
    server = start_jupyter(
        tmp_path_factory.mktemp("jupyter"),
        "--ServerApp.jpserver_extensions=presence.jupyter=True",
        f"--PresenceJupyter.url={presence.http}",
        f"--PresenceJupyter.scope={SCOPE}",
        "--PresenceJupyter.renew_interval=1",
    )
    yield server
    server.stop()


async def members(presence: Server, room: str) -> dict[str, dict[str, Any]]:
    """The presence room's members by name (empty while presence is down)."""
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            body = (await http.get(f"{presence.http}/rooms/{SCOPE}:{room}")).json()
    except httpx.HTTPError:
        return {}
    return {m["user"]["name"]: m for m in body["members"]}


async def until_members(
    presence: Server, room: str, check: Any, timeout: float = 10
) -> tuple[float, dict[str, dict[str, Any]]]:
    started = time.monotonic()
    while True:
        found = await members(presence, room)
        if check(found):
            return time.monotonic() - started, found
        if time.monotonic() - started > timeout:
            raise AssertionError(f"presence room {room}: {found}")
        await asyncio.sleep(0.02)


def selects(found: dict[str, dict[str, Any]], name: str) -> bool:
    return bool(found.get(name, {}).get("state", {}).get("selection"))


async def collaborators(jupyter: Jupyter, *names: str) -> tuple[str, list[YClient]]:
    room, url = jupyter.new_notebook()
    clients = []
    for _ in names:
        client = await YClient.connect(url)
        await client.until(lambda c=client: c.synced)  # type: ignore[misc]
        clients.append(client)
    for client, name in zip(clients, names, strict=True):
        await client.set({**lab_state(name), "secret": "print('SECRET')"})
    return room, clients


@e2e
async def test_collaborators_are_mirrored_and_leave_with_their_socket(
    jupyter: Jupyter, presence: Server
) -> None:
    room, (a, b) = await collaborators(jupyter, "Ada", "Bob")
    _, found = await until_members(presence, room, lambda m: {"Ada", "Bob"} <= set(m))
    ada = found["Ada"]["state"]
    assert ada["user"]["name"] == "Ada" and ada["user"]["initials"] == "AD"
    assert ada["cursors"] == 1 and ada["selection"] is False
    assert isinstance(ada["active_at"], int)
    assert "SECRET" not in json.dumps(found) and "anchor" not in json.dumps(found)
    # A selection shows; the state stays in presence past its 4 s expiry (renewals).
    a.awareness.set_local_state_field("cursors", lab_state("Ada", selection=True)["cursors"])
    await a.send_update([a.id])
    await until_members(presence, room, lambda m: selects(m, "Ada"))
    await asyncio.sleep(5)
    assert {"Ada", "Bob"} <= set(await members(presence, room)), "expired: no renewals"
    # a's socket dies; b, which has echoed a's state, stays (and does not relay a).
    aborted = time.monotonic()
    a.abort()
    _, found = await until_members(presence, room, lambda m: "Ada" not in m, timeout=5)
    took = time.monotonic() - aborted
    print(f"\nmirror: an aborted collaborator left the presence room after {took * 1000:.1f} ms")
    assert took < 1.0
    assert "Bob" in found
    await asyncio.sleep(0.3)
    assert set(await members(presence, room)) == {"Bob"}
    closed = time.monotonic()
    await b.ws.close()
    await until_members(presence, room, lambda m: not m, timeout=5)
    took = time.monotonic() - closed
    print(f"mirror: a closed collaborator left the presence room after {took * 1000:.1f} ms")
    assert took < 1.0


@e2e
async def test_collaboration_goes_on_while_presence_is_down_and_the_mirror_catches_up(
    jupyter: Jupyter, presence: Server
) -> None:
    room, (a, b) = await collaborators(jupyter, "Ada", "Bob")
    await until_members(presence, room, lambda m: {"Ada", "Bob"} <= set(m))
    presence.stop(signal.SIGKILL)
    try:
        lags = []
        for i in range(30):
            a.awareness.set_local_state_field("n", i)
            sent = time.monotonic()
            await a.send_update([a.id])
            await b.until(lambda i=i: b.states.get(a.id, {}).get("n") == i, timeout=2)  # type: ignore[misc]
            lags.append(time.monotonic() - sent)
            await asyncio.sleep(0.1)
        a.awareness.set_local_state_field("cursors", lab_state("Ada", selection=True)["cursors"])
        await a.send_update([a.id])
    finally:
        presence.start()
    print(
        f"\npresence down: Ada's updates reached Bob in {max(lags) * 1000:.1f} ms at most, "
        f"{sorted(lags)[len(lags) // 2] * 1000:.1f} ms median"
    )
    assert max(lags) < 0.5
    took, _ = await until_members(
        presence,
        room,
        lambda m: "Bob" in m and selects(m, "Ada"),
        timeout=20,
    )
    print(f"presence restarted: the mirror caught up {took:.1f} s after it answered")
    out = jupyter.output()
    assert out.count("is unreachable") == 1, "an outage is logged once"
    assert out.count("is back; mirroring resumed") == 1
    await a.ws.close()
    await b.ws.close()


@unit
def test_room_names_and_summaries() -> None:
    assert room_name("myhost-8888", "json:notebook:6f1c-9") == "myhost-8888:json:notebook:6f1c-9"
    assert sanitize("ada@example.org/x y") == "ada_example.org_x_y"
    long = room_name("s" * 100, "json:notebook:" + "f" * 40)
    assert len(long) == 128 and long == room_name("s" * 100, "json:notebook:" + "f" * 40)
    assert long != room_name("s" * 100, "json:notebook:" + "e" * 40)
    # The names of scopes that are not a hub's are those of before.
    whole = "s" * 100 + ":json:notebook:" + "f" * 40
    assert long == whole[:111] + "~" + hashlib.sha256(whole.encode()).hexdigest()[:16]
    assert room_name("h-1", "a/b c@d+e") == "h-1:a_b_c_d_e"  # room ids keep the old alphabet

    # On a hub: <user>/<server>:<room id>, as presence serves a hub server's rooms.
    assert hub_scope("alice") == hub_scope("alice", "") == "alice/"
    assert hub_scope("alice", "gpu") == "alice/gpu"
    assert hub_scope("ada+x@uni.edu", "") == "ada+x@uni.edu/"
    assert hub_scope("a b/c", "x:y/z") == "a_b_c/x_y_z"  # never a room of another server
    default = room_name(hub_scope("alice", ""), "JupyterLab:globalAwareness")
    assert default == "alice/:JupyterLab:globalAwareness"
    assert (
        room_name(hub_scope("alice", "gpu"), "json:notebook:6f1c") == "alice/gpu:json:notebook:6f1c"
    )
    assert room_name("ada@uni.edu/", "a/b c") == "ada@uni.edu/:a_b_c"
    for scope in ("/x", "x//y", "//", "/", "a/b/"):  # a "/" never starts a name or doubles
        assert is_valid_room_name(room_name(scope, "r")), scope
    assert room_name("/x//y", "r") == "_x__y:r"
    hashed = room_name(hub_scope("alice", "gpu"), "json:notebook:" + "f" * 200)
    assert len(hashed) == 128 and is_valid_room_name(hashed)
    assert hashed.startswith("alice/gpu:json:notebook:fff") and server_of(hashed) == (
        "alice",
        "gpu",
    )
    assert hashed == room_name("alice/gpu", "json:notebook:" + "f" * 200)
    assert hashed != room_name("alice/gpu", "json:notebook:" + "e" * 200)
    assert yjs_url("http://p:1/services/presence/", default) == (
        "ws://p:1/services/presence/yjs/alice/:JupyterLab:globalAwareness"
    )
    assert yjs_url("https://p.example/base/", "a:b") == "wss://p.example/base/yjs/a:b"
    assert yjs_url("http://127.0.0.1:8000", "r") == "ws://127.0.0.1:8000/yjs/r"
    with pytest.raises(ValueError):
        yjs_url("ftp://p.example", "r")
    state = {
        "user": {"name": "Ada", "color": "#123456", "avatar_url": None, "token": 1},
        "cursors": [{"anchor": {"item": 1}, "head": {"item": 2}, "empty": False}],
        "current": "notebook:analysis.ipynb",
        "code": "import os",
    }
    assert summary(state) == {
        "user": {"name": "Ada", "color": "#123456"},
        "current": "notebook:analysis.ipynb",
        "cursors": 1,
        "selection": True,
    }
    assert summary({}) == {}
    # What a browser's JSON may hold and UTF-8 (orjson) cannot: left out, not a crash.
    odd = summary({"user": {"name": "x\ud800", "initials": "X"}, "current": "\udfff"})
    assert odd == {"user": {"initials": "X"}}


@unit
def test_default_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    class App:
        port = 8888

    monkeypatch.delenv("JUPYTERHUB_USER", raising=False)
    monkeypatch.delenv("JUPYTERHUB_SERVER_NAME", raising=False)
    assert default_scope(App()).endswith("-8888")
    monkeypatch.setenv("JUPYTERHUB_USER", "ada@uni.edu")
    assert default_scope(App()) == "ada_uni.edu"
    monkeypatch.setenv("JUPYTERHUB_SERVER_NAME", "gpu")
    assert default_scope(App()) == "ada_uni.edu~gpu"


# -- refusals and outages, with a stand-in for the connection (unit) -------------------------

REFUSED_BY_HUB = Close(4403, "this hub token mirrors alice/ only, not the server alice/gpu")
ROOM_MESSAGE = yjs.awareness_message([])  # what presence sends first: the room


class Socket:
    """What a link uses of a websockets ClientConnection: presence's messages (``first``,
    then a close with ``close``, or nothing more until the link closes), what was sent."""

    def __init__(self, first: bytes | None = ROOM_MESSAGE, close: Close | None = None) -> None:
        self.first, self.close_frame = first, close
        self.sent: list[bytes] = []
        self.protocol = SimpleNamespace(
            close_rcvd=close, close_sent=close, close_rcvd_then_sent=None if close is None else True
        )
        self.ended = asyncio.Event()

    async def send(self, data: bytes) -> None:
        self.sent.append(data)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.first is not None:
            yield self.first
        if self.close_frame is not None:
            raise ConnectionClosedError(self.close_frame, self.close_frame, True)
        await self.ended.wait()


def http_refusal(status: int, message: str) -> InvalidStatus:
    body = json.dumps({"error": "no_access", "message": message}).encode()
    return InvalidStatus(Response(status, "Forbidden", Headers(), body))


Outcome = Socket | BaseException


class Presence:
    """Stands in for ``websockets.connect``: each attempt gets ``answer(n)`` (a socket, or
    an exception to raise), n counting the attempts of all links from 1. Records what it
    was asked for, and what each link waited between attempts (``sleep``, no wall clock)."""

    def __init__(self, answer: Callable[[int], Outcome]) -> None:
        self.answer = answer
        self.attempts: list[tuple[str, dict[str, str] | None]] = []
        self.sockets: list[Socket] = []
        self.waits: dict[Any, list[float]] = defaultdict(list)  # link's task -> waits
        self.changed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def connect(self, url: str, **kw: Any) -> AsyncIterator[Socket]:
        self.attempts.append((url, kw.get("additional_headers")))
        self.changed.set()
        outcome = self.answer(len(self.attempts))
        if isinstance(outcome, BaseException):
            raise outcome
        self.sockets.append(outcome)
        try:
            yield outcome
        finally:
            outcome.ended.set()

    async def sleep(self, seconds: float) -> None:
        self.waits[asyncio.current_task()].append(seconds)
        self.changed.set()
        await asyncio.sleep(0)

    async def until(self, predicate: Callable[[], bool], timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):  # or a link's own progress
                    await asyncio.wait_for(self.changed.wait(), 0.01)


@pytest.fixture
def mirror_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[tuple[int, str]]]:
    caplog.set_level(logging.INFO, logger="test.mirror")

    def lines() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "test.mirror"]

    return lines


def links(
    monkeypatch: pytest.MonkeyPatch, presence: Presence, n: int, **kw: Any
) -> tuple[Health, list[Link]]:
    monkeypatch.setattr(mirror, "connect", presence.connect)
    log = logging.getLogger("test.mirror")
    health = Health("http://presence", log, sleep=presence.sleep)
    made = [Link(f"ws://presence/yjs/alice/:r{i}", health, log, 60.0, **kw) for i in range(n)]
    return health, made


def assert_doubling(waits: list[float], low: float, high: float) -> None:
    """Each wait is between half and all of ``low`` doubled once per attempt, up to ``high``."""
    for i, wait in enumerate(waits):
        delay = min(low * 2**i, high)
        assert delay / 2 <= wait <= delay, (i, waits)


@unit
async def test_a_refusal_is_logged_once_for_the_whole_mirror_and_retried_slowly(
    monkeypatch: pytest.MonkeyPatch, mirror_log: Callable[[], list[tuple[int, str]]]
) -> None:
    accept = False

    def answer(n: int) -> Outcome:
        if accept:
            return Socket()
        # Opened, then refused without a message (as presence does); or refused at the
        # handshake (a proxy's, or an HTTP view's 401/403).
        if n % 3 == 0:
            return http_refusal(403, "this hub token has no access to the service presence")
        return Socket(first=None, close=REFUSED_BY_HUB if n % 3 == 1 else Close(4401, "x"))

    presence = Presence(answer)
    health, made = links(monkeypatch, presence, 3, headers={"Authorization": "token t"})
    await presence.until(
        lambda: len(presence.waits) == 3 and all(len(w) >= 9 for w in presence.waits.values())
    )
    assert all(headers == {"Authorization": "token t"} for _, headers in presence.attempts)
    for waits in presence.waits.values():  # 5 s doubling to 5 minutes, with jitter
        assert_doubling(waits[:9], 5.0, 300.0)
    assert max(max(w) for w in presence.waits.values()) > 150.0
    lines = mirror_log()
    assert len(lines) == 1, lines  # once, whatever the number of links and attempts
    level, text = lines[0]
    assert level == logging.WARNING and "refuses the mirror" in text
    reasons = (
        "(4403 this hub token mirrors alice/ only, not the server alice/gpu)",
        "(4401 x)",
        "(HTTP 403: this hub token has no access to the service presence)",
    )
    assert any(reason in text for reason in reasons), text
    assert health.refusing and health.ok and health.refused == set(made)

    accept = True  # say, the hub's roles fixed: every link gets in at its next attempt
    await presence.until(lambda: sum(s.first is not None for s in presence.sockets) >= 3)
    await presence.until(lambda: all(link.accepted for link in made))
    lines = mirror_log()[1:]
    assert lines == [
        (
            logging.INFO,
            "presence.jupyter: presence at http://presence accepts the mirror "
            "again; mirroring resumed",
        )
    ]
    assert all(link.refusals.delay == 5.0 for link in made)  # from the start next time
    for link in made:
        link.close()


@unit
async def test_a_refusal_at_the_handshake_says_what_presence_said(
    monkeypatch: pytest.MonkeyPatch, mirror_log: Callable[[], list[tuple[int, str]]]
) -> None:
    presence = Presence(lambda n: http_refusal(401, "log in with the hub"))
    _, (link,) = links(monkeypatch, presence, 1)
    await presence.until(lambda: sum(len(w) for w in presence.waits.values()) >= 4)
    assert presence.attempts[0][1] is None  # no headers: none sent
    assert_doubling(next(iter(presence.waits.values()))[:4], 5.0, 300.0)
    (level, text), *more = mirror_log()
    assert not more and level == logging.WARNING
    assert "(HTTP 401: log in with the hub)" in text
    link.close()


@unit
async def test_an_outage_is_logged_once_and_its_end_once(
    monkeypatch: pytest.MonkeyPatch, mirror_log: Callable[[], list[tuple[int, str]]]
) -> None:
    down = True

    def answer(n: int) -> Outcome:
        if down:
            # Connection refused; a proxy with presence away (502); a timeout.
            return [
                OSError("Connect call failed"),
                http_refusal(502, "bad gateway"),
                TimeoutError(),
            ][n % 3]
        return Socket()

    presence = Presence(answer)
    health, made = links(monkeypatch, presence, 3)
    await presence.until(
        lambda: len(presence.waits) == 3 and all(len(w) >= 7 for w in presence.waits.values())
    )
    for waits in presence.waits.values():  # 0.5 s doubling to 10 s, with jitter
        assert_doubling(waits[:7], 0.5, 10.0)
    (level, text), *more = mirror_log()
    assert not more and level == logging.WARNING
    assert text.startswith("presence.jupyter: presence at http://presence is unreachable (")
    down = False
    await presence.until(lambda: all(link.accepted for link in made))
    assert mirror_log()[1:] == [
        (logging.INFO, "presence.jupyter: presence at http://presence is back; mirroring resumed")
    ]
    # An accepted connection that drops (presence restarting: 1012) and comes back at
    # once is no outage: nothing is logged.
    before = len(presence.attempts)
    presence.sockets[-1].close_frame = Close(1012, "server shutting down")
    presence.sockets[-1].ended.set()  # its reader ends: the link sees the close
    await presence.until(lambda: len(presence.attempts) > before)
    await presence.until(lambda: all(link.accepted for link in made))
    assert len(mirror_log()) == 2 and health.ok and not health.refusing
    for link in made:
        link.close()


@unit
async def test_a_connection_that_opens_and_is_refused_is_not_presence_back(
    monkeypatch: pytest.MonkeyPatch, mirror_log: Callable[[], list[tuple[int, str]]]
) -> None:
    phase = "down"

    def answer(n: int) -> Outcome:
        if phase == "down":
            return OSError("Connect call failed")
        if phase == "refusing":  # the handshake succeeds, then 4401: not back
            return Socket(first=None, close=Close(4401, "not a valid hub token: log in again"))
        return Socket()

    presence = Presence(answer)
    _, (link,) = links(monkeypatch, presence, 1)
    await presence.until(lambda: len(presence.attempts) >= 3)
    phase = "refusing"
    await presence.until(lambda: len(presence.attempts) >= 8)
    texts = [text for _, text in mirror_log()]
    assert len(texts) == 2, texts
    assert "is unreachable" in texts[0]
    assert "refuses the mirror (4401 not a valid hub token: log in again)" in texts[1]
    waits = next(iter(presence.waits.values()))
    assert_doubling(waits[3:7], 5.0, 300.0)  # the refusals' backoff, from its start
    phase = "accepting"
    await presence.until(lambda: link.accepted)
    texts = [text for _, text in mirror_log()]
    assert not any("is back" in t for t in texts)
    assert texts[2].endswith("accepts the mirror again; mirroring resumed") and len(texts) == 3
    link.close()


@unit
async def test_a_mirror_names_hub_rooms_and_sends_its_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    presence = Presence(lambda n: Socket())
    monkeypatch.setattr(mirror, "connect", presence.connect)
    observers: list[Callable[..., None]] = []
    room = SimpleNamespace(
        awareness=SimpleNamespace(
            states={7: lab_state("Ada")}, observe=lambda f: observers.append(f)
        )
    )
    hook = SimpleNamespace(owner=lambda room, cid: "socket", is_open=lambda owner: True)
    headers = {"Authorization": "token server-token"}
    m = Mirror(
        "http://hub/services/presence/",
        lambda: hub_scope("alice", ""),
        hook,  # type: ignore[arg-type]
        logging.getLogger("test.mirror"),
        headers=headers,
    )
    m.room_seen(room, "JupyterLab:globalAwareness")  # type: ignore[arg-type]
    assert m.scope == "alice/"
    observers[0]("change", ({"added": [7], "updated": [], "removed": []}, "remote"))
    await presence.until(lambda: bool(presence.sockets and presence.sockets[0].sent))
    assert presence.attempts == [
        ("ws://hub/services/presence/yjs/alice/:JupyterLab:globalAwareness", headers)
    ]
    m.socket_closed("socket")
    assert m.links == {}


# -- presence as a hub service (e2e: real presence processes, a stand-in for the hub) --------

MIRROR_SCOPE = "custom:presence:mirror"
ACCESS = "access:services!service=presence"


class StandInHub:
    """The hub's API as presence asks it (``GET /hub/api/user``, the shares), over HTTP
    from a thread: ``tokens`` maps a token to the hub's model of it."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict[str, Any]] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = self.headers.get("Authorization", "").partition(" ")[2]
                status, body = 404, {"status": 404}
                if self.path == "/hub/api/user":
                    model = hub.tokens.get(token)
                    status, body = (200, model) if model else (403, {"status": 403})
                elif self.path.startswith("/hub/api/users/") and "/shared" in self.path:
                    status, body = 200, {"items": [], "_pagination": {"next": None}}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hub/api"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def hub_model(user: str, *scopes: str) -> dict[str, Any]:
    return {"kind": "user", "name": user, "scopes": [ACCESS, *scopes]}


def server_token_model(user: str, server: str = "") -> dict[str, Any]:
    """A single-user server's own token, as the hub describes it with the 'server' role."""
    return hub_model(
        user,
        f"access:servers!server={user}/{server}",
        f"{MIRROR_SCOPE}!server={user}/{server}",
        f"users:activity!user={user}",
    )


@pytest.fixture(scope="module")
def hub_api() -> Iterator[StandInHub]:
    hub = StandInHub()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def hub_presence(hub_api: StandInHub) -> Iterator[Server]:
    """presence as a hub service that shows hub users anonymously; the hub's answers are
    kept 0.3 s (a changed token shows at once)."""
    env = {"JUPYTERHUB_API_URL": hub_api.api_url, "JUPYTERHUB_API_TOKEN": "service-token"}
    args = ["--auth", "jupyterhub", "--jupyterhub-anonymous", "true"]
    server = Server([*args, "--jupyterhub-recheck", "0.3", "--seed", "3"], env).start()
    yield server
    server.stop(signal.SIGKILL)


def hub_link(
    presence: Server, health: Health, room: str, token: str, renew_every: float = 60.0
) -> Link:
    url = yjs_url(presence.http, room)
    return Link(url, health, health.log, renew_every, {"Authorization": f"token {token}"})


@e2e
async def test_on_a_hub_the_servers_token_mirrors_its_rooms_with_the_users_it_declares(
    hub_api: StandInHub,
    hub_presence: Server,
    mirror_log: Callable[[], list[tuple[int, str]]],
) -> None:
    hub_api.tokens["alice-server"] = server_token_model("alice")
    hub_api.tokens["alice"] = hub_model("alice", "custom:presence:mirror!user=alice")
    room = room_name(hub_scope("alice", ""), "JupyterLab:globalAwareness")
    assert room == "alice/:JupyterLab:globalAwareness"
    health = Health(hub_presence.http, logging.getLogger("test.mirror"))
    link = hub_link(hub_presence, health, room, "alice-server")
    link.set(1, summary(lab_state("Ada")))
    link.set(2, summary({**lab_state("Bob"), "current": "notebook:a.ipynb"}))
    # alice herself, with her own token (which her role's mirror scope does not make a
    # mirror): the hub's identity is forced, here an anonymous one.
    owner = await Client.connect(
        f"{hub_presence.ws}/rooms/{room}", additional_headers={"Authorization": "token alice"}
    )
    assert owner.user["name"] not in ("alice", "Ada", "Bob")
    await owner.until(
        lambda _: {"Ada", "Bob"} <= {m["user"]["name"] for m in owner.members.values()}
    )
    by_name = {m["user"]["name"]: m for m in owner.members.values()}
    ada, bob = by_name["Ada"], by_name["Bob"]
    # As declared, with --jupyterhub-anonymous too: the server anonymises its users itself.
    assert ada["user"]["username"] == "yjs:u-ada" and ada["state"]["user"]["name"] == "Ada"
    assert bob["state"]["current"] == "notebook:a.ipynb"
    # A stock Yjs client sees the users as declared too.
    viewer = await YClient.connect(f"{hub_presence.ws}/yjs/{room}?access_token=alice", echo=False)
    await viewer.until(
        lambda: {"Ada", "Bob"} <= {s.get("user", {}).get("name") for s in viewer.states.values()}
    )
    await viewer.ws.close()
    assert link.accepted and not any("refuse" in text for _, text in mirror_log())

    # The same token, in a room of alice's server gpu: refused (4403), logged once.
    other = hub_link(hub_presence, health, "alice/gpu:JupyterLab:globalAwareness", "alice-server")
    try:
        async with asyncio.timeout(10):
            while not health.refused:
                await asyncio.sleep(0.02)
    finally:
        other.close()
    warnings = [text for level, text in mirror_log() if level == logging.WARNING]
    assert len(warnings) == 1 and hub_presence.http in warnings[0]
    assert "(4403 this hub token mirrors alice/ only, not the server alice/gpu)" in warnings[0]
    # What alice's own token still may do there (her own server): enter as herself.
    gpu = await Client.connect(
        f"{hub_presence.ws}/rooms/alice/gpu:x", additional_headers={"Authorization": "token alice"}
    )
    assert gpu.user["name"] == owner.user["name"]
    await gpu.close()

    link.close()
    await owner.until(lambda _: not owner.members, timeout=5)  # the mirror left with its link
    await owner.close()


@e2e
async def test_on_a_hub_a_refused_mirror_logs_once_retries_and_resumes(
    hub_api: StandInHub,
    hub_presence: Server,
    mirror_log: Callable[[], list[tuple[int, str]]],
) -> None:
    # bob's server, before the hub gives its token the scope to use presence.
    hub_api.tokens["bob-server"] = hub_model("bob", f"{MIRROR_SCOPE}!server=bob/")
    hub_api.tokens["bob-server"]["scopes"].remove(ACCESS)
    waits: list[float] = []

    async def short(seconds: float) -> None:  # the links' waits, recorded but short
        waits.append(seconds)
        await asyncio.sleep(0.05)

    health = Health(hub_presence.http, logging.getLogger("test.mirror"), sleep=short)
    made = [
        hub_link(
            hub_presence, health, room_name(hub_scope("bob"), f"json:notebook:{i}"), "bob-server"
        )
        for i in range(3)
    ]
    for i, link in enumerate(made):
        link.set(1, summary(lab_state(f"Collaborator {i}")))
    async with asyncio.timeout(20):
        while len(waits) < 9:
            await asyncio.sleep(0.02)
    assert min(waits) >= 2.5, waits  # seconds to minutes, not the outages' 0.5 s
    assert max(waits) >= 5.0, waits  # growing
    lines = mirror_log()
    assert len(lines) == 1, lines
    assert "refuses the mirror (4403 this hub token has no access to the service" in lines[0][1]

    hub_api.tokens["bob-server"] = server_token_model("bob")  # the hub's roles fixed
    async with asyncio.timeout(20):
        while not all(link.accepted for link in made):
            await asyncio.sleep(0.02)
    texts = [text for _, text in mirror_log()]
    assert texts[1:] == [
        f"presence.jupyter: presence at {hub_presence.http} accepts the mirror again; "
        "mirroring resumed"
    ]
    assert not any("unreachable" in t or "is back" in t for t in texts)
    for link in made:
        link.close()
