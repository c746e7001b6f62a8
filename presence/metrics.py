"""Prometheus metrics: presence's own in the text exposition format, written by hand
(values read at scrape time cost nothing in between), then prometheus_client's for what
it does better: the process collector (CPU, memory, descriptors) and the fan-out delay
histogram. Both live in a registry of this object's own, not the library's global one:
a Jupyter server hosting presence has its own metrics there, and tests make many."""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.exposition import generate_latest

from presence import __version__

# Fan-out delays are a few milliseconds on a healthy replica; the top buckets catch one
# whose event loop is saturated (ticks stretched, timers late).
FANOUT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# The protocols sessions are counted by: always all of them, so that dashboards see a
# series (at 0) for one nobody uses yet.
PROTOCOLS = ("json", "yjs", "sse")

# The close codes of RFC 6455 a client may send; any other it sends counts as "other".
CLIENT_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1005, 1007, 1008, 1009, 1010, 1011))


@dataclass
class Metrics:
    messages_in: int = 0
    messages_out: int = 0
    updates_coalesced: int = 0
    yjs_echoes: int = 0
    slow_client_disconnects: int = 0
    protocol_errors: dict[str, int] = field(default_factory=dict)
    # Connections refused or closed before their request was complete, by reason.
    connections_refused: dict[str, int] = field(default_factory=dict)
    # WebSockets ended, by (close code, who sent it first: server, client, "" for none).
    closes: dict[tuple[str, str], int] = field(default_factory=dict)
    # Values read at scrape time from their owners, so they can never drift.
    gauges: dict[str, tuple[str, Callable[[], float]]] = field(default_factory=dict)
    counters: dict[str, tuple[str, Callable[[], float]]] = field(default_factory=dict)
    # The same with one label: (help, label name, read -> {label value: value}).
    labelled_gauges: dict[str, tuple[str, str, Callable[[], Mapping[str, float]]]] = field(
        default_factory=dict
    )
    registry: CollectorRegistry = field(init=False, repr=False)
    _fanout: Histogram = field(init=False, repr=False)
    _fanout_children: dict[tuple[str, str], Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self._fanout = Histogram(
            "presence_fanout_seconds",
            "Time from a member event reaching this replica's hub (a client's update or "
            "join, from its socket and past its rate limit; or a batch from another replica, "
            "from Redis: origin) to the frames carrying it being written to every socket of "
            "the room that takes writes (lagging clients wait in their outbox: not counted), "
            "by protocol (json, yjs; SSE streams write in their own task: not measured).",
            ["protocol", "origin"],
            buckets=FANOUT_BUCKETS,
            registry=self.registry,
        )
        # The library looks children up under a lock: cached, since this is per flush.
        self._fanout_children = {}

    def error(self, code: str) -> None:
        self.protocol_errors[code] = self.protocol_errors.get(code, 0) + 1

    def refused(self, reason: str) -> None:
        self.connections_refused[reason] = self.connections_refused.get(reason, 0) + 1

    def closed(self, code: int, by: str) -> None:
        # A client may send any code from 3000 to 4999: those of RFC 6455 are counted as
        # they are, the rest as "other", so that clients cannot add series without end.
        label = str(code) if by != "client" or code in CLIENT_CLOSE_CODES else "other"
        self.closes[label, by] = self.closes.get((label, by), 0) + 1

    def fanout(self, protocol: str, origin: str, seconds: float) -> None:
        """One flush delivered events that reached the hub ``seconds`` ago (the earliest
        of the batch) over ``protocol``; ``origin``: 'local' or 'remote'."""
        key = (protocol, origin)
        child = self._fanout_children.get(key)
        if child is None:
            child = self._fanout_children[key] = self._fanout.labels(protocol, origin)
        child.observe(seconds)

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP presence_{name} {help_}")
            lines.append(f"# TYPE presence_{name} {kind}")
            lines.extend(f"presence_{name}{labels} {value:g}" for labels, value in samples)

        # Labels in this order (version first): what `grep presence_build_info` shows.
        metric(
            "build_info",
            "gauge",
            "Always 1: the version of presence and of Python this replica runs.",
            [(f'{{version="{__version__}",python="{platform.python_version()}"}}', 1)],
        )
        for name, (help_, read) in self.gauges.items():
            metric(name, "gauge", help_, [("", read())])
        for name, (help_, label, read_all) in self.labelled_gauges.items():
            values = read_all()
            metric(
                name,
                "gauge",
                help_,
                [(f'{{{label}="{key}"}}', values[key]) for key in sorted(values)],
            )
        for name, (help_, read) in self.counters.items():
            metric(name, "counter", help_, [("", read())])
        metric(
            "messages_in_total",
            "counter",
            "Messages received from clients.",
            [("", self.messages_in)],
        )
        metric(
            "messages_out_total", "counter", "Frames sent to clients.", [("", self.messages_out)]
        )
        metric(
            "updates_coalesced_total",
            "counter",
            "State updates merged into a newer update of the same member before sending.",
            [("", self.updates_coalesced)],
        )
        metric(
            "yjs_echoes_total",
            "counter",
            "Yjs messages recognised as a copy of one the client was sent (stock clients "
            "send back every update they apply), dropped without decoding.",
            [("", self.yjs_echoes)],
        )
        metric(
            "slow_client_disconnects_total",
            "counter",
            "Connections closed because they did not keep up (close code 1013).",
            [("", self.slow_client_disconnects)],
        )
        metric(
            "protocol_errors_total",
            "counter",
            "Invalid client messages, by error code.",
            [(f'{{code="{code}"}}', n) for code, n in sorted(self.protocol_errors.items())],
        )
        metric(
            "connections_refused_total",
            "counter",
            "Connections refused (503: over the 'total' or 'per_ip' limit; 429: opened too "
            "fast, 'per_ip_rate'; 431: "
            "'header_too_large'; 403: 'origin'; 'access_*': a room token or hub refused) or "
            "closed before their request was complete ('handshake_timeout').",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(self.connections_refused.items())],
        )
        metric(
            "closes_total",
            "counter",
            "WebSocket sessions ended, by close code and by who sent it first: by='server' "
            "(1009 message too big, 1013 room full or client too slow, 4401/4403 access), "
            "by='client' (RFC 6455's codes; any other is code='other'), by='' with code "
            "1006 if the connection dropped without one.",
            [(f'{{code="{code}",by="{by}"}}', n) for (code, by), n in sorted(self.closes.items())],
        )
        return "\n".join(lines) + "\n" + generate_latest(self.registry).decode()


