"""End to end: a real server process, real WebSocket clients, the JSON protocol."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.conftest import ARTIFACTS, EXPIRING, Client, Server

pytestmark = pytest.mark.e2e


async def join(server: Server, room: str = "doc", token: str | None = None, **kw: object) -> Client:
    url = f"{server.ws}/rooms/{room}" + (f"?token={token}" if token else "")
    return await Client.connect(url, **kw)


async def closed_with(client: Client, timeout: float = 5) -> tuple[int, str]:
    """Read until the server closes; the close code and reason."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await client.recv(timeout)
    rcvd = info.value.rcvd
    assert rcvd is not None, "closed without a close frame"
    return rcvd.code, rcvd.reason


def is_type(kind: str):  # type: ignore[no-untyped-def]
    return lambda m: m["type"] == kind


async def test_two_members_see_each_others_cursors(server: Server) -> None:
    a = await join(server)
    b = await join(server)
    assert b.welcome["members"][0]["id"] == a.id
    await a.until(lambda m: m["type"] == "join" and m["members"][0]["id"] == b.id)
    assert a.user["name"] != b.user["name"]
    assert a.user["color"] != b.user["color"]

    await a.update(cursor={"x": 10, "y": 20})
    await b.until(lambda m: m["type"] == "update" and b.members[a.id]["state"].get("cursor"))
    assert b.members[a.id]["state"]["cursor"] == {"x": 10, "y": 20}
    await b.update(cursor={"x": 1, "y": 2}, selection={"anchor": 3, "head": 7})
    await a.until(lambda m: b.id in a.members and "selection" in a.members[b.id]["state"])
    assert a.members[b.id]["state"] == {
        "cursor": {"x": 1, "y": 2},
        "selection": {"anchor": 3, "head": 7},
    }
    # Setting a field to null removes it.
    await b.update(selection=None)
    await a.until(lambda m: "selection" not in a.members[b.id]["state"])
    await a.close()
    await b.close()


async def test_fragmented_messages_pings_and_a_clean_close(server: Server) -> None:
    a = await join(server)
    b = await join(server)
    # One update sent as three fragments, with the client's ping in between.
    fragments = ['{"type": "update", ', '"state": {"cursor": ', '{"x": 5, "y": 6}}}']
    await asyncio.gather(a.ws.send(iter(fragments)), a.ws.ping())
    await b.until(lambda m: a.id in b.members and b.members[a.id]["state"].get("cursor"))
    assert b.members[a.id]["state"]["cursor"] == {"x": 5, "y": 6}
    # Answered: websockets resolves the ping only on a pong with the same payload.
    await asyncio.wait_for(await a.ws.ping(b"are you there"), 5)
    await a.ws.close(1000, "bye")
    assert a.ws.close_code == 1000  # the server answered the closing handshake
    await b.until(lambda m: a.id not in b.members)


async def test_each_members_updates_arrive_in_order(server: Server) -> None:
    a = await join(server)
    b = await join(server)
    n = 200
    for i in range(n):
        await a.update(cursor={"x": i, "y": 0})
    seen: list[int] = []
    await b.until(
        lambda m: (
            m["type"] == "update"
            and bool(
                [seen.append(u["state"]["cursor"]["x"]) for u in m["updates"] if u["id"] == a.id]
            )
            and seen[-1] == n - 1
        ),
        timeout=10,
    )
    assert seen == sorted(seen), "updates of one member went out of order"
    assert b.members[a.id]["state"]["cursor"]["x"] == n - 1


