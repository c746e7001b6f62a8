import pytest

from presence.core.ratelimit import TokenBucket

pytestmark = pytest.mark.unit


def test_bucket_allows_burst_then_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0)
    assert [bucket.allow(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time(0) == 0.1
    assert not bucket.allow(0.05)
    assert bucket.allow(0.1)
    # A long pause refills to the burst, not beyond.
    assert sum(bucket.allow(100) for _ in range(10)) == 3
