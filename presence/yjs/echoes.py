"""Echoes: stock Yjs clients send back every awareness update they apply, re-encoded,
which are the same bytes as ours when the states' JSON round-trips (integers, strings).
The last few messages sent to each connection let such an echo be recognised without
decoding it; they are let go once the connection has been sent nothing for
``ECHO_WINDOW`` seconds."""

from __future__ import annotations

from typing import Generic, TypeVar

ECHO_MESSAGES = 4
ECHO_WINDOW = 1.0

C = TypeVar("C")  # a connection (its outbox)


class Echoes(Generic[C]):
    """The messages each connection was sent last."""

    def __init__(self) -> None:
        self.recent: dict[C, list[bytes]] = {}

    def sent(self, connection: C, message: bytes) -> None:
        recent = self.recent.setdefault(connection, [])
        recent.append(message)
        if len(recent) > ECHO_MESSAGES:
            del recent[0]

    def echoed(self, connection: C, message: bytes) -> bool:
        """Whether ``message`` from ``connection``'s client is a copy of one it was sent:
        nothing in it is news (its states are others', at clocks it was told)."""
        recent = self.recent.get(connection)
        if recent is None or message not in recent:
            return False
        recent.remove(message)  # a client applies, and sends back, a message once
        return True

    def quiet(self, connection: C, seconds: float) -> None:
        """``connection`` has been sent nothing for ``seconds``."""
        if seconds >= ECHO_WINDOW:
            self.recent.pop(connection, None)

    def forget(self, connection: C) -> None:
        self.recent.pop(connection, None)
