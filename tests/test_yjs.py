"""The y-websocket endpoint against real servers, with pycrdt's Awareness as the client."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

import httpx
import orjson
import pytest
from pycrdt import create_awareness_message, write_var_uint

from harness.processes import RedisProcess
from presence.config import Settings
from presence.websocket import frames as ws
from presence.yjs.endpoint import YjsEndpoint
from tests.conftest import EXPIRING, FAST, Server
from tests.test_json_protocol import join
from tests.test_websocket_server import Frames, raw_connect
from tests.yjs_client import YClient

pytestmark = pytest.mark.e2e

ServerFactory = Callable[..., Server]


async def yjoin(
    server: Server,
    state: dict[str, object] | None = None,
    room: str = "doc",
    token: str | None = None,
    **kw: object,
) -> YClient:
    url = f"{server.ws}/yjs/{room}" + (f"?token={token}" if token else "")
    return await YClient.connect(url, state, **kw)  # type: ignore[arg-type]


def new_token(server: Server) -> str:
    """A fresh identity token, as an app gets one from ``GET /identity``."""
    token: str = httpx.get(f"{server.http}/identity").json()["token"]
    return token


def has(client: YClient, other: int, **fields: object) -> Callable[[], bool]:
    def check() -> bool:
        state = client.states.get(other)
        return state is not None and all(state.get(k) == v for k, v in fields.items())

    return check


def sees(client: YClient, other: int, state: dict[str, object]) -> Callable[[], bool]:
    """``other``'s state is exactly ``state``, plus the server's ``presence`` mark."""

    def check() -> bool:
        seen = dict(client.states.get(other) or {})
        return isinstance(seen.pop("presence", None), dict) and seen == state

    return check


async def closed_with(client: YClient) -> tuple[int, str]:
    """Wait for the server to close the client; the close code and reason it sent."""
    await asyncio.wait_for(asyncio.shield(client.reader), 5)
    rcvd = client.ws.protocol.close_rcvd
    assert rcvd is not None, "closed without a close frame"
    return rcvd.code, rcvd.reason


async def test_late_joiner_gets_the_full_awareness_and_updates_relay(server: Server) -> None:
    a = await yjoin(server, {"cursor": {"anchor": 1, "head": 2}})
    b = await yjoin(server, {"cursor": None})
    # b never asked (stock clients do not send query-awareness): the server pushed it.
    await b.until(has(b, a.id, cursor={"anchor": 1, "head": 2}))
    await a.until(has(a, b.id))
    for i in range(50):
        a.awareness.set_local_state_field("cursor", {"anchor": i, "head": i})
        await a.send_update([a.id])
    await b.until(has(b, a.id, cursor={"anchor": 49, "head": 49}))
    # The provider's sync step 1 got a step 2 (an empty update): it counts as synced.
    assert a.synced and b.synced


async def test_identity_is_injected_when_a_state_has_no_user(server: Server) -> None:
    a = await yjoin(server, {"cursor": None})
    b = await yjoin(server, {"user": {"name": "Ada", "color": "#123456"}})
    await b.until(has(b, a.id))
    user = b.states[a.id]["user"]
    assert user["name"].startswith("Anonymous ")
    assert user["color"].startswith("#") and user["colorLight"] == user["color"] + "33"
    assert {"initials", "display_name", "username"} <= set(user)
    # A client's own user is kept as it is.
    await a.until(has(a, b.id))
    assert a.states[b.id]["user"] == {"name": "Ada", "color": "#123456"}
    # The idle mark: every relayed state says whether its label should show.
    assert b.states[a.id]["presence"] == {"idle": False}
    await b.until(lambda: b.states[a.id]["presence"] == {"idle": True}, timeout=3)
    a.awareness.set_local_state_field("cursor", {"anchor": 3, "head": 3})
    await a.send_update([a.id])
    await b.until(lambda: b.states[a.id]["presence"] == {"idle": False})


async def test_anonymous_identities_can_be_enforced(server_factory: ServerFactory) -> None:
    server = server_factory(*FAST, "--yjs-anonymous")
    a = await yjoin(server, {"user": {"name": "Real Name", "color": "#123456"}})
    b = await yjoin(server, {})
    await b.until(has(b, a.id))
    assert b.states[a.id]["user"]["name"].startswith("Anonymous ")


async def test_clean_and_abrupt_disconnects_remove_states_at_once(server: Server) -> None:
    a = await yjoin(server, {"n": 1})
    b = await yjoin(server, {"n": 2})
    c = await yjoin(server, {"n": 3})
    await c.until(lambda: a.id in c.states and b.id in c.states)
    started = time.monotonic()
    await a.close()
    await c.until(lambda: a.id not in c.states, timeout=2)
    b.abort()  # no null state, no close frame
    await c.until(lambda: b.id not in c.states, timeout=2)
    assert time.monotonic() - started < 2


async def test_states_expire_when_not_renewed(server_factory: ServerFactory) -> None:
    server = server_factory(*EXPIRING)
    # expire_after is 2 s here (30 s by default, as y-protocols). a is a frozen client:
    # connected, silent, and deaf (a live stock client would re-assert its state when
    # told it was removed, as y-protocols does).
    a = await yjoin(server, {"n": 1}, echo=False)
    b = await yjoin(server, {"n": 2})
    await b.until(has(b, a.id))
    started = time.monotonic()
    # b renews its own state; a stays connected but silent.
    while a.id in b.states:
        b.awareness.set_local_state(b.awareness.get_local_state())
        await b.send_update([b.id])
        await asyncio.sleep(0.2)
        assert time.monotonic() - started < 6, "a never expired"
    assert 1.5 <= time.monotonic() - started <= 4
    # a's socket is still open: its next state brings it back.
    await a.set({"n": 10})
    await b.until(has(b, a.id, n=10))


async def test_a_lone_client_keeps_hearing_from_the_server(server_factory: ServerFactory) -> None:
    server = server_factory(*EXPIRING)
    a = await yjoin(server, {"n": 1})
    await a.until(lambda: len(a.received) >= 2)  # the sync reply and the room's awareness
    before, started = len(a.received), time.monotonic()
    # Renewals every expire_after / 2 (15 s by default; 1 s here).
    await a.until(lambda: len(a.received) - before >= 2, timeout=6)
    assert time.monotonic() - started >= 1


async def test_another_connection_cannot_update_or_remove_a_client(server: Server) -> None:
    a = await yjoin(server, {"who": "a"})
    b = await yjoin(server, {"who": "b"})
    mallory = await yjoin(server, {"who": "mallory"}, echo=False)
    await b.until(lambda: a.id in b.states and mallory.id in b.states)
    # mallory forges updates for a's client ID, with ever higher clocks, then a removal.
    for clock, state in ((100, '{"who":"mallory"}'), (200, "null")):
        update = (
            write_var_uint(1)
            + write_var_uint(a.id)
            + write_var_uint(clock)
            + write_var_uint(len(state))
            + state.encode()
        )
        await mallory.ws.send(create_awareness_message(update))
    # y-websocket#126: a connection that relays another client's removal must not take
    # it over either; mallory now closes and a must stay. Its forgeries came before its
    # close: whatever they caused reached b before mallory's removal did.
    await mallory.close()
    await b.until(lambda: mallory.id not in b.states)
    assert b.states[a.id]["who"] == "a"
    a.awareness.set_local_state_field("who", "still a")
    await a.send_update([a.id])
    await b.until(has(b, a.id, who="still a"))


async def test_no_connection_can_update_or_remove_a_json_member(server: Server) -> None:
    j = await join(server)
    await j.update(who="j")
    watcher = await yjoin(server, {"n": 0})
    mallory = await yjoin(server, {"who": "mallory"}, echo=False)
    await watcher.until(
        lambda: (
            mallory.id in watcher.states
            and any(s.get("who") == "j" for s in watcher.states.values())
        )
    )
    [jid] = [c for c, s in watcher.states.items() if s.get("who") == "j"]
    assert jid >= 2**32  # a JSON member's client ID
    held: list[dict[str, object] | None] = []  # j's state in the watcher, at every change
    watcher.awareness.observe(lambda topic, changes: held.append(watcher.states.get(jid)))
    # mallory forges a state for j's client ID, with a clock above any the server gave
    # out; a marker of its own (once the watcher has it, the forgery was handled and
    # relayed if it was going to be: one tick apart, they cannot cancel out)...
    forged = create_awareness_message(update_of(jid, 10**15, b'{"who":"mallory"}'))
    await mallory.ws.send(forged)
    await mallory.set({"who": "mallory", "marker": 1})
    await watcher.until(has(watcher, mallory.id, marker=1))
    # ...then a removal, and it leaves (its client IDs go null for everyone).
    await mallory.ws.send(create_awareness_message(update_of(jid, 10**15 + 1, b"null")))
    await mallory.close()
    await watcher.until(lambda: mallory.id not in watcher.states)
    # A marker from j: once the watcher and j have it, mallory's forgeries were handled.
    await j.update(who="still j")
    await watcher.until(has(watcher, jid, who="still j"))
    await j.until(
        lambda m: (
            m["type"] == "update" and any(u["state"].get("who") == "still j" for u in m["updates"])
        )
    )
    assert held and all(s is not None and s.get("who") != "mallory" for s in held), held
    assert set(j.members) == {f"y{watcher.id}"}


async def test_echoes_are_dropped_not_relayed(server_factory: ServerFactory) -> None:
    server = server_factory("--seed", "1")  # default timings: no idle marks or renewals
    a = await yjoin(server, {"n": 0})
    b = await yjoin(server, {"n": 0})  # echoes every update it receives, like stock clients
    c = await yjoin(server, {"n": 0}, echo=False)
    await c.until(lambda: a.id in c.states and b.id in c.states)

    async def marker(m: int) -> None:
        """b changes its state; once a and c have it, b's echoes sent before have been
        handled (one socket keeps its order), and relayed if they were going to be."""
        await b.set({"n": 0, "m": m})
        await a.until(has(a, b.id, m=m))
        await c.until(has(c, b.id, m=m))

    await marker(1)
    before = server.metrics()["presence_messages_out_total"]
    for i in range(1, 11):
        a.awareness.set_local_state_field("n", i)
        await a.send_update([a.id])
        await asyncio.sleep(0.05)
    await c.until(has(c, a.id, n=10))
    await b.until(has(b, a.id, n=10))
    await marker(2)
    sent = server.metrics()["presence_messages_out_total"] - before
    # Ten moves and a marker to two peers: at most 22 frames, whatever b echoes back.
    assert sent <= 22, sent
    # a never gets its own state back (it would adopt the server's clock and resend).
    assert a.id not in a.states


async def test_a_reconnecting_client_is_visible_at_once(server: Server) -> None:
    # Its app passes an identity token (the provider's params): the same URL reconnects.
    token = new_token(server)
    a = await yjoin(server, {"n": 1}, token=token)
    b = await yjoin(server, {"n": 2})
    await b.until(has(b, a.id))
    a.abort()
    await b.until(lambda: a.id not in b.states)
    # Same client ID and the same clock as before the drop, as a stock client resends.
    again = await yjoin(server, None, token=token, client_id=a.id)
    again.awareness._meta[a.id] = dict(a.awareness._meta[a.id])
    again.awareness._states[a.id] = {"n": 1}
    await again.send_update([a.id])
    await b.until(has(b, a.id, n=1), timeout=2)
    # ...and bound to its new socket: its next abrupt drop is announced too.
    again.abort()
    await b.until(lambda: a.id not in b.states, timeout=2)


async def test_json_and_yjs_members_see_each_other(server: Server) -> None:
    y = await yjoin(server, {"cursor": {"anchor": 5, "head": 5}})
    j = await join(server)
    # The Yjs member in the JSON snapshot: member "y<clientID>" with identity and state.
    [ym] = j.welcome["members"]
    assert ym["id"] == f"y{y.id}"
    assert ym["state"] == {"cursor": {"anchor": 5, "head": 5}}
    assert ym["user"]["name"].startswith("Anonymous ")
    # The JSON member in Yjs awareness: its own client ID, its user, its state.
    await j.update(cursor={"x": 1, "y": 2})
    await y.until(lambda: any(s.get("cursor") == {"x": 1, "y": 2} for s in y.states.values()))
    [(client_id, state)] = y.states.items()
    assert client_id >= 2**32
    assert state["user"]["name"] == j.user["name"]
    assert state["user"]["color"] == j.user["color"]
    # Updates and leave cross in both directions.
    y.awareness.set_local_state_field("cursor", {"anchor": 9, "head": 9})
    await y.send_update([y.id])
    await j.until(lambda m: j.members[f"y{y.id}"]["state"]["cursor"] == {"anchor": 9, "head": 9})
    await j.close()
    await y.until(lambda: client_id not in y.states)
    await y.close()


async def test_query_awareness_returns_everything(server: Server) -> None:
    a = await yjoin(server, {"n": 1})
    b = await yjoin(server, {"n": 2}, echo=False)
    await b.until(has(b, a.id))
    b.awareness._states.pop(a.id)
    b.awareness._meta.pop(a.id)
    await b.ws.send(write_var_uint(3))
    await b.until(has(b, a.id, n=1))


async def test_across_two_replicas(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1 = server_factory(*FAST, "--redis-url", redis_server.url)
    r2 = server_factory(*FAST, "--redis-url", redis_server.url)
    a = await yjoin(r1, {"n": 1})
    b = await yjoin(r2, {"n": 2})
    await b.until(has(b, a.id, n=1))
    await a.until(has(a, b.id, n=2))
    j = await join(r2)
    assert {m["id"] for m in j.welcome["members"]} == {f"y{a.id}", f"y{b.id}"}
    # Controlled IDs hold across replicas: a connection on r2 cannot touch a's ID.
    update = (
        write_var_uint(1)
        + write_var_uint(a.id)
        + write_var_uint(10**6)
        + write_var_uint(4)
        + b"null"
    )
    await b.ws.send(create_awareness_message(update))
    a.awareness.set_local_state_field("n", 3)
    await a.send_update([a.id])
    await b.until(has(b, a.id, n=3))
    a.abort()
    await b.until(lambda: a.id not in b.states, timeout=3)


async def test_null_fields_reach_yjs_peers_as_set_and_json_peers_without_them(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    # y-codemirror sets cursor: null when its editor loses focus; it must not vanish.
    r1 = server_factory(*FAST, "--redis-url", redis_server.url)
    r2 = server_factory(*FAST, "--redis-url", redis_server.url)
    owners = {"user": {"name": "Ada", "color": "#123456"}, "cursor": None, "x": 1}
    a = await yjoin(r1, owners)
    b = await yjoin(r1, {"n": 1})
    far = await yjoin(r2, {"n": 2})  # on another replica
    await b.until(sees(b, a.id, owners))
    await far.until(sees(far, a.id, owners))
    j, jfar = await join(r1), await join(r2)
    assert j.members[f"y{a.id}"]["state"] == {"user": owners["user"], "x": 1}
    # A field that becomes null, and one that stops being null.
    for state in (
        {**owners, "cursor": {"anchor": 1, "head": 2}},
        {**owners, "cursor": None, "selection": None},
        {"user": owners["user"], "selection": {"anchor": 3}, "x": 2},
    ):
        await a.set(state)
        await b.until(sees(b, a.id, state))
        await far.until(sees(far, a.id, state))
        json_state = {k: v for k, v in state.items() if v is not None}
        for c in (j, jfar):
            await c.until(lambda m, c=c, s=json_state: c.members[f"y{a.id}"]["state"] == s)  # type: ignore[misc]
    # JSON peers, on both replicas, got each change as an update (an app that listens for
    # "update" drops the cursor when y-codemirror blurs): a null field is a removal.
    for c in (j, jfar):
        messages = [m for _, m in c.log[1:]]
        joins = [n["id"] for m in messages if m["type"] == "join" for n in m["members"]]
        assert f"y{a.id}" not in joins, messages
        updates = [u["state"] for m in messages if m["type"] == "update" for u in m["updates"]]
        assert {"cursor": None, "selection": None} in updates, updates
    # From JSON to Yjs: a JSON null removes the field, so Yjs peers see no such field.
    await j.update(cursor={"x": 1, "y": 2}, tool="pen")
    await b.until(lambda: any(s.get("cursor") == {"x": 1, "y": 2} for s in b.states.values()))
    [jid] = [c for c, s in b.states.items() if s.get("tool") == "pen"]
    await j.update(cursor=None)
    await b.until(lambda: "cursor" not in b.states[jid] and b.states[jid]["tool"] == "pen")


async def test_states_beyond_the_rate_limit_merge_into_the_latest_whole_state(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(*FAST, "--rate-limit", "2")
    user = {"name": "Ada", "color": "#123456"}
    a = await yjoin(server, {"user": user, "n": 0, "drop": 0}, echo=False)
    b = await yjoin(server, {"n": 0})
    await b.until(sees(b, a.id, {"user": user, "n": 0, "drop": 0}))
    # A burst: two states pass at once (the bucket holds 2), the rest wait and merge.
    # The last one has no "drop": a whole state replaces, it does not patch.
    burst = [{"user": user, "n": i, "drop": i} for i in range(1, 5)] + [{"user": user, "n": 5}]
    for state in burst:
        await a.set(state)
    await b.until(sees(b, a.id, {"user": user, "n": 5}), timeout=5)
    assert server.metrics()["presence_updates_coalesced_total"] >= 2


# -- bad input -------------------------------------------------------------------------


def update_of(client_id: int, clock: int, state: bytes) -> bytes:
    """An awareness update of one entry, written by hand."""
    return (
        write_var_uint(1)
        + write_var_uint(client_id)
        + write_var_uint(clock)
        + write_var_uint(len(state))
        + state
    )


async def room_still_works(server: Server) -> None:
    a = await yjoin(server, {"ok": 1}, room="healthy")
    b = await yjoin(server, {"ok": 2}, room="healthy")
    await b.until(has(b, a.id, ok=1))


@pytest.mark.parametrize(
    "payload,code",
    [
        (b"\x01\x85", 1007),  # truncated varint
        (b"\x01\x05\x01", 1007),  # length past the end
        (b"\x01\x04\x01\xff\xff\xff", 1007),  # entry truncated
        (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 1007),  # varint too long
        (b"\x07\x00", 1003),  # unknown message type
    ],
)
async def test_malformed_messages_close_with_a_reason(
    server: Server, payload: bytes, code: int
) -> None:
    peer = await yjoin(server, {"n": 0})
    bad = await yjoin(server, {"n": 1}, echo=False)
    await peer.until(has(peer, bad.id))
    await bad.ws.send(payload)
    got, reason = await closed_with(bad)
    assert got == code and reason
    # Its client ID goes with it; the others carry on.
    await peer.until(lambda: bad.id not in peer.states)
    await room_still_works(server)


async def test_bad_states_and_old_clocks_are_ignored(server: Server) -> None:
    a = await yjoin(server, {"n": 5}, echo=False)
    b = await yjoin(server, {"n": 0})
    await b.until(has(b, a.id, n=5))
    clock = a.awareness.meta[a.id]["clock"]
    for c, state in (
        (clock + 1, b"{not json"),
        (clock + 2, b"[1,2]"),
        (clock - 1, b'{"n":-1}'),
        (clock, b'{"n":-2}'),
    ):
        update = (
            write_var_uint(1)
            + write_var_uint(a.id)
            + write_var_uint(c)
            + write_var_uint(len(state))
            + state
        )
        await a.ws.send(create_awareness_message(update))
    a.awareness.set_local_state_field("n", 6)
    a.awareness._meta[a.id]["clock"] = clock + 5
    await a.send_update([a.id])
    await b.until(has(b, a.id, n=6))
    m = server.metrics()
    assert m['presence_protocol_errors_total{code="invalid_state"}'] == 2


async def test_text_frames_and_huge_messages_are_refused(server: Server) -> None:
    a = await yjoin(server, {"n": 1}, echo=False)
    await a.ws.send("hello")
    assert (await closed_with(a))[0] == 1003
    # A frame that says it is larger than the Yjs limit is refused from its header:
    # the client need not send it (a library client sending it whole may see the
    # connection reset before it reads the close frame).
    sock = raw_connect(server, "/yjs/doc")
    length = YjsEndpoint.max_message_bytes(Settings()) + 1
    sock.sendall(bytes([0x82, 0xFF]) + struct.pack("!Q", length) + b"\0\0\0\0" + b"\0" * 64)
    frames = Frames(sock)
    frame = frames.next()
    while frame is not None and frame[0] != ws.CLOSE:  # the room's state, sent on connect
        frame = frames.next()
    assert frame is not None and ws.parse_close(frame[1])[0] == 1009
    sock.close()
    await room_still_works(server)


async def test_non_ascii_states_round_trip(server: Server) -> None:
    a = await yjoin(server, {"n": 1}, echo=False)
    b = await yjoin(server, {"n": 1})
    # Written by hand: pycrdt's Encoder counts characters, not bytes, in varString.
    state = '{"name":"Zoë ✓"}'.encode()
    clock = a.awareness.meta[a.id]["clock"] + 1
    update = (
        write_var_uint(1)
        + write_var_uint(a.id)
        + write_var_uint(clock)
        + write_var_uint(len(state))
        + state
    )
    await a.ws.send(create_awareness_message(update))
    await b.until(has(b, a.id, name="Zoë ✓"))


async def test_half_open_connection_is_found_by_pings(server_factory: ServerFactory) -> None:
    # A laptop lid closes: no FIN, no close frame, no answer to pings.
    server = server_factory("--seed", "1", "--ping-interval", "1")
    a = await yjoin(server, {"n": 1}, echo=False)
    b = await yjoin(server, {"n": 2})
    await b.until(has(b, a.id))
    a.ws.transport.pause_reading()
    started = time.monotonic()
    await b.until(lambda: a.id not in b.states, timeout=6)
    # One ping interval to send the ping, one to wait for the pong.
    assert time.monotonic() - started <= 4


async def test_one_connection_cannot_fill_a_room_with_client_ids(server: Server) -> None:
    flood = await yjoin(server, None, echo=False)
    watcher = await yjoin(server, {"n": 0})
    for client_id in range(1000, 1050):
        state = b'{"spam":1}'
        update = (
            write_var_uint(1)
            + write_var_uint(client_id)
            + write_var_uint(1)
            + write_var_uint(len(state))
            + state
        )
        await flood.ws.send(create_awareness_message(update))
    await watcher.until(lambda: len(watcher.states) >= 8)
    # A marker: once the watcher has this, the flood before it has been handled.
    await flood.ws.send(create_awareness_message(update_of(1000, 2, b'{"spam":2}')))
    await watcher.until(has(watcher, 1000, spam=2))
    assert len(watcher.states) == 8
    # A self-declared user cannot pass for a server-issued identity.
    j = await join(server, room="other")
    mimic = await yjoin(
        server, {"user": {"name": "Twin", "username": j.user["username"]}}, room="other"
    )
    await j.until(lambda m: f"y{mimic.id}" in j.members)
    assert j.members[f"y{mimic.id}"]["user"]["username"] == "yjs:" + j.user["username"]


async def test_a_late_echo_does_not_adopt_a_departed_client(server: Server) -> None:
    # Stock clients send back every state they receive; one may arrive after its owner
    # left. It must not make the echoing connection the owner of that client ID.
    y = await yjoin(server, {"n": 1}, echo=False)
    watcher = await yjoin(server, {"n": 2}, echo=False)
    j = await join(server)
    await j.update(cursor={"x": 1, "y": 1})
    await y.until(lambda: any(s.get("cursor") for s in y.states.values()))
    [(client_id, state)] = [(c, s) for c, s in y.states.items() if s.get("cursor")]
    clock = y.awareness.meta[client_id]["clock"]
    await j.close()
    await watcher.until(lambda: client_id not in watcher.states)
    body = orjson.dumps(state)
    update = (
        write_var_uint(1)
        + write_var_uint(client_id)
        + write_var_uint(clock)
        + write_var_uint(len(body))
        + body
    )
    await y.ws.send(create_awareness_message(update))
    # A marker from y: once the watcher has it, the echo before it has been handled.
    await y.set({"n": 2})
    await watcher.until(has(watcher, y.id, n=2))
    assert client_id not in watcher.states
    late = await join(server)
    assert {m["id"] for m in late.welcome["members"]} == {f"y{y.id}", f"y{watcher.id}"}


async def test_a_stock_client_echoing_a_big_rooms_snapshot_is_not_closed(server: Server) -> None:
    # Stock providers send every change they receive back in one message: a joiner's
    # echo of its snapshot holds the whole room (here over 16 KiB, max_message_bytes).
    # It was closed with 1009 and reconnected in a loop (the lecture hall of issue 14).
    others = [await yjoin(server, {"pad": "x" * 200, "i": i}, echo=False) for i in range(80)]
    late = await yjoin(server, {"who": "late"})  # echoes, like a stock provider
    await late.until(lambda: len(late.states) == 80, timeout=10)
    await others[0].set({"pad": "y", "i": 0})
    await late.until(has(late, others[0].id, pad="y"), timeout=5)
    assert late.ws.close_code is None
    assert sum(len(m) for m in late.received) > 16 * 1024  # the snapshot it echoed
    for client in (*others, late):
        await client.close()
