"""Pace steering (next_sync_after_ms) and the bounded global view's pruning, without servers."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from omega_common.load_control import LoadControlInterceptor
from omega_common.ratelimit import KeyedRateLimiter
from omega_constellation.converters import GlobalPatternRow
from omega_constellation.global_selection import SyncAnswerFilter, patterns_for_sync
from omega_constellation.pacing import MAX_PAUSE_MS, SyncPacer
from omega_constellation.settings import ConstellationSettings


def make_settings(**overrides: Any) -> ConstellationSettings:
    return ConstellationSettings(**overrides)


def test_pause_is_the_base_interval_with_bounded_jitter() -> None:
    pacer = SyncPacer(
        make_settings(sync_interval_seconds=300, sync_interval_jitter=0.2), rng=random.Random(1)
    )
    pauses = [pacer.next_sync_after_ms("tv") for _ in range(2000)]
    assert min(pauses) >= 240_000 and max(pauses) <= 360_000
    assert min(pauses) < 250_000 and max(pauses) > 350_000  # the spread is used
    assert 295_000 < sum(pauses) / len(pauses) < 305_000
    exact = SyncPacer(make_settings(sync_interval_seconds=60, sync_interval_jitter=0.0))
    assert exact.next_sync_after_ms("tv") == 60_000


def test_pause_stretches_linearly_above_the_pressure_threshold() -> None:
    pacer = SyncPacer(make_settings(pace_pressure_threshold=0.5, pace_max_multiplier=4.0))
    assert pacer.stretch(0.0) == 1.0
    assert pacer.stretch(0.5) == 1.0
    assert pacer.stretch(0.75) == 2.5
    assert pacer.stretch(1.0) == 4.0
    assert pacer.stretch(3.0) == 4.0
    assert pacer.pressure("tv") == 0.0  # no load information


def test_pause_follows_the_device_rate_use_and_is_capped() -> None:
    limiter = KeyedRateLimiter(rate_per_second=1.0, burst=4, max_keys=10, clock=lambda: 0.0)
    load = LoadControlInterceptor(
        max_concurrent_rpcs=100, limiter=limiter, key_of=lambda method, request, metadata: None
    )
    pacer = SyncPacer(
        make_settings(
            sync_interval_seconds=100,
            sync_interval_jitter=0.0,
            pace_pressure_threshold=0.5,
            pace_max_multiplier=3.0,
        ),
        load,
    )
    assert pacer.next_sync_after_ms("tv") == 100_000
    for _ in range(3):
        limiter.acquire("tv")  # 3 of 4 tokens spent: pressure 0.75
    assert pacer.pressure("tv") == 0.75
    assert pacer.next_sync_after_ms("tv") == 200_000
    limiter.acquire("tv")
    assert pacer.next_sync_after_ms("tv") == 300_000
    assert pacer.next_sync_after_ms("another-tv") == 100_000
    huge = SyncPacer(
        make_settings(
            sync_interval_seconds=86_400,
            sync_interval_jitter=0.0,
            pace_pressure_threshold=0.0,
            pace_max_multiplier=100,
        ),
        load,
    )
    assert huge.next_sync_after_ms("tv") == MAX_PAUSE_MS  # uint32 on the wire


def row(key: str, round_: int, quality: float) -> GlobalPatternRow:
    return GlobalPatternRow(key, round_, b"", 1.0, quality, 0.9, 1, 3, 1)


def answer(rows: list[GlobalPatternRow], since: int, per_sync: int) -> list[str]:
    """What the servicer sends a device at ``since``: the first per_sync newer rows."""
    return [r.pattern_key for r in rows if r.round > since][:per_sync]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 8), st.integers(0, 20)), max_size=60),
    st.integers(0, 6),
)
def test_pruned_view_gives_every_answer_the_full_view_gives(
    specs: list[tuple[int, int]], per_sync: int
) -> None:
    full = [row(f"p{i}", r, q) for i, (r, q) in enumerate(specs)]
    full.sort(key=lambda p: (-p.quality, p.pattern_key))  # best first, as the store loads
    held = patterns_for_sync(full, per_sync)
    assert patterns_for_sync(full, per_sync, max_held=len(held)) == held
    for since in range(0, 10):
        assert answer(held, since, per_sync) == answer(full, since, per_sync)
    # Nothing is held that no answer sends.
    sent = {k for since in range(0, 10) for k in answer(full, since, per_sync)}
    assert {p.pattern_key for p in held} == sent


def test_pruning_keeps_the_newest_round_and_the_best_overall() -> None:
    old = [row(f"old{i}", 1, 10.0 - i) for i in range(5)]  # old round, high quality
    new = [row(f"new{i}", 2, 1.0 - i / 10) for i in range(5)]  # newest round, low quality
    rows = sorted(old + new, key=lambda p: -p.quality)
    held = patterns_for_sync(rows, 2)
    assert [p.pattern_key for p in held] == ["old0", "old1", "new0", "new1"]
    assert patterns_for_sync(rows, 0) == []
    # The bound keeps the best first: the answer to a new device (since 0) stays whole.
    assert [p.pattern_key for p in patterns_for_sync(rows, 2, max_held=3)] == [
        "old0",
        "old1",
        "new0",
    ]


def test_filter_says_when_no_worse_pattern_can_be_kept() -> None:
    selector = SyncAnswerFilter([1, 2, 3], per_sync=2)
    assert selector.offer(1) and selector.offer(3) and not selector.done
    assert selector.offer(2)  # one better pattern at least as new: kept
    assert not selector.offer(2)  # two: dropped
    assert selector.offer(3) and selector.done  # K patterns of the newest round seen
    assert not selector.offer(3) and not selector.offer(1)
    assert SyncAnswerFilter([], per_sync=5).done
    assert SyncAnswerFilter([1], per_sync=5, max_held=0).done
