"""Fleet scenarios as data: the built-in TOML files of ``omega_simulator/scenarios`` or a
custom TOML or YAML file, validated with pydantic.

A scenario says how many devices sync how often (``sync_interval_seconds`` of simulated time),
for how long the run lasts (``duration_seconds`` of wall time) and how fast simulated time runs
(``time_compression``: at 60, a device's 5-minute pace becomes one sync every 5 s and an hour
of viewing passes in a minute). ``phases`` multiply the fleet's sync rate for a while (the
``burst`` scenario's prime time).
"""

from __future__ import annotations

import itertools
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["BUILTIN_SCENARIOS", "Phase", "Scenario", "ScenarioError", "load_scenario"]

BUILTIN_SCENARIOS = ("light", "medium", "heavy", "burst")


class ScenarioError(ValueError):
    """A scenario that cannot be used: unknown name, unreadable file or invalid values."""


class Phase(BaseModel):
    """A stretch of the run where the fleet syncs ``rate_multiplier`` times as often."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_seconds: float = Field(ge=0, description="Start, in wall seconds from the run's start.")
    duration_seconds: float = Field(gt=0, description="Length, in wall seconds.")
    rate_multiplier: float = Field(
        gt=0, le=1000, description="Sync rate relative to the base pace."
    )


class Scenario(BaseModel):
    """One fleet run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, description="Label of the run.")
    description: str = Field("", description="One line for the report.")
    devices: int = Field(ge=1, le=10_000_000, description="Simulated devices.")
    sync_interval_seconds: float = Field(
        300.0, gt=0, description="Each device's pace between syncs, in simulated seconds."
    )
    duration_seconds: float = Field(
        60.0, gt=0, le=86_400, description="Wall time of the run; it stops by itself."
    )
    time_compression: float = Field(
        1.0, gt=0, le=100_000, description="Simulated seconds per wall second."
    )
    workers: int = Field(1, ge=1, le=64, description="Load-generator processes.")
    connections_per_worker: int = Field(
        2, ge=1, le=64, description="gRPC channels (TCP connections) per worker."
    )
    seed: int = Field(0, description="Seed of the devices' tastes, phases and viewings.")
    rpc_timeout_seconds: float = Field(10.0, gt=0, le=600, description="Deadline of each sync.")
    start_hour: float = Field(
        20.0, ge=0, lt=24, description="Simulated local time of day at the run's start."
    )
    views_per_day: float = Field(
        6.0, ge=0, le=1000, description="Mean viewings per device per simulated day."
    )
    favourite_clusters: int = Field(
        3, ge=1, le=32, description="Catalog clusters a device's taste is drawn from."
    )
    catalog_clusters: int = Field(
        32, ge=1, le=4096, description="Clusters the catalog is split into (k-means)."
    )
    phases: tuple[Phase, ...] = Field((), description="Rate multipliers over parts of the run.")

    @model_validator(mode="after")
    def _phases_inside_run(self) -> Scenario:
        ordered = sorted(self.phases, key=lambda p: p.start_seconds)
        for a, b in itertools.pairwise(ordered):
            if b.start_seconds < a.start_seconds + a.duration_seconds:
                raise ValueError(
                    f"phases overlap: the one starting at {a.start_seconds:g} s and the one "
                    f"starting at {b.start_seconds:g} s"
                )
        for p in ordered:
            if p.start_seconds >= self.duration_seconds:
                raise ValueError(
                    f"a phase starts at {p.start_seconds:g} s, after the run's end "
                    f"({self.duration_seconds:g} s)"
                )
        return self

    @property
    def interval_wall_seconds(self) -> float:
        """A device's pace in wall seconds (the simulated interval over the compression)."""
        return self.sync_interval_seconds / self.time_compression

    @property
    def base_rate_per_second(self) -> float:
        """The fleet's syncs per wall second outside phases."""
        return self.devices / self.interval_wall_seconds

    def rate_multiplier_at(self, t: float) -> float:
        """The rate multiplier at wall second ``t`` of the run (1 outside phases)."""
        for p in self.phases:
            if p.start_seconds <= t < p.start_seconds + p.duration_seconds:
                return p.rate_multiplier
        return 1.0

    def with_overrides(self, **values: Any) -> Scenario:
        """A copy with the given fields replaced (None values ignored), validated again.

        Raises:
            ScenarioError: the result is invalid.
        """
        data = self.model_dump()
        data.update({k: v for k, v in values.items() if v is not None})
        return _validate(data, f"scenario {self.name!r} with command-line options")


def _format_errors(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        where = ".".join(str(part) for part in e["loc"]) or "(scenario)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def _validate(data: Any, source: str) -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a table of scenario fields")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"{source} is invalid:\n{_format_errors(exc)}") from None


def _parse_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario file {path}: {exc.strerror}") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]  # optional; no stubs installed
        except ImportError:
            raise ScenarioError(
                f"{path}: YAML scenarios need PyYAML (pip install pyyaml), or use TOML"
            ) from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    raise ScenarioError(f"{path}: a scenario file ends in .toml, .yaml or .yml")


def load_scenario(name_or_path: str) -> Scenario:
    """A built-in scenario by name (``light``, ``medium``, ``heavy``, ``burst``) or a file.

    Args:
        name_or_path: a built-in name, or the path of a ``.toml``, ``.yaml`` or ``.yml`` file.

    Raises:
        ScenarioError: unknown name, unreadable or unparsable file, or invalid values (every
            invalid field is named with the reason).
    """
    if name_or_path in BUILTIN_SCENARIOS:
        text = (
            resources.files("omega_simulator")
            .joinpath("scenarios", f"{name_or_path}.toml")
            .read_text(encoding="utf-8")
        )
        return _validate(tomllib.loads(text), f"built-in scenario {name_or_path!r}")
    path = Path(name_or_path)
    if not path.suffix:
        raise ScenarioError(
            f"unknown scenario {name_or_path!r}: use one of {', '.join(BUILTIN_SCENARIOS)} "
            "or a .toml/.yaml file"
        )
    return _validate(_parse_file(path), str(path))
