"""Fleet scenarios: the built-in files load, custom files are validated with clear errors,
and the open-loop schedule has the scenario's rate (bursts included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omega_simulator.fleet_scenario import (
    BUILTIN_SCENARIOS,
    Scenario,
    ScenarioError,
    load_scenario,
)
from omega_simulator.fleet_worker import build_schedule


def test_builtin_scenarios_load_with_the_reference_fleet_sizes() -> None:
    sizes = {name: load_scenario(name).devices for name in BUILTIN_SCENARIOS}
    assert sizes == {"light": 10_000, "medium": 100_000, "heavy": 1_000_000, "burst": 100_000}
    assert load_scenario("heavy").workers > 1
    burst = load_scenario("burst")
    assert [p.rate_multiplier for p in burst.phases] == [10.0]
    assert burst.phases[0].duration_seconds == 60.0
    for name in BUILTIN_SCENARIOS:
        assert load_scenario(name).sync_interval_seconds == 300.0


def test_custom_toml_and_yaml_files(tmp_path: Path) -> None:
    toml = tmp_path / "mine.toml"
    toml.write_text('name = "mine"\ndevices = 500\nduration_seconds = 10\n')
    assert load_scenario(str(toml)).devices == 500
    yaml = tmp_path / "mine.yaml"
    yaml.write_text(
        "name: y\ndevices: 7\nphases:\n  - {start_seconds: 1, duration_seconds: 2, "
        "rate_multiplier: 3}\n"
    )
    scenario = load_scenario(str(yaml))
    assert scenario.rate_multiplier_at(1.5) == 3.0
    assert scenario.rate_multiplier_at(3.5) == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\ndevices = 0\n', "devices: Input should be greater than or equal to 1"),
        ('name = "x"\n', "devices: Field required"),
        ('name = "x"\ndevices = 5\nsync_intervall = 3\n', "sync_intervall: Extra inputs"),
        ('name = "x"\ndevices = "many"\n', "devices: Input should be a valid integer"),
        (
            'name = "x"\ndevices = 5\nduration_seconds = 10\n[[phases]]\nstart_seconds = 20\n'
            "duration_seconds = 1\nrate_multiplier = 2\n",
            "after the run's end",
        ),
        (
            'name = "x"\ndevices = 5\n[[phases]]\nstart_seconds = 1\nduration_seconds = 5\n'
            "rate_multiplier = 2\n[[phases]]\nstart_seconds = 3\nduration_seconds = 1\n"
            "rate_multiplier = 2\n",
            "phases overlap",
        ),
        ("name = \n", "not valid TOML"),
    ],
)
def test_invalid_files_name_the_field_and_the_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(str(path))
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_names_missing_files_and_bad_overrides(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="unknown scenario 'huge'"):
        load_scenario("huge")
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(str(tmp_path / "absent.toml"))
    with pytest.raises(ScenarioError, match=r"\.toml, \.yaml or \.yml"):
        (tmp_path / "x.json").write_text("{}")
        load_scenario(str(tmp_path / "x.json"))
    with pytest.raises(ScenarioError, match="workers"):
        load_scenario("light").with_overrides(workers=0)
    assert load_scenario("light").with_overrides(duration_seconds=5, seed=None).seed == 0


def test_schedule_is_open_loop_at_the_scenario_rate() -> None:
    scenario = Scenario(name="s", devices=1000, duration_seconds=20, time_compression=60)
    times, devices = build_schedule(scenario, 1000, np.random.default_rng(1))
    assert np.all(np.diff(times) >= 0) and times[-1] < 20 and times[0] >= 0
    # one sync per 5 s per device over 20 s: 4 each
    assert np.bincount(devices, minlength=1000).tolist() == [4] * 1000
    assert abs(len(times) - scenario.base_rate_per_second * 20) <= 1


def test_schedule_burst_phase_multiplies_the_rate() -> None:
    scenario = Scenario.model_validate(
        {
            "name": "b",
            "devices": 2000,
            "duration_seconds": 30,
            "time_compression": 30,  # one sync per 10 s per device: 200/s
            "phases": [{"start_seconds": 10, "duration_seconds": 10, "rate_multiplier": 10}],
        }
    )
    times, _ = build_schedule(scenario, 2000, np.random.default_rng(2))
    per_second = np.bincount(times.astype(int), minlength=30)
    assert 150 < per_second[2:9].mean() < 250
    assert 1800 < per_second[11:19].mean() < 2200
    assert 150 < per_second[21:29].mean() < 250


def test_device_faults_are_validated_settings(tmp_path: Path) -> None:
    path = tmp_path / "df.toml"
    path.write_text(
        'name = "df"\ndevices = 10\nmalformed_fraction = 0.1\nfactory_reset_fraction = 0.2\n'
        "clock_skew_seconds = 3600\nchurn_fraction = 0.3\n"
    )
    scenario = load_scenario(str(path))
    assert scenario.device_faults
    assert (scenario.malformed_fraction, scenario.churn_fraction) == (0.1, 0.3)
    assert not load_scenario("light").device_faults
    for bad in ("malformed_fraction = 1.5", "churn_fraction = -0.1", "clock_skew_seconds = -1"):
        path.write_text(f'name = "df"\ndevices = 10\n{bad}\n')
        with pytest.raises(ScenarioError, match=bad.split(" ")[0]):
            load_scenario(str(path))
