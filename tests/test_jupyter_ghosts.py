"""No ghost cursors: a real ``jupyter server`` with jupyter-collaboration and the
presence.jupyter extension, driven by y-websocket clients that echo like browsers.

When a collaboration socket closes (aborted, cleanly closed, dying right after a burst),
the states it owned leave the other collaborators' screens within a second; states it
only echoed stay. A stock server (extension disabled) keeps the ghost: measured, not
waited for (y-protocols drops it after 30 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from pycrdt import create_awareness_message

from tests.jupyter_helpers import Jupyter, lab_state, start_jupyter
from tests.yjs_client import YClient

pytestmark = pytest.mark.e2e

ENABLED = "--ServerApp.jpserver_extensions=presence.jupyter=True"
DISABLED = "--ServerApp.jpserver_extensions=presence.jupyter=False"


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jupyter]:
    server = start_jupyter(tmp_path_factory.mktemp("jupyter"), ENABLED)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jupyter]:
    """The same server with the extension disabled: what it fixes."""
    server = start_jupyter(tmp_path_factory.mktemp("stock"), DISABLED)
    yield server
    server.stop()


async def joined(url: str, *, echo: bool = True, client_id: int | None = None) -> YClient:
    client = await YClient.connect(url, echo=echo, client_id=client_id)
    # Synced: the room serves this socket, so from now on it gets the others' states
    # (the room sends no snapshot of them).
    await client.until(lambda: client.synced)
    return client


async def room_of(jupyter: Jupyter, *names: str) -> tuple[str, list[YClient]]:
    """Collaborators in a new notebook, each seeing all the others."""
    _, url = jupyter.new_notebook()
    clients = [await joined(url) for _ in names]
    for client, name in zip(clients, names, strict=True):
        await client.set(lab_state(name))
    for client in clients:
        others = {o.id for o in clients if o is not client}
        await client.until(lambda c=client, o=others: o <= set(c.states))  # type: ignore[misc]
    await asyncio.sleep(0.3)  # the echoes of every state reach the server
    return url, clients


async def gone_after(watcher: YClient, client_id: int, since: float, limit: float = 3) -> float:
    await watcher.until(lambda: client_id not in watcher.states, timeout=limit)
    return time.monotonic() - since


async def test_an_aborted_socket_leaves_at_once(jupyter: Jupyter) -> None:
    _, (a, b) = await room_of(jupyter, "Ada", "Bob")
    aborted = time.monotonic()
    a.abort()  # no null state, no close frame: a killed browser, a dropped network
    took = await gone_after(b, a.id, aborted)
    print(f"\nextension: an aborted socket's state left the others after {took * 1000:.1f} ms")
    assert took < 1.0
    await b.ws.close()


async def test_a_clean_close_leaves_at_once(jupyter: Jupyter) -> None:
    _, (a, b) = await room_of(jupyter, "Ada", "Bob")
    closed = time.monotonic()
    await a.ws.close()  # a closed tab: y-websocket 1.5 sends no null state first
    took = await gone_after(b, a.id, closed)
    print(f"\nextension: a closed socket's state left the others after {took * 1000:.1f} ms")
    assert took < 1.0
    await b.ws.close()


async def test_closing_a_socket_that_echoed_a_state_keeps_that_state(jupyter: Jupyter) -> None:
    _, (a, b, c, d) = await room_of(jupyter, "Ada", "Bob", "Cy", "Dan")
    # b and c have sent a's state back to the server, as browsers do.
    since = time.monotonic()
    b.abort()
    await c.ws.close()
    took = max(await gone_after(d, b.id, since), await gone_after(d, c.id, since))
    await asyncio.sleep(0.5)
    assert a.id in d.states, "closing a socket that only echoed a's state removed a"
    print(f"\nextension: echoing sockets left after {took * 1000:.1f} ms; the owner stayed")
    await a.ws.close()
    await gone_after(d, a.id, time.monotonic())
    await d.ws.close()


async def test_stock_server_keeps_the_ghost(stock: Jupyter) -> None:
    _, (a, b) = await room_of(stock, "Ada", "Bob")
    aborted = time.monotonic()
    a.abort()
    await asyncio.sleep(2.0)
    shown = time.monotonic() - aborted
    print(f"\nstock: an aborted socket's state is still shown after {shown:.1f} s")
    assert a.id in b.states, "the stock server removed the state: nothing to compare with"
    await b.ws.close()


async def test_a_client_reconnecting_with_its_old_clock_is_shown_at_once(
    jupyter: Jupyter,
) -> None:
    url, (a, b) = await room_of(jupyter, "Ada", "Bob")
    a.abort()
    await b.until(lambda: a.id not in b.states)
    # y-websocket reconnects with the same client ID and re-sends its unchanged clock,
    # which the others saw removed.
    again = await joined(url, client_id=a.id)
    again.awareness.meta[a.id] = dict(a.awareness.meta[a.id])
    again.awareness.states[a.id] = dict(a.awareness.states[a.id])
    sent = time.monotonic()
    await again.send_update([a.id])
    await b.until(lambda: a.id in b.states, timeout=3)
    took = time.monotonic() - sent
    print(f"\nextension: a client back with its old clock was shown after {took * 1000:.1f} ms")
    assert took < 1.0
    # The new socket owns it: closing it removes it again.
    closed = time.monotonic()
    await again.ws.close()
    assert await gone_after(b, a.id, closed) < 1.0
    await b.ws.close()


async def test_a_client_back_before_its_old_socket_closed_stays_shown(jupyter: Jupyter) -> None:
    """The new socket's state (old clock) is ignored while the old socket owns the ID; the
    old socket's removal then reaches the client itself, which re-announces itself with a
    newer clock (y-protocols never lets a peer remove its own state)."""
    url, (a, b) = await room_of(jupyter, "Ada", "Bob")
    again = await joined(url, client_id=a.id)
    again.awareness.meta[a.id] = dict(a.awareness.meta[a.id])
    again.awareness.states[a.id] = dict(a.awareness.states[a.id])
    await again.send_update([a.id])
    await asyncio.sleep(0.3)
    clock = b.awareness.meta[a.id]["clock"]
    closed = time.monotonic()
    a.abort()
    # Removed with the old socket (same clock), then back with a newer clock.
    await b.until(lambda: a.id in b.states and b.awareness.meta[a.id]["clock"] > clock, 2)
    took = time.monotonic() - closed
    print(f"\nextension: a client on its new socket was shown again after {took * 1000:.1f} ms")
    assert took < 1.0
    closed = time.monotonic()
    await again.ws.close()
    assert await gone_after(b, a.id, closed) < 1.0
    await b.ws.close()


async def test_a_socket_dying_right_after_a_burst_leaves_no_ghost(jupyter: Jupyter) -> None:
    """Send and die: whether the room applies the last messages before or after the
    socket's on_close (the hook removes what they bring back), no ghost stays."""
    ghosts = 0
    for _ in range(3):
        _, url = jupyter.new_notebook()
        watcher = await joined(url)
        # Not waiting for it to sync: its messages queue up before the room serves it.
        dying = await YClient.connect(url, echo=False)
        for k in range(30):
            dying.awareness.set_local_state({**lab_state("Eve"), "k": k})
            update = dying.awareness.encode_awareness_update([dying.id])
            dying.ws.protocol.send_binary(create_awareness_message(update))  # queued only
        dying.ws.send_data()
        dying.ws.transport.close()  # flush, then FIN: no close frame
        await asyncio.sleep(1.0)
        ghosts += dying.id in watcher.states
        await watcher.ws.close()
    assert ghosts == 0


def test_pings_are_turned_on_when_unset(jupyter: Jupyter) -> None:
    # A collaborator whose network vanished without a FIN is found by these pings.
    assert "WebSocket pings every 10 s" in jupyter.output()
