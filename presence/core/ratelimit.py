"""Token buckets, fed the time by their caller."""

from __future__ import annotations

from collections import OrderedDict

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


class Buckets:
    """A bucket per key (a client's address, a scope), each allowing ``rate`` events per
    second with bursts of ``burst_seconds`` worth; past ``most`` keys the least recently
    used is forgotten (it starts again with a full bucket), so that made-up keys cannot
    grow it without end."""

    def __init__(self, rate: float, burst_seconds: float, most: int) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * burst_seconds)
        self.most = most
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """0 if ``key`` may have one more event now (taken), else seconds to wait."""
        bucket = self._buckets.pop(key, None) or TokenBucket(self.rate, self.burst, now)
        self._buckets[key] = bucket
        if len(self._buckets) > self.most:
            self._buckets.popitem(last=False)
        return 0.0 if bucket.allow(now) else bucket.wait_time(now)
