import pytest

from presence.backplane.memory import MemoryBackplane
from presence.config import Settings
from presence.core.events import State
from presence.core.identity import IdentityFactory
from presence.core.ratelimit import Buckets, TokenBucket
from presence.hub.hub import Hub
from presence.hub.updates import RateLimitedUpdates

pytestmark = pytest.mark.unit


def test_bucket_allows_burst_then_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0)
    assert [bucket.allow(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time(0) == 0.1
    assert not bucket.allow(0.05)
    assert bucket.allow(0.1)
    # A long pause refills to the burst, not beyond.
    assert sum(bucket.allow(100) for _ in range(10)) == 3


def test_waiting_the_wait_time_always_earns_a_token() -> None:
    # Issue 13: refilling to exactly 1 token in floats often fell a hair short, so a
    # release timed by wait_time found no token (and applied the update regardless).
    bucket = TokenBucket(rate=30, burst=30, now=0)
    assert sum(bucket.allow(0) for _ in range(31)) == 30
    now = 0.0
    for _ in range(1000):
        now += bucket.wait_time(now)
        assert bucket.allow(now)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorded(RateLimitedUpdates):
    """The real limiter and release path; what it applies is recorded, not sent."""

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub, "doc", "m1")
        self.applied: list[tuple[float, State]] = []

    def _apply(self, patch: State) -> None:
        self.applied.append((self.hub.clock(), dict(patch)))

    def fire(self) -> None:
        """The release timer going off now (early or late: the bucket decides)."""
        if self.timer is not None:
            self.timer.cancel()
            self._release()


def limited(rate: float) -> tuple[Recorded, Clock]:
    clock = Clock()
    hub = Hub(
        Settings(rate_limit=rate, seed=1),
        identities=IdentityFactory(b"k"),
        backplane=MemoryBackplane("a"),
        clock=clock,
    )
    return Recorded(hub), clock


async def test_a_release_before_the_bucket_has_a_token_waits() -> None:
    updates, clock = limited(10)
    for i in range(10):
        updates.submit({"n": i})
    assert len(updates.applied) == 10  # the burst
    updates.submit({"n": 10, "a": 1})
    updates.submit({"n": 11})
    clock.now = 0.05  # half a token
    updates.fire()
    assert len(updates.applied) == 10 and updates.timer is not None  # still pending
    clock.now = 0.1
    updates.fire()
    assert updates.applied[-1] == (0.1, {"n": 11, "a": 1})
    assert updates.pending is None
    updates.cancel()


async def test_updates_far_above_the_rate_are_applied_at_the_rate() -> None:
    # 200 updates a second for 3 s at --rate-limit 30, the release timer firing at every
    # step: at most the burst plus 30 a second get through, and the last state is exact.
    updates, clock = limited(30)
    for step in range(600):
        clock.now = step / 200
        updates.submit({"n": step, f"f{step % 3}": step})
        updates.fire()
    clock.now = 3.0 + 1 / 30
    updates.fire()
    per_second = [sum(1 for t, _ in updates.applied if s <= t < s + 1) for s in range(4)]
    assert per_second[0] <= 30 + 30 + 1 and all(n <= 31 for n in per_second[1:]), per_second
    assert len(updates.applied) <= 30 + 30 * clock.now + 1
    final: State = {}
    for _, patch in updates.applied:
        final.update(patch)
    assert final == {"n": 599, "f0": 597, "f1": 598, "f2": 599}
    updates.cancel()


def test_buckets_keep_each_key_apart_and_forget_the_least_recent_past_their_bound() -> None:
    buckets = Buckets(rate=1.0, burst_seconds=3.0, most=2)
    assert [buckets.take("a", 0.0) for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]
    assert buckets.take("b", 0.0) == 0.0  # another key has its own bucket
    assert buckets.take("a", 1.0) == 0.0  # a second later, one more
    buckets.take("c", 1.0)  # a third key: "b", the least recent, is forgotten
    assert [buckets.take("b", 1.0) for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]


def test_the_per_ip_limits_count_an_ipv6_host_by_its_64_network() -> None:
    """One host usually holds a whole /64: counted per address, it had 2^64 of them."""
    from presence.websocket.limits import client_key

    assert client_key("203.0.113.7") == "203.0.113.7"
    assert (
        client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == ("2001:db8:1:2::/64")
    )
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("not:an:address") == "not:an:address"
