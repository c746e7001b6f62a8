"""Prometheus metrics, in the text exposition format (no client library needed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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
    # Values read at scrape time from their owners, so they can never drift.
    gauges: dict[str, tuple[str, Callable[[], float]]] = field(default_factory=dict)
    counters: dict[str, tuple[str, Callable[[], float]]] = field(default_factory=dict)

    def error(self, code: str) -> None:
        self.protocol_errors[code] = self.protocol_errors.get(code, 0) + 1

    def refused(self, reason: str) -> None:
        self.connections_refused[reason] = self.connections_refused.get(reason, 0) + 1

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP presence_{name} {help_}")
            lines.append(f"# TYPE presence_{name} {kind}")
            lines.extend(f"presence_{name}{labels} {value:g}" for labels, value in samples)

        for name, (help_, read) in self.gauges.items():
            metric(name, "gauge", help_, [("", read())])
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
            "Connections refused (503: over the 'total' or 'per_ip' limit; 431: "
            "'header_too_large') or closed before their request was complete "
            "('handshake_timeout').",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(self.connections_refused.items())],
        )
        return "\n".join(lines) + "\n"
