"""Connection limits: the open TCP connections of this process, in all and per client
IP (``--max-connections``, ``--max-connections-per-ip``, ``--connection-rate-per-ip``).
Counted by the HTTP guard (:mod:`presence.websocket.guard`) from the moment a
connection opens; an upgraded connection keeps its :class:`Slot` until it closes."""

from __future__ import annotations

import ipaddress
import resource
import time
from typing import Any

from uvicorn.middleware.proxy_headers import _TrustedHosts

from presence.config import Settings
from presence.core.ratelimit import Buckets

# --connection-rate-per-ip comes in bursts of this many seconds' worth: a lecture hall
# joining at once, a replica's clients reconnecting after it restarted.
RATE_BURST_SECONDS = 10.0
MAX_RATED_IPS = 65_536  # addresses whose rate is followed; the least recent is forgotten


def default_max_connections() -> int:
    """The process's soft limit of open files, less a tenth of it (at least 64): what is
    kept is for Redis, logs, and connections being refused."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, soft - max(64, soft // 10))


class Limits:
    """The open TCP connections of this process (HTTP and WebSocket), in all and per
    client IP, against ``--max-connections`` and ``--max-connections-per-ip``."""

    def __init__(self, settings: Settings, metrics: Any) -> None:
        self.max_total = settings.max_connections or default_max_connections()
        # Refused connections wait for their request (REFUSED_LINGER) while this many
        # descriptors are spare: half of what the fd limit leaves over max_total.
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.lingering = max(0, min(soft, 1 << 20) - self.max_total) // 2
        self.max_per_ip = settings.max_connections_per_ip
        self._rates = Buckets(settings.connection_rate_per_ip, RATE_BURST_SECONDS, MAX_RATED_IPS)
        self.handshake_timeout = settings.handshake_timeout
        # uvicorn's own parser of --forwarded-allow-ips: the same clients as in the views.
        self.proxies = _TrustedHosts(settings.forwarded_allow_ips)
        self.metrics = metrics
        self.open = 0
        self.per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> bool:
        """Whether ``ip`` may open one more connection now (--connection-rate-per-ip)."""
        return self._rates.take(ip, time.monotonic()) == 0


class Slot:
    """One open connection's place in the :class:`Limits`, from ``connection_made`` to
    ``connection_lost`` (an upgraded connection's :class:`Connection` releases it)."""

    __slots__ = ("ip", "key", "limits")

    def __init__(self, limits: Limits) -> None:
        self.limits: Limits | None = limits
        self.ip: str | None = None  # the client's address
        self.key: str | None = None  # what the per-IP limits count it as
        limits.open += 1

    @property
    def over_total(self) -> bool:
        return self.limits is not None and self.limits.open > self.limits.max_total

    def claim(self, ip: str) -> str | None:
        """Count the connection as ``ip``'s: None, or why ``ip`` may not have it
        (``per_ip``: over its count; ``per_ip_rate``: opening them too fast). IPv6
        clients count per /64: one host usually has all of one."""
        limits = self.limits
        if limits is None:
            return None
        key = client_key(ip)
        if key != self.key:
            # Each new client of a connection counts as a new connection of it: a proxy
            # may send several clients' requests over one.
            self._forget_ip()
            self.ip, self.key = ip, key
            limits.per_ip[key] = limits.per_ip.get(key, 0) + 1
            if not limits.admit(key):
                return "per_ip_rate"
        self.ip = ip
        return None if limits.per_ip[key] <= limits.max_per_ip else "per_ip"

    def release(self) -> None:
        if self.limits is not None:
            self._forget_ip()
            self.limits.open -= 1
            self.limits = None

    def _forget_ip(self) -> None:
        if self.limits is not None and self.key is not None:
            left = self.limits.per_ip[self.key] - 1
            if left:
                self.limits.per_ip[self.key] = left
            else:
                del self.limits.per_ip[self.key]
            self.ip = self.key = None


def client_key(ip: str) -> str:
    """What the per-IP limits count ``ip`` as: itself, or for IPv6 its /64 network."""
    if ":" not in ip:
        return ip
    try:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    except ValueError:
        return ip  # not an address (a proxy's odd header): counted as given
