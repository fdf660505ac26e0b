"""Token buckets: one per key (a device id), in memory, with a bounded number of keys.

Pure code (no I/O, no asyncio): the clock is injected, so tests drive time by hand.

A bucket holds at most ``burst`` tokens and refills at ``rate_per_second``; a request takes one
token (or ``cost``) and is refused when the bucket holds less, with the time until it would
hold enough. `KeyedRateLimiter` keeps one bucket per key in least-recently-used order and never
more than ``max_keys``: a bucket that has refilled completely is indistinguishable from a new
one, so full buckets are dropped when met at the old end, and past ``max_keys`` the least
recently used bucket is forgotten (that key starts again with a full burst: the limiter can
only be lenient, never stricter than configured).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["KeyedRateLimiter", "RateDecision", "TokenBucket"]


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The answer to one request.

    Attributes:
        allowed: the request may proceed (its tokens were taken).
        retry_after_seconds: 0 when allowed; otherwise the time until the bucket holds enough
            tokens for the same request, in seconds.
        used_fraction: how much of the burst is spent after this request, in [0, 1]
            (0: full bucket, 1: empty), a measure of how close the key is to its limit.
    """

    allowed: bool
    retry_after_seconds: float
    used_fraction: float


class TokenBucket:
    """One token bucket: ``burst`` tokens at most, refilled at ``rate_per_second``."""

    __slots__ = ("_burst", "_rate", "_tokens", "_updated")

    def __init__(self, rate_per_second: float, burst: float, now: float) -> None:
        """Start full at time ``now`` (seconds, any monotonic origin).

        Raises:
            ValueError: ``rate_per_second`` or ``burst`` is not positive.
        """
        if not rate_per_second > 0 or not burst > 0:
            raise ValueError("rate_per_second and burst must be positive")
        self._rate = rate_per_second
        self._burst = burst
        self._tokens = burst
        self._updated = now

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
            self._updated = now

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (a clock going backwards refills nothing)."""
        self._refill(now)
        return self._tokens

    def is_full(self, now: float) -> bool:
        """True when the bucket has refilled to ``burst`` (it then equals a new bucket)."""
        return self.tokens(now) >= self._burst

    def take(self, now: float, cost: float = 1.0) -> RateDecision:
        """Take ``cost`` tokens if the bucket holds them.

        Raises:
            ValueError: ``cost`` is negative or larger than ``burst`` (it could never pass).
        """
        if cost < 0 or cost > self._burst:
            raise ValueError(f"cost must be in [0, burst={self._burst}], got {cost}")
        self._refill(now)
        if self._tokens >= cost:
            self._tokens -= cost
            return RateDecision(True, 0.0, 1.0 - self._tokens / self._burst)
        wait = (cost - self._tokens) / self._rate
        return RateDecision(False, wait, 1.0 - self._tokens / self._burst)


class KeyedRateLimiter:
    """One `TokenBucket` per key, at most ``max_keys`` of them (least recently used first out).

    Not thread-safe: meant for one asyncio event loop (a replica's gRPC server).
    """

    def __init__(
        self,
        rate_per_second: float,
        burst: float,
        max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Args:
            rate_per_second: sustained requests per second allowed per key.
            burst: requests a key may make at once (the bucket size).
            max_keys: buckets kept at most; memory is O(max_keys).
            clock: seconds from any fixed origin (monotonic); injected for tests.

        Raises:
            ValueError: a non-positive rate, burst or ``max_keys``.
        """
        if not rate_per_second > 0 or not burst > 0:
            raise ValueError("rate_per_second and burst must be positive")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._rate = rate_per_second
        self._burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        """Keys currently tracked (<= ``max_keys``)."""
        return len(self._buckets)

    @property
    def burst(self) -> float:
        """Bucket size: requests one key may make at once."""
        return self._burst

    def acquire(self, key: str, cost: float = 1.0) -> RateDecision:
        """Charge ``cost`` tokens to ``key``'s bucket (created full on first use).

        Raises:
            ValueError: ``cost`` is negative or larger than ``burst``.
        """
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._burst, now)
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
        decision = bucket.take(now, cost)
        self._evict(now)
        return decision

    def used_fraction(self, key: str) -> float:
        """How much of ``key``'s burst is spent now, in [0, 1] (0 for an unknown key)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        return 1.0 - bucket.tokens(self._clock()) / self._burst

    def _evict(self, now: float) -> None:
        """Drop the oldest buckets while over ``max_keys``, and up to two full ones.

        Dropping a full bucket changes no decision; the two extra checks per call keep the
        map down to the keys active within about ``burst / rate`` seconds, at O(1) per call.
        """
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        for _ in range(2):
            if not self._buckets:
                return
            oldest_key = next(iter(self._buckets))
            if not self._buckets[oldest_key].is_full(now):
                return
            del self._buckets[oldest_key]
