"""A token bucket, fed the time by its caller."""

from __future__ import annotations

# Refilling to exactly one token in floats can fall a hair short of 1: without this
# slack a caller that waited wait_time() would find no token.
EPSILON = 1e-9


class TokenBucket:
    """Allows ``rate`` events per second on average, with bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now

    def allow(self, now: float) -> bool:
        """Take a token if there is one."""
        self._refill(now)
        if self._tokens >= 1 - EPSILON:
            self._tokens -= 1
            return True
        return False

    def wait_time(self, now: float) -> float:
        """Seconds until a token is available (0 if one is)."""
        self._refill(now)
        return max(0.0, (1 - self._tokens) / self.rate)
