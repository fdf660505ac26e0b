"""Fleet scenarios as data: the built-in TOML files of ``omega_simulator/scenarios`` or a
custom TOML or YAML file, validated with pydantic.

A scenario says how many devices sync how often (``sync_interval_seconds`` of simulated time),
for how long the run lasts (``duration_seconds`` of wall time) and how fast simulated time runs
(``time_compression``: at 60, a device's 5-minute pace becomes one sync every 5 s and an hour
of viewing passes in a minute). ``phases`` multiply the fleet's sync rate for a while (the
``burst`` scenario's prime time). ``faults`` are windows of the run where a loopback TCP proxy
between the devices and the shards adds latency, resets connections or cuts them
(`omega_simulator.fleet_proxy`), or (``kill``, local stacks only) where a shard replica is
SIGKILLed and then restarted (`omega_simulator.fleet_kill`).

Device-behaviour faults are settings of the synthetic devices themselves: a
``malformed_fraction`` of the syncs carries a malformed request (expected to be refused with
INVALID_ARGUMENT), a ``factory_reset_fraction`` of the devices loses its store once mid-run and
learns its version from the shard again, a ``stale_fraction`` of the devices has its store
restored from an older backup once mid-run (stale versions), every device's timestamps are off
by up to ``clock_skew_seconds``, and a ``churn_fraction`` of the devices appears or vanishes
mid-run.
"""

from __future__ import annotations

import itertools
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "BUILTIN_SCENARIOS",
    "FAULT_KINDS",
    "PROXY_FAULT_KINDS",
    "Fault",
    "Phase",
    "Scenario",
    "ScenarioError",
    "load_scenario",
]

BUILTIN_SCENARIOS = ("light", "medium", "heavy", "burst")
FAULT_KINDS = ("latency", "reset", "cut", "kill")
PROXY_FAULT_KINDS = ("latency", "reset", "cut")


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


