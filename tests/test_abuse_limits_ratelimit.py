"""Issue 13: a client sending far above ``--rate-limit`` gets at most the limit applied.

End to end against a real server: a writer sends 200 updates a second for 3 s, an
observer in the room counts the updates of the writer it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from tests.conftest import Server
from tests.test_json_protocol import join

pytestmark = pytest.mark.e2e

RATE = 30  # --rate-limit; the bucket's burst is as many
SEND_RATE = 200
SECONDS = 3.0


async def test_updates_above_the_rate_limit_are_applied_at_most_at_the_rate(
    server_factory,  # type: ignore[no-untyped-def]
) -> None:
    server: Server = server_factory("--rate-limit", str(RATE), "--seed", "5")
    # The writer never reads (the room echoes its updates): an unbounded queue lets its
    # close handshake through.
    writer = await join(server, max_queue=None)
    observer = await join(server)
    await writer.until(lambda m: m["type"] == "join")
    applied: list[float] = []  # when the observer got each of the writer's updates

    async def observe() -> None:
        while True:  # until cancelled, once the last update is in
            message = await observer.recv(60)
            if message["type"] == "update":
                applied.extend(time.monotonic() for u in message["updates"] if u["id"] == writer.id)

    started = time.monotonic()
    sent = 0
    reading = asyncio.create_task(observe())
    while (now := time.monotonic()) < started + SECONDS:
        # Paced to SEND_RATE, catching up after a slow turn (two cores, shared).
        while sent < (now - started) * SEND_RATE:
            await writer.update(n=sent, **{f"f{sent % 3}": sent})
            sent += 1
        await asyncio.sleep(1 / SEND_RATE)
    last = sent - 1
    # Cancelled only once the last update is in: a receive cancelled as its message
    # arrives may drop it (asyncio.wait_for on Python 3.11), and it waited for good.
    deadline = time.monotonic() + 30
    while observer.members.get(writer.id, {}).get("state", {}).get("n") != last:
        assert not reading.done(), reading
        assert time.monotonic() < deadline, "the last update never came"
        await asyncio.sleep(0.01)
    ended = time.monotonic()
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading

    per_second = [sum(1 for t in applied if s <= t - started < s + 1) for s in range(4)]
    print(f"sent {sent} in {SECONDS} s; applied {len(applied)}; per second {per_second}")
    assert sent > 2 * RATE * SECONDS, "the writer did not outrun the limit"
    # Every update applied was allowed by the bucket: its burst, then RATE a second (one
    # update's slack: the observer's clock starts after the server's bucket did).
    assert len(applied) <= RATE + RATE * (ended - started) + 1, per_second
    # The excess merged into the latest state: exact, every field included.
    assert observer.members[writer.id]["state"] == {
        "n": last,
        f"f{last % 3}": last,
        f"f{(last - 1) % 3}": last - 1,
        f"f{(last - 2) % 3}": last - 2,
    }
    await writer.close()
    await observer.close()