async def test_late_joiner_snapshot(server: Server) -> None:
    a = await join(server)
    b = await join(server)
    await a.update(cursor={"x": 1, "y": 1}, tool="pen")
    await b.update(cursor={"x": 2, "y": 2})
    await a.until(lambda m: b.id in a.members and a.members[b.id]["state"])
    c = await join(server)
    snapshot = {m["id"]: m for m in c.welcome["members"]}
    assert snapshot[a.id]["state"] == {"cursor": {"x": 1, "y": 1}, "tool": "pen"}
    assert snapshot[b.id]["state"] == {"cursor": {"x": 2, "y": 2}}
    assert snapshot[a.id]["user"]["name"] == a.user["name"]
    assert c.welcome["timing"] == {
        "idle_after": 0.5,
        "expire_after": 6.0,
        "heartbeat_interval": pytest.approx(2.0),
    }
    # Snapshot plus the events after it equals what an earlier member sees.
    await a.update(cursor={"x": 5, "y": 5})
    await b.close()
    await c.until(lambda m: b.id not in c.members and c.members[a.id]["state"]["cursor"]["x"] == 5)
    await a.until(lambda m: b.id not in a.members)
    # Everyone now agrees on the room: a (moved, with its tool) and c.
    assert {k: v["state"] for k, v in c.members.items()} == {
        a.id: {"cursor": {"x": 5, "y": 5}, "tool": "pen"}
    }
    assert {k: v["state"] for k, v in a.members.items()} == {c.id: {}}


