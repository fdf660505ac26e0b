"""The readiness, memory and load-control settings refuse out-of-range environment values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from omega_constellation.settings import ConstellationSettings

# setting -> (values refused, a value accepted)
BOUNDS: dict[str, tuple[tuple[str, ...], str]] = {
    "db_probe_interval_seconds": (("0", "-1", "0.01", "301", "nan"), "0.5"),
    "db_probe_timeout_seconds": (("0", "-0.5", "61", "inf"), "0.2"),
    "max_global_patterns_held": (("-1", "10000001", "1.5", "many"), "5000"),
    "max_concurrent_rpcs": (("0", "-3", "100001"), "64"),
    "device_rate_per_second": (("-0.1", "10001", "nan"), "0"),
    "device_burst": (("0", "-1", "1000001"), "10"),
    "rate_limit_max_devices": (("0", "10000001"), "1000"),
    "sync_interval_seconds": (("0", "0.5", "86401", "-300"), "60"),
    "sync_interval_jitter": (("-0.1", "0.95", "1"), "0"),
    "pace_pressure_threshold": (("-0.01", "1", "1.5"), "0.9"),
    "pace_max_multiplier": (("0.5", "0", "101"), "1"),
}


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, (bad, _) in BOUNDS.items() for v in bad])
def test_out_of_range_environment_value_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"OMEGA_CONSTELLATION_{name.upper()}", value)
    with pytest.raises(ValidationError) as err:
        ConstellationSettings()
    assert name in str(err.value)


@pytest.mark.parametrize("name", list(BOUNDS))
def test_in_range_environment_value_is_read(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    value = BOUNDS[name][1]
    monkeypatch.setenv(f"OMEGA_CONSTELLATION_{name.upper()}", value)
    assert getattr(ConstellationSettings(), name) == type(getattr(ConstellationSettings(), name))(
        float(value)
    )


def test_held_patterns_must_cover_one_sync_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMEGA_CONSTELLATION_MAX_GLOBAL_PATTERNS_PER_SYNC", "300")
    monkeypatch.setenv("OMEGA_CONSTELLATION_MAX_GLOBAL_PATTERNS_HELD", "299")
    with pytest.raises(ValidationError, match="max_global_patterns_held"):
        ConstellationSettings()
    monkeypatch.setenv("OMEGA_CONSTELLATION_MAX_GLOBAL_PATTERNS_HELD", "300")
    assert ConstellationSettings().max_global_patterns_held == 300


def test_defaults() -> None:
    settings = ConstellationSettings()
    assert settings.sync_interval_seconds == 300.0  # ARCHITECTURE: one sync per 5 min
    assert settings.max_global_patterns_held >= settings.max_global_patterns_per_sync
    assert settings.db_probe_timeout_seconds <= settings.db_probe_interval_seconds
