"""A log-bucketed latency histogram (HdrHistogram-style: ~1% precision, mergeable)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_GROWTH = 1.01  # each bucket is 1% wider than the previous one


@dataclass
class Histogram:
    counts: dict[int, int] = field(default_factory=dict)
    total: int = 0
    max_us: int = 0

    def record(self, seconds: float) -> None:
        us = max(1, int(seconds * 1e6))
        bucket = int(math.log(us, _GROWTH))
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.total += 1
        self.max_us = max(self.max_us, us)

    def merge(self, other: Histogram) -> None:
        for bucket, n in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + n
        self.total += other.total
        self.max_us = max(self.max_us, other.max_us)

    def percentile_ms(self, p: float) -> float:
        """The latency below which ``p`` percent of the samples fall, in milliseconds."""
        if not self.total:
            return math.nan
        rank = p / 100 * self.total
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(_GROWTH ** (bucket + 1), self.max_us) / 1000
        return self.max_us / 1000

    def share_within_ms(self, limit: float) -> float:
        """The share of samples at or below ``limit`` milliseconds (to the bucket's 1%)."""
        if not self.total:
            return math.nan
        within = sum(n for b, n in self.counts.items() if _GROWTH ** (b + 1) <= limit * 1000)
        return within / self.total

    def to_json(self) -> dict[str, object]:
        return {
            "counts": {str(k): v for k, v in self.counts.items()},
            "total": self.total,
            "max_us": self.max_us,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Histogram:
        counts = {int(k): int(v) for k, v in data["counts"].items()}  # type: ignore[attr-defined]
        return cls(counts, int(data["total"]), int(data["max_us"]))  # type: ignore[call-overload]