async def test_idle_then_active_then_expiry_at_configured_times(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(*EXPIRING)
    a = await join(server)
    b = await join(server)
    await a.update(cursor={"x": 1, "y": 1})
    sent = time.monotonic()
    await b.until(lambda m: m["type"] == "idle" and a.id in m["ids"], timeout=5)
    idle_after = time.monotonic() - sent
    # idle_after is 0.5 s: never early; late by at most a second of scheduling slack
    # (the sweep runs every 50 ms; timing itself is tested by the clock in test_hub.py).
    print(f"idle after {idle_after:.3f} s")
    assert 0.45 <= idle_after <= 1.5, idle_after
    await a.update(cursor={"x": 2, "y": 2})
    await b.until(lambda m: m["type"] == "active" and a.id in m["ids"])
    assert b.members[a.id]["idle"] is False

    # a stops sending; b keeps heartbeating. a is removed after expire_after (2 s).
    last = time.monotonic()
    while True:
        await b.send({"type": "heartbeat"})
        try:
            await b.until(lambda m: m["type"] == "leave" and a.id in m["ids"], timeout=0.3)
            break
        except TimeoutError:
            assert time.monotonic() - last < 6, "member never expired"
    expired_after = time.monotonic() - last
    print(f"expired after {expired_after:.3f} s")
    assert 1.9 <= expired_after <= 3.5, expired_after  # expire_after is 2 s
    assert a.id not in b.members
    # The expired member's own connection is closed with a reason.
    code, reason = await closed_with(a)
    assert code == 4001 and "expired" in reason
    # b heartbeated, so b is still there for a newcomer.
    c = await join(server)
    assert [m["id"] for m in c.welcome["members"]] == [b.id]


async def test_clean_disconnect_gives_leave_at_once(server: Server) -> None:
    a = await join(server)
    b = await join(server)
    await a.close()
    # Within 2 s, where only expiry (6 s here) would remove a member that vanished.
    await b.until(lambda m: m["type"] == "leave" and a.id in m["ids"], timeout=2)


async def test_reconnect_with_token_keeps_name_and_colour(server: Server) -> None:
    a = await join(server)
    token, user = a.welcome["token"], a.user
    await a.close()
    again = await join(server, token=token)
    assert again.user == user
    assert again.id != a.id
    # The same identity twice at once (two tabs): the name gets the smallest change, and
    # the twin its own colour and initials, so that the two can be told apart.
    twin = await join(server, token=token)
    assert twin.user["name"] == user["name"] + " 2"
    assert twin.user["username"] == user["username"]
    assert twin.user["color"] != user["color"] and twin.user["initials"] != user["initials"]
    # When the first one leaves, the twin gets it all back (a join of its own id).
    await again.close()
    await twin.until(lambda m: twin.user["name"] == user["name"])
    assert twin.user == user
    # The identity is room-independent, and replicas with the same secret accept it.
    elsewhere = await join(server, room="other", token=token)
    assert elsewhere.user == user


async def test_identity_endpoint_matches_jupyter_shape(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http) as http:
        body = (await http.get("/identity")).json()
        identity = body["identity"]
        for key in ("username", "name", "display_name", "initials", "avatar_url", "color"):
            assert key in identity
        assert identity["name"].startswith("Anonymous ")
        same = (await http.get("/identity", params={"token": body["token"]})).json()
        assert same["identity"] == identity
        bad = await http.get("/identity", params={"token": body["token"][:-3] + "AAA"})
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_token"
    a = await join(server, token=body["token"])
    assert a.user == identity


async def test_health_readiness_and_metrics(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).json()["ready"] is True
    a = await join(server)
    b = await join(server)
    await a.update(cursor={"x": 1})
    await b.until(is_type("update"))
    m = server.metrics()
    assert m['presence_sessions{protocol="json"}'] == 2
    assert m["presence_rooms"] == 1
    assert m["presence_members"] == 2
    assert m["presence_messages_in_total"] >= 1
    assert m["presence_messages_out_total"] >= 4


async def test_empty_rooms_are_freed_after_churn(server: Server) -> None:
    for i in range(30):
        c = await join(server, room=f"churn-{i % 5}")
        await c.update(cursor={"x": i})
        await c.close()
    for _ in range(50):
        m = server.metrics()
        if m["presence_rooms"] == 0:
            break
        await asyncio.sleep(0.05)
    assert m["presence_rooms"] == 0 and m["presence_members"] == 0
    assert m['presence_sessions{protocol="json"}'] == 0


async def test_rate_limit_coalesces_excess_updates(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--rate-limit", "5", "--seed", "2")
    a = await join(server)
    b = await join(server)
    for i in range(100):
        await a.update(cursor={"x": i, "y": i}, **{f"f{i % 3}": i})
    await b.until(
        lambda m: a.id in b.members and b.members[a.id]["state"].get("cursor", {}).get("x") == 99,
        timeout=10,
    )
    # The final state is exact, every field included...
    assert b.members[a.id]["state"] == {"cursor": {"x": 99, "y": 99}, "f0": 99, "f1": 97, "f2": 98}
    # ...but far fewer updates reached the peer than were sent.
    frames = [m for _, m in b.log if m["type"] == "update"]
    assert len(frames) < 20
    assert server.metrics()["presence_updates_coalesced_total"] > 50


async def test_sigterm_closes_clients_with_1012(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--seed", "3")
    a = await join(server)
    server.stop()
    code, _reason = await closed_with(a)
    assert code == 1012
    # uvicorn re-raises SIGTERM after its graceful shutdown, as supervisors expect.
    assert server.proc is not None and server.proc.returncode in (0, -signal.SIGTERM)
    assert b"presence stopped" in (ARTIFACTS / f"server-{server.port}.log").read_bytes()


async def test_slow_client_is_closed_with_1013_and_others_keep_going(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(
        "--slow-client-timeout",
        "1",
        "--rate-limit",
        "1000",
        "--max-state-bytes",
        "16384",
        "--seed",
        "4",
    )
    # A client that stops reading: tiny receive buffers so that the server's sends stall.
    slow = await join(server, max_queue=1, max_size=2**20)
    slow.ws.transport.pause_reading()  # type: ignore[attr-defined]
    fast = await join(server)
    writer = await join(server)
    payload = "x" * 8000
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < 30 and slow.id in fast.members:
        i += 1
        await writer.update(cursor={"x": i}, blob=payload + str(i))
        # The others never stop receiving: each update reaches fast while slow is stuck.
        await fast.until(
            lambda m, i=i: (
                (
                    writer.id in fast.members
                    and fast.members[writer.id]["state"].get("cursor", {}).get("x") == i
                )
                or slow.id not in fast.members
            )
        )
    assert slow.id not in fast.members, "the stalled client was never removed"
    assert server.metrics()["presence_slow_client_disconnects_total"] == 1
    slow.ws.transport.resume_reading()  # type: ignore[attr-defined]
    code, reason = await closed_with(slow, timeout=30)
    assert code == 1013 and "slow" in reason


# -- bad input: each gets an error or a close code, and the room keeps working ------------


async def assert_room_still_works(server: Server) -> None:
    a = await join(server, room="healthy")
    b = await join(server, room="healthy")
    await a.update(cursor={"x": 42})
    await b.until(lambda m: a.id in b.members and b.members[a.id]["state"].get("cursor"))
    await a.close()
    await b.close()


@pytest.mark.parametrize(
    "raw,code",
    [
        ("this is not json", "invalid_json"),
        ("[1, 2, 3]", "invalid_message"),
        ('{"no": "type"}', "invalid_message"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "update"}', "invalid_message"),
        ('{"type": "update", "state": [1]}', "invalid_message"),
        ('{"type": "update", "state": {"cursor": "here"}}', "invalid_field"),
        ('{"type": "update", "state": {"cursor": {"x": "1"}}}', "invalid_field"),
        ('{"type": "update", "state": {"selection": {"anchor": true}}}', "invalid_field"),
        ('{"type": "update", "state": {"deep": ' + "[" * 40 + "]" * 40 + "}}", "too_deep"),
        ('{"type": "update", "state": {"x": ' + "[" * 5000 + "]" * 5000 + "}}", "invalid_json"),
    ],
)
async def test_bad_messages_get_an_error(server: Server, raw: str, code: str) -> None:
    a = await join(server)
    b = await join(server)
    await a.ws.send(raw)
    error = await a.until(is_type("error"))
    assert error["code"] == code and error["message"]
    # The connection and the room still work.
    await a.update(cursor={"x": 7})
    await b.until(lambda m: a.id in b.members and b.members[a.id]["state"].get("cursor"))
    await assert_room_still_works(server)


async def test_state_too_large_is_refused(server: Server) -> None:
    a = await join(server)
    for i in range(3):
        await a.update(**{f"field{i}": "x" * 6000})
    error = await a.until(is_type("error"))
    assert error["code"] == "state_too_large"
    b = await join(server)
    assert set(b.welcome["members"][0]["state"]) == {"field0", "field1"}


async def test_oversized_message_is_closed_with_1009(server: Server) -> None:
    a = await join(server, max_size=None)
    await a.ws.send('{"type":"update","state":{"x":"' + "y" * 20000 + '"}}')
    code, _ = await closed_with(a)
    assert code == 1009
    await assert_room_still_works(server)


async def test_binary_frame_is_closed_with_1003(server: Server) -> None:
    a = await join(server)
    await a.ws.send(b"\x00\x01")
    code, reason = await closed_with(a)
    assert code == 1003 and "binary" in reason
    await assert_room_still_works(server)


async def test_invalid_utf8_is_closed_with_1007(server: Server) -> None:
    a = await join(server)
    # A text frame whose payload is not UTF-8 (sent raw, bypassing the client's checks).
    from websockets.frames import Frame, Opcode

    a.ws.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))  # type: ignore[attr-defined]
    a.ws.send_data()  # type: ignore[attr-defined]
    code, _ = await closed_with(a)
    assert code == 1007
    await assert_room_still_works(server)


@pytest.mark.parametrize("room", ["has%20space", "x" * 129, "%F0%9F%98%80", "a%3Cb%3E"])
async def test_invalid_room_name_is_closed_with_1008(server: Server, room: str) -> None:
    ws = await websockets.connect(f"{server.ws}/rooms/{room}")
    with pytest.raises(ConnectionClosed) as info:
        await ws.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1008 and "room name" in info.value.rcvd.reason
    await assert_room_still_works(server)


async def test_a_room_name_may_hold_slashes_encoded_or_not(server: Server) -> None:
    # A hub server's rooms are named alice/<server>:<room>; clients encode "/" or not.
    async with websockets.connect(f"{server.ws}/rooms/alice/:doc") as a:
        assert orjson.loads(await a.recv())["room"] == "alice/:doc"
        async with websockets.connect(f"{server.ws}/rooms/alice%2F%3Adoc") as b:
            assert orjson.loads(await b.recv())["room"] == "alice/:doc"
            assert orjson.loads(await a.recv())["type"] == "join"
    for bad in ("a%2F%2Fb", "a/", "a/events"):
        async with websockets.connect(f"{server.ws}/rooms/{bad}") as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 1008 and "invalid room name" in ws.close_reason


@pytest.mark.parametrize("path", ["/", "/nowhere/x", "/rooms", "/rooms/", "/yjs"])
async def test_no_websocket_endpoint_is_a_404(server: Server, path: str) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(f"{server.ws}{path}")
    assert info.value.response.status_code == 404
    await assert_room_still_works(server)


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "eyJ2IjoxfQ.AAAA",
    ],
)
async def test_forged_token_is_rejected(server: Server, token: str) -> None:
    ws = await websockets.connect(f"{server.ws}/rooms/doc?token={token}")
    error = await ws.recv()
    assert '"invalid_token"' in str(error)
    with pytest.raises(ConnectionClosed) as info:
        await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    await assert_room_still_works(server)