class Fault(BaseModel):
    """A window of the run where the fault proxy misbehaves or a replica is down.

    Kinds and their parameters:

    - ``latency``: every byte is held ``up_ms`` on its way to the shard and ``down_ms`` on
      its way back (per direction, on top of the network's own).
    - ``reset``: at the window's start, a ``fraction`` of the open connections is reset
      (TCP RST); during the window, each new connection is reset with that probability as
      soon as it is accepted. ``fraction = 1``: every connection during the whole window.
    - ``cut``: the shard is unreachable for the window. ``mode = "refuse"``: open connections
      are reset and new ones reset on accept (the client sees UNAVAILABLE at once);
      ``mode = "blackhole"``: nothing is forwarded in either direction (new connections are
      held, bytes wait) until the window ends, so calls run into their deadline.
    - ``kill`` (``--local`` only): replica ``replica`` (default 0) of the shard (of every
      shard without ``shard``) is SIGKILLed at the window's start and started again, same
      settings, database and port, at its end; the run's report gives when it answered again.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["latency", "reset", "cut", "kill"] = Field(description="What goes wrong.")
    start_seconds: float = Field(ge=0, description="Start, in wall seconds from the run's start.")
    duration_seconds: float = Field(gt=0, le=86_400, description="Length, in wall seconds.")
    shard: str | None = Field(None, description="Shard id it applies to (default: every shard).")
    up_ms: float | None = Field(
        None, ge=0, le=60_000, description="latency: added delay towards the shard, ms."
    )
    down_ms: float | None = Field(
        None, ge=0, le=60_000, description="latency: added delay towards the device, ms."
    )
    fraction: float | None = Field(
        None, gt=0, le=1, description="reset: share of connections reset."
    )
    mode: Literal["refuse", "blackhole"] | None = Field(
        None, description="cut: refuse (reset) or black-hole the connections."
    )
    replica: int | None = Field(
        None, ge=0, le=63, description="kill: which replica of the shard (default 0)."
    )

    @model_validator(mode="after")
    def _parameters_of_kind(self) -> Fault:
        allowed = {
            "latency": {"up_ms", "down_ms"},
            "reset": {"fraction"},
            "cut": {"mode"},
            "kill": {"replica"},
        }
        given = {
            n
            for n in ("up_ms", "down_ms", "fraction", "mode", "replica")
            if getattr(self, n) is not None
        }
        extra = given - allowed[self.kind]
        if extra:
            raise ValueError(f"a {self.kind} fault takes no {', '.join(sorted(extra))}")
        if self.kind == "latency" and not (self.up_ms or self.down_ms):
            raise ValueError("a latency fault needs up_ms or down_ms above 0")
        if self.kind == "reset" and self.fraction is None:
            raise ValueError("a reset fault needs a fraction in (0, 1]")
        return self

    @property
    def end_seconds(self) -> float:
        """End of the window, in wall seconds from the run's start."""
        return self.start_seconds + self.duration_seconds

    @property
    def cut_mode(self) -> str:
        """A cut's mode (``refuse`` unless given)."""
        return self.mode or "refuse"

    def active(self, t: float) -> bool:
        """Whether the window covers wall second ``t`` of the run."""
        return self.start_seconds <= t < self.end_seconds

    def label(self) -> str:
        """A short description, e.g. ``cut (refuse) 5-7 s``."""
        if self.kind == "latency":
            what = f"latency +{self.up_ms or 0:g}/+{self.down_ms or 0:g} ms"
        elif self.kind == "reset":
            what = f"reset {100 * (self.fraction or 0):g}%"
        elif self.kind == "kill":
            what = f"kill replica {self.replica or 0}"
        else:
            what = f"cut ({self.cut_mode})"
        where = f" on {self.shard}" if self.shard else ""
        return f"{what}{where} {self.start_seconds:g}-{self.end_seconds:g} s"


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
    faults: tuple[Fault, ...] = Field(
        (), description="Fault windows of the proxy between the devices and the shards."
    )
    malformed_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of syncs sent malformed (garbage delta bytes or a local version "
        "the delta contradicts); the shard is expected to refuse them with INVALID_ARGUMENT.",
    )
    factory_reset_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of devices whose store is wiped once mid-run (version back to 0, "
        "then a pull to learn the shard's version, as the brain does).",
    )
    stale_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of devices (among those not factory-reset) whose store is restored "
        "once mid-run from an older backup: their versions go back to ones the shard has "
        "applied, the shard answers them as duplicates naming its later version, and the "
        "device must number its changes past it (as the brain does).",
    )
    clock_skew_seconds: float = Field(
        0.0,
        ge=0,
        le=2_000_000,
        description="Each device's clock is off by a random offset in [-this, +this] seconds "
        "(the patterns' created/updated timestamps).",
    )
    churn_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of devices that churn: half of them appear mid-run (new devices), "
        "half vanish mid-run (no more syncs).",
    )

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
        for f in self.faults:
            if f.start_seconds >= self.duration_seconds:
                raise ValueError(
                    f"a {f.kind} fault starts at {f.start_seconds:g} s, after the run's end "
                    f"({self.duration_seconds:g} s)"
                )
        cuts = sorted((f for f in self.faults if f.kind == "cut"), key=lambda f: f.start_seconds)
        for c, d in itertools.pairwise(cuts):
            if d.start_seconds < c.end_seconds and (c.shard is None or d.shard in (None, c.shard)):
                raise ValueError(
                    f"cut faults overlap on the same shard: the one starting at "
                    f"{c.start_seconds:g} s and the one starting at {d.start_seconds:g} s"
                )
        kills = sorted((f for f in self.faults if f.kind == "kill"), key=lambda f: f.start_seconds)
        for c, d in itertools.combinations(kills, 2):
            same = (c.replica or 0) == (d.replica or 0) and (
                c.shard is None or d.shard in (None, c.shard)
            )
            if same and d.start_seconds < c.end_seconds:
                raise ValueError(
                    f"kill faults overlap on the same replica: the one starting at "
                    f"{c.start_seconds:g} s and the one starting at {d.start_seconds:g} s"
                )
        return self

    @property
    def device_faults(self) -> bool:
        """Whether any device-behaviour fault is set."""
        return bool(
            self.malformed_fraction
            or self.factory_reset_fraction
            or self.stale_fraction
            or self.clock_skew_seconds
            or self.churn_fraction
        )

    @property
    def proxy_faults(self) -> tuple[Fault, ...]:
        """The faults the loopback proxy plays (every kind but ``kill``)."""
        return tuple(f for f in self.faults if f.kind in PROXY_FAULT_KINDS)

    @property
    def kill_faults(self) -> tuple[Fault, ...]:
        """The replica kills (``--local`` runs only)."""
        return tuple(f for f in self.faults if f.kind == "kill")

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