# What the parts of a replica count, read from them at scrape time. Registered by the app
# (presence.server.app) as it assembles them; the order here is the order of /metrics.


def watch_hub(m: Metrics, hub: Any) -> None:
    """The hub's rooms and sessions (presence.hub.hub.Hub), and its backplane's link."""
    m.labelled_gauges["sessions"] = (
        "Clients joined to a room on this replica (WebSockets, and SSE streams), by "
        "protocol: json, yjs, sse. TCP connections: presence_tcp_connections.",
        "protocol",
        hub.sessions,
    )
    m.gauges["rooms"] = ("Rooms with members.", lambda: len(hub.rooms))
    m.gauges["backplane_up"] = (
        "1 while the backplane reaches the other replicas (Redis connected), else 0.",
        lambda: float(hub.backplane.ready),
    )
    m.counters["backplane_connect_failures_total"] = (
        "Attempts to connect to Redis that failed.",
        lambda: hub.backplane.connect_failures,
    )
    m.counters["backplane_reconnects_total"] = (
        "Times the connection to Redis came back after an outage.",
        lambda: hub.backplane.reconnects,
    )
    m.counters["backplane_dropped_total"] = (
        "Messages not published because the backplane was unreachable (re-synced later).",
        lambda: hub.backplane.dropped,
    )
    m.gauges["tasks"] = (
        "asyncio tasks of this process (connections, timers).",
        lambda: len(asyncio.all_tasks()),
    )
    m.gauges["tick_seconds"] = (
        "Shortest time between two frames of a room (--flush-interval, stretched when "
        "timers run late).",
        lambda: hub.tick_interval,
    )
    m.gauges["members"] = (
        "Members in all rooms, on every replica.",
        lambda: sum(len(r) for r in hub.rooms.values()),
    )


def watch_replication(m: Metrics, replication: Any) -> None:
    """What replication counts (presence.backplane.replication.Replication)."""
    m.gauges["backplane_replicas"] = (
        "Other replicas heard from and up, as this replica sees them.",
        lambda: replication.replicas_up,
    )
    m.counters["backplane_replicas_down_total"] = (
        "Times another replica went silent and its members were removed here.",
        lambda: replication.downs,
    )
    m.counters["backplane_gaps_total"] = (
        "Messages from other replicas found missing (their state was asked for again).",
        lambda: replication.gaps,
    )
    m.counters["backplane_stalls_total"] = (
        "Times this replica's own timers ran later than the replica timeout allows "
        "(it announced its members again).",
        lambda: replication.stalls,
    )


def watch_limits(m: Metrics, limits: Any) -> None:
    """The connection limits (presence.websocket.limits.Limits)."""
    m.gauges["tcp_connections"] = (
        "Open TCP connections, HTTP and WebSocket, counted against --max-connections "
        "(clients joined to rooms: presence_sessions).",
        lambda: limits.open,
    )
    m.gauges["tcp_connections_limit"] = (
        "--max-connections: TCP connections beyond it are refused with 503.",
        lambda: limits.max_total,
    )