async def test_token_from_another_deployment_is_rejected(server_factory) -> None:  # type: ignore[no-untyped-def]
    ours = server_factory("--seed", "5")
    theirs = server_factory(
        "--seed", "5", env={"PRESENCE_SECRET": "another-secret-of-at-least-32-bytes"}
    )
    foreign = (await join(theirs)).welcome["token"]
    ws = await websockets.connect(f"{ours.ws}/rooms/doc?token={foreign}")
    assert "signature" in str(await ws.recv())
    with pytest.raises(ConnectionClosed):
        await ws.recv()


async def test_a_rotated_secret_keeps_everyone_logged_in(server_factory) -> None:  # type: ignore[no-untyped-def]
    old, new = "the-secret-before-the-rotation-32-bytes", "the-secret-after-the-rotation-32-bytes"
    before = server_factory("--seed", "5", env={"PRESENCE_SECRET": old})
    first = await join(before)
    after = server_factory(
        "--seed", "6", env={"PRESENCE_SECRET": new, "PRESENCE_PREVIOUS_SECRETS": old}
    )
    again = await join(after, token=first.welcome["token"])
    assert again.user == first.user  # the same identity, from the old secret's token
    # ...handed back signed with the new secret, which a replica without the old one takes.
    only_new = server_factory("--seed", "7", env={"PRESENCE_SECRET": new})
    last = await join(only_new, token=again.welcome["token"])
    assert last.user == first.user


