"""Token buckets and the keyed rate limiter, driven by a fake clock."""

from __future__ import annotations

import pytest

from omega_common.ratelimit import KeyedRateLimiter, TokenBucket


class FakeClock:
    """Seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate_per_second=2.0, burst=3, now=0.0)
    assert all(bucket.take(0.0).allowed for _ in range(3))
    refused = bucket.take(0.0)
    assert not refused.allowed
    assert refused.retry_after_seconds == pytest.approx(0.5)  # one token at 2/s
    assert refused.used_fraction == pytest.approx(1.0)
    assert not bucket.take(0.49).allowed
    allowed = bucket.take(0.5)
    assert allowed.allowed and allowed.retry_after_seconds == 0.0
    # Never more than the burst, however long the pause.
    assert bucket.tokens(1e6) == pytest.approx(3.0)
    assert bucket.is_full(1e6)


def test_bucket_ignores_a_clock_going_backwards_and_checks_its_arguments() -> None:
    bucket = TokenBucket(rate_per_second=1.0, burst=1, now=10.0)
    assert bucket.take(10.0).allowed
    assert not bucket.take(5.0).allowed  # no refill from the past
    assert bucket.tokens(10.0) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        bucket.take(11.0, cost=2)  # could never pass
    with pytest.raises(ValueError):
        TokenBucket(rate_per_second=0.0, burst=1, now=0.0)
    with pytest.raises(ValueError):
        TokenBucket(rate_per_second=1.0, burst=0, now=0.0)


def test_limiter_keeps_one_bucket_per_key() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter(rate_per_second=1.0, burst=2, max_keys=10, clock=clock)
    assert limiter.acquire("tv-a").allowed and limiter.acquire("tv-a").allowed
    refused = limiter.acquire("tv-a")
    assert not refused.allowed and refused.retry_after_seconds == pytest.approx(1.0)
    assert limiter.acquire("tv-b").allowed  # another device is unaffected
    assert limiter.used_fraction("tv-a") == pytest.approx(1.0)
    assert limiter.used_fraction("tv-b") == pytest.approx(0.5)
    assert limiter.used_fraction("tv-unknown") == 0.0
    clock.now += 1.0
    assert limiter.acquire("tv-a").allowed
    assert limiter.burst == 2


def test_limiter_memory_is_bounded_least_recently_used_first() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter(rate_per_second=0.001, burst=1, max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        assert limiter.acquire(key).allowed
    assert not limiter.acquire("a").allowed  # "a" is now the most recently used
    assert limiter.acquire("d").allowed  # evicts "b", the least recently used
    assert len(limiter) == 3
    assert not limiter.acquire("a").allowed  # still tracked, still empty
    assert limiter.acquire("b").allowed  # forgotten: starts again with a full burst
    for i in range(1000):
        limiter.acquire(f"k{i}")
    assert len(limiter) == 3


def test_limiter_drops_buckets_that_refilled() -> None:
    clock = FakeClock()
    limiter = KeyedRateLimiter(rate_per_second=1.0, burst=2, max_keys=100, clock=clock)
    for i in range(10):
        limiter.acquire(f"old-{i}")
    assert len(limiter) == 10
    clock.now += 5.0  # every old bucket is full again: equal to a new one
    for i in range(5):
        limiter.acquire(f"new-{i}")
    # Each call drops up to two full buckets from the old end: 10 old ones gone in 5 calls.
    assert len(limiter) == 5


def test_limiter_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        KeyedRateLimiter(rate_per_second=1.0, burst=1, max_keys=0)
    with pytest.raises(ValueError):
        KeyedRateLimiter(rate_per_second=-1.0, burst=1, max_keys=1)
