"""The stock JavaScript client against a real server: the npm ``y-websocket`` provider,
v3 and v1, with ``yjs`` and ``y-protocols`` (versions locked in tests/js/package-lock.json),
driven through tests/js/peers.mjs. One Node process and one server serve the module; each
test has its own room, and runs once per provider version."""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server

pytestmark = pytest.mark.e2e

JS = Path(__file__).resolve().parent / "js"
OWNERS = {"user": {"name": "Ada", "color": "#123456"}, "cursor": None, "x": 1}


NODE_MIN = 18


def node_and_packages() -> str:
    """Node, with the locked packages installed (once, from the lockfile). A missing or
    too old Node fails the tests: they are part of the suite, not optional."""
    node, npm = shutil.which("node"), shutil.which("npm")
    install = "(Debian: apt-get install nodejs npm; or run scripts/install-test-deps.sh)"
    if node is None or npm is None:
        pytest.fail(
            f"the stock Yjs client tests need Node.js {NODE_MIN} or later and npm: install "
            f"them {install}",
            pytrace=False,
        )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    major = version.lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < NODE_MIN:
        pytest.fail(
            f"the stock Yjs client tests need Node.js {NODE_MIN} or later; {node} is "
            f"{version or 'of an unknown version'}: install a newer one {install}",
            pytrace=False,
        )
    installed = JS / "node_modules" / ".package-lock.json"
    lock = JS / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(
            [npm, "ci"], cwd=JS, timeout=600, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            pytest.fail(
                f"npm ci in {JS} failed (exit {done.returncode}):\n{done.stderr[-4000:]}",
                pytrace=False,
            )
    return node


class Node:
    """The driver process: one JSON command per line in, one reply per line out."""

    def __init__(self, node: str) -> None:
        self.proc = subprocess.Popen(
            [node, "peers.mjs"],
            cwd=JS,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.replies: queue.Queue[str] = queue.Queue()
        self.stderr: deque[str] = deque(maxlen=50)  # its last words, for a failure
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.next_id = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.replies.put(line)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _exited(self, cmd: str) -> AssertionError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(1)  # its stderr is read to the end
        return AssertionError(
            f"{cmd}: the Node driver exited (code {self.proc.returncode}):\n" + "".join(self.stderr)
        )

    def __call__(self, cmd: str, *, reply_within: float = 15, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        if self.proc.poll() is not None:
            raise self._exited(cmd)
        self.next_id += 1
        try:
            self.proc.stdin.write(json.dumps({"id": self.next_id, "cmd": cmd, **args}) + "\n")
        except BrokenPipeError:
            raise self._exited(cmd) from None
        deadline = time.monotonic() + reply_within
        while True:
            try:
                line = self.replies.get(timeout=0.1)
                break
            except queue.Empty:
                if self.proc.poll() is not None and self.replies.empty():
                    raise self._exited(cmd) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no reply to {cmd} from the Node driver") from None
        reply: dict[str, Any] = json.loads(line)
        assert reply["id"] == self.next_id, reply
        if not reply["ok"]:
            raise AssertionError(f"{cmd}: {reply['error']}")
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()  # the driver destroys its providers and exits
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def yserver() -> Iterator[Server]:
    # Default timings (idle 3 s, expiry 30 s, renewals every 15 s), as stock clients
    # expect: they renew their own state every 15 s only.
    server = Server(["--seed", "1"]).start()
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def node(yserver: Server) -> Iterator[Node]:
    driver = Node(node_and_packages())
    yield driver
    driver.close()


@dataclass
class Room:
    """One test's providers, all of one y-websocket version, in a room of their own."""

    node: Node
    server: Server
    version: str
    name: str = field(default_factory=lambda: f"js-{uuid.uuid4().hex[:12]}")
    ids: dict[str, int] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)  # providers to destroy at the end

    def connect(
        self, peer: str, state: dict[str, Any] | None = None, *, token: str | None = None
    ) -> int:
        args: dict[str, Any] = {} if state is None else {"state": state}
        if token is not None:
            args["params"] = {"token": token}  # the provider's params: its URL's query
        url = f"{self.server.ws}/yjs"
        reply = self.node(
            "connect", peer=self._p(peer), version=self.version, url=url, room=self.name, **args
        )
        self.ids[peer] = reply["clientID"]
        self.live.add(peer)
        return self.ids[peer]

    def set(self, peer: str, state: dict[str, Any] | None) -> None:
        self.node("set", peer=self._p(peer), state=state)

    def wait(self, expect: dict[str, dict[int, Any]], timeout: float = 5) -> None:
        """Until each peer holds exactly these states (None: no state) plus server fields."""
        expect_ = {self._p(p): {str(c): s for c, s in e.items()} for p, e in expect.items()}
        self.node("wait", expect=expect_, timeout=timeout, reply_within=timeout + 10)

    def states(self, peer: str) -> dict[int, dict[str, Any]]:
        states = self.node("states", peer=self._p(peer))["states"]
        return {int(c): s for c, s in states.items()}

    def log(self, peer: str) -> list[tuple[str, int]]:
        return [(sign, c) for sign, c in self.node("log", peer=self._p(peer))["log"]]

    def disconnect(self, peer: str) -> None:
        self.node("disconnect", peer=self._p(peer))
        self.live.discard(peer)

    def terminate(self, peer: str, *, reconnect: bool) -> None:
        self.node("terminate", peer=self._p(peer), reconnect=reconnect)

    def json_members(self) -> dict[str, dict[str, Any]]:
        """The room as JSON clients see it (GET /rooms/{room})."""
        members = httpx.get(f"{self.server.http}/rooms/{self.name}").json()["members"]
        return {m["id"]: m for m in members}

    def _p(self, peer: str) -> str:
        return f"{self.name}/{peer}"


@pytest.fixture(params=["v3", "v1"])
def room(request: pytest.FixtureRequest, node: Node, yserver: Server) -> Iterator[Room]:
    r = Room(node, yserver, request.param)
    yield r
    for peer in list(r.live):
        r.disconnect(peer)


def test_null_fields_reach_the_other_client_exactly(room: Room) -> None:
    # y-codemirror sets cursor: null when its editor loses focus; clients set it on purpose.
    a = room.connect("a", OWNERS)
    b = room.connect("b")  # the provider's own initial state: {}
    room.wait({"b": {a: OWNERS}})
    for state in (
        {**OWNERS, "cursor": {"anchor": 1, "head": 2}},
        {**OWNERS, "selection": None},
        {"x": 2, "user": OWNERS["user"]},
        OWNERS,
    ):
        room.set("a", state)
        room.wait({"b": {a: state}})
    # JSON clients see the translation: a null field is no field.
    assert room.json_members()[f"y{a}"]["state"] == {"user": OWNERS["user"], "x": 1}
    # A state without a user gets the member's identity, as the only addition.
    seen = room.states("a")[b]
    assert seen["user"]["name"].startswith("Anonymous ") and set(seen) == {"user", "presence"}


def test_a_late_joiner_gets_everybodys_state_without_asking(room: Room) -> None:
    a = room.connect("a", {"n": 1, "cursor": None})
    b = room.connect("b", {"n": 2})
    room.wait({"a": {b: {"n": 2}}, "b": {a: {"n": 1, "cursor": None}}})
    c = room.connect("c", {"n": 3})
    room.wait({"c": {a: {"n": 1, "cursor": None}, b: {"n": 2}}, "a": {c: {"n": 3}}})


def leaves_at_once(room: Room, how: str) -> None:
    a = room.connect("a", {"n": 1})
    b = room.connect("b", {"n": 2})
    c = room.connect("c", {"n": 3})
    room.wait({"b": {a: {"n": 1}, c: {"n": 3}}, "c": {a: {"n": 1}, b: {"n": 2}}})
    started = time.monotonic()
    if how == "clean":
        room.disconnect("a")  # a null state, then a close frame
    else:
        room.terminate("a", reconnect=False)  # no null state, no close frame
    room.wait({"b": {a: None}, "c": {a: None}}, timeout=2)
    assert time.monotonic() - started < 2
    # Stock clients send the removal they received back to the server. A marker from c:
    # once b has it, those copies were handled, and a must still be gone.
    room.set("c", {"n": 3, "marker": 1})
    room.wait({"b": {a: None, c: {"n": 3, "marker": 1}}})
    assert set(room.json_members()) == {f"y{b}", f"y{c}"}


def test_a_clean_leave_is_seen_at_once(room: Room) -> None:
    leaves_at_once(room, "clean")


def test_an_abrupt_leave_is_seen_at_once(room: Room) -> None:
    leaves_at_once(room, "abrupt")


def test_a_client_that_reconnects_is_seen_again_at_once(room: Room) -> None:
    # Its app passes an identity token: the client ID is reserved for it after a drop.
    token = httpx.get(f"{room.server.http}/identity").json()["token"]
    a = room.connect("a", OWNERS, token=token)
    b = room.connect("b", {"n": 2})
    room.wait({"a": {b: {"n": 2}}, "b": {a: OWNERS}})
    room.log("a"), room.log("b")
    started = time.monotonic()
    # The network blips: the provider reconnects by itself with the same client ID and
    # the same state and clock.
    room.terminate("a", reconnect=True)
    room.wait({"a": {b: {"n": 2}}, "b": {a: OWNERS}}, timeout=3)
    assert time.monotonic() - started < 3
    # Each saw the other go (a clears remote states when its socket closes) and come back.
    assert room.log("b") == [("-", a), ("+", a)]
    assert room.log("a") == [("-", b), ("+", b)]
    # Still bound to its new socket: a clean leave now is seen at once.
    room.disconnect("a")
    room.wait({"b": {a: None}}, timeout=2)


def test_fifty_clients_in_one_room(room: Room) -> None:
    echoes = room.server.metrics().get("presence_yjs_echoes_total", 0)
    names = [f"p{i}" for i in range(50)]
    ids = {name: room.connect(name, {"n": i, "cursor": None}) for i, name in enumerate(names)}
    everybody = {name: {"n": i, "cursor": None} for i, name in enumerate(names)}
    room.wait(
        {p: {ids[o]: everybody[o] for o in names if o != p} for p in names},
        timeout=20,
    )
    # The providers sent back what they were sent, byte for byte: recognised undecoded.
    assert room.server.metrics()["presence_yjs_echoes_total"] - echoes >= len(names)
    room.set("p0", {"n": 0, "cursor": {"anchor": 5, "head": 5}})
    room.wait({p: {ids["p0"]: {"n": 0, "cursor": {"anchor": 5, "head": 5}}} for p in names[1:]})
    # Half leave cleanly, half abruptly: p0 sees each of them go.
    for i, name in enumerate(names[1:]):
        if i % 2:
            room.disconnect(name)
        else:
            room.terminate(name, reconnect=False)
    room.wait({"p0": {ids[o]: None for o in names[1:]}}, timeout=10)
    assert set(room.json_members()) == {f"y{ids['p0']}"}