async def test_too_many_invalid_messages_close_with_1008(server: Server) -> None:
    a = await join(server)
    for _ in range(11):
        await a.ws.send("nope")
    code, reason = await closed_with(a)
    assert code == 1008 and "invalid" in reason
    await assert_room_still_works(server)


async def test_no_client_can_change_another_members_state_or_identity(server: Server) -> None:
    a = await join(server)
    b = await join(server)
    # No client can set an identity, not even its own.
    await a.update(user={"name": "Mallory"})
    error = await a.until(is_type("error"))
    assert error["code"] == "invalid_field" and "reserved" in error["message"]
    # There is no way to address another member: fields like these are a's own state.
    await a.update(id=b.id, name="Mallory", cursor={"x": 1})
    await b.until(lambda m: a.id in b.members and b.members[a.id]["state"].get("cursor"))
    c = await join(server)
    members = {m["id"]: m for m in c.welcome["members"]}
    assert members[b.id]["state"] == {}
    assert members[b.id]["user"]["name"] == b.user["name"]
    assert members[a.id]["user"]["name"] == a.user["name"]


async def test_room_full_is_closed_with_1013(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--max-room-members", "2", "--seed", "6")
    await join(server)
    await join(server)
    ws = await websockets.connect(f"{server.ws}/rooms/doc")
    with pytest.raises(ConnectionClosed) as info:
        await ws.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1013 and "full" in info.value.rcvd.reason
    # Other rooms are not affected.
    await join(server, room="another")


async def test_first_update_after_quiet_goes_at_once_then_ticks_batch(server_factory) -> None:  # type: ignore[no-untyped-def]
    # A long flush interval makes the tick visible; the bounds are generous.
    server = server_factory("--flush-interval", "1", "--seed", "7")
    a = await join(server)
    b = await join(server)
    await b.until(is_type("join"))  # b's own join, flushed on the next tick
    await asyncio.sleep(1.5)  # a quiet period: longer than the interval since that flush
    sent = time.monotonic()
    await a.update(cursor={"x": 1})
    await b.until(lambda m: b.members[a.id]["state"].get("cursor") == {"x": 1})
    first = time.monotonic() - sent
    for x in range(2, 6):
        await a.update(cursor={"x": x})
    frame = await b.until(is_type("update"))
    batched = time.monotonic() - sent
    assert first < 0.5, first
    assert batched >= 0.8, batched
    # The four updates sent within one tick arrive as one frame with the latest state.
    assert frame["updates"] == [{"id": a.id, "state": {"cursor": {"x": 5}}}]
