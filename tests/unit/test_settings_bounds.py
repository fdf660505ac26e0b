"""Every settings class refuses out-of-range environment values, field by field.

The cases are generated from the models themselves: for each int or float field with bounds
(pydantic ``ge``/``gt``/``le``/``lt``, the same constraints the JSON schema shows), the value
just past each bound, and for floats also NaN and the infinity past a finite bound, set as
``OMEGA_<SERVICE>_<FIELD>``, must raise `ValidationError` naming the field; the bounds
themselves (or just inside an open one) must be read. ConstellationSettings and
FederationSettings carry the `omega_common.settings.ServiceSettings` fields, so those are
covered under both prefixes. A numeric field without any bound fails
`test_every_numeric_field_is_bounded` unless it is listed in ``UNBOUNDED``.
"""

from __future__ import annotations

import math
import os
import types
import typing
from dataclasses import dataclass

import annotated_types as at
import pytest
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from omega_common.settings import ServiceSettings
from omega_constellation.settings import ConstellationSettings
from omega_federation.settings import FederationSettings
from omega_simulator.settings import SimulatorSettings

CLASSES: dict[str, type[BaseSettings]] = {
    "OMEGA_CONSTELLATION_": ConstellationSettings,
    "OMEGA_FEDERATION_": FederationSettings,
    "OMEGA_SIMULATOR_": SimulatorSettings,
}

UNBOUNDED = {"seed"}
"""Numeric fields where every value is valid (an RNG seed)."""

COMPANIONS: dict[tuple[str, str], dict[str, str]] = {
    # max_global_patterns_held must be >= max_global_patterns_per_sync (a model validator).
    ("OMEGA_CONSTELLATION_", "max_global_patterns_held"): {"MAX_GLOBAL_PATTERNS_PER_SYNC": "0"},
}
"""Other settings a field's boundary value needs to be valid."""


@dataclass(frozen=True)
class Bounds:
    kind: type  # int or float
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False


def numeric_kind(field: FieldInfo) -> type | None:
    """int or float when the field holds one (optionally None), else None."""
    annotation = field.annotation
    args: tuple[object, ...] = (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = tuple(a for a in typing.get_args(annotation) if a is not type(None))
    if len(args) == 1 and args[0] in (int, float):
        kind = args[0]
        assert isinstance(kind, type)
        return kind
    return None


def bounds_of(field: FieldInfo, kind: type) -> Bounds:
    """The field's bounds as declared (ints stay exact: 2**63 - 1 is not rounded)."""
    low = high = None
    low_open = high_open = False
    for meta in field.metadata:
        if isinstance(meta, at.Ge):
            low, low_open = typing.cast(float, meta.ge), False
        elif isinstance(meta, at.Gt):
            low, low_open = typing.cast(float, meta.gt), True
        elif isinstance(meta, at.Le):
            high, high_open = typing.cast(float, meta.le), False
        elif isinstance(meta, at.Lt):
            high, high_open = typing.cast(float, meta.lt), True
    return Bounds(kind, low, low_open, high, high_open)


def numeric_fields() -> list[tuple[str, str, FieldInfo, type]]:
    """(prefix, field name, field, int or float) of every numeric field of every class."""
    out = []
    for prefix, cls in CLASSES.items():
        for name, field in cls.model_fields.items():
            kind = numeric_kind(field)
            if kind is not None:
                out.append((prefix, name, field, kind))
    return out


def _step(kind: type, value: float) -> float:
    return 1 if kind is int else max(abs(value), 1.0) * 1e-6


def _text(kind: type, value: float) -> str:
    return str(int(value)) if kind is int else repr(float(value))


def refused_values(b: Bounds) -> list[str]:
    values = []
    if b.low is not None:
        values.append(_text(b.kind, b.low if b.low_open else b.low - _step(b.kind, b.low)))
    if b.high is not None:
        values.append(_text(b.kind, b.high if b.high_open else b.high + _step(b.kind, b.high)))
    if b.kind is float:
        values.append("nan")
        if b.high is not None:
            values.append("inf")
        if b.low is not None:
            values.append("-inf")
    return values


def accepted_values(b: Bounds) -> list[str]:
    values = []
    if b.low is not None:
        values.append(_text(b.kind, b.low + _step(b.kind, b.low) if b.low_open else b.low))
    if b.high is not None:
        values.append(_text(b.kind, b.high - _step(b.kind, b.high) if b.high_open else b.high))
    return values


def cases(pick: typing.Callable[[Bounds], list[str]]) -> list[typing.Any]:
    out = []
    for prefix, name, field, kind in numeric_fields():
        if name in UNBOUNDED:
            continue
        for value in pick(bounds_of(field, kind)):
            out.append(pytest.param(prefix, name, value, id=f"{prefix}{name.upper()}={value}"))
    return out


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OMEGA_* variable of the developer's shell leaks into a case."""
    for key in list(os.environ):
        if key.startswith("OMEGA_"):
            monkeypatch.delenv(key)


@pytest.mark.parametrize(("prefix", "name", "value"), cases(refused_values))
def test_out_of_range_environment_value_is_refused(
    monkeypatch: pytest.MonkeyPatch, prefix: str, name: str, value: str
) -> None:
    monkeypatch.setenv(f"{prefix}{name.upper()}", value)
    with pytest.raises(ValidationError) as err:
        CLASSES[prefix]()
    assert [e["loc"][0] for e in err.value.errors()] == [name], err.value


@pytest.mark.parametrize(("prefix", "name", "value"), cases(accepted_values))
def test_boundary_environment_value_is_read(
    monkeypatch: pytest.MonkeyPatch, prefix: str, name: str, value: str
) -> None:
    for other, text in COMPANIONS.get((prefix, name), {}).items():
        monkeypatch.setenv(f"{prefix}{other}", text)
    monkeypatch.setenv(f"{prefix}{name.upper()}", value)
    got = getattr(CLASSES[prefix](), name)
    if isinstance(got, float):
        assert math.isclose(got, float(value), rel_tol=1e-12)
    else:
        assert got == int(value)


def test_every_numeric_field_is_bounded() -> None:
    unbounded = [
        f"{prefix}{name.upper()}"
        for prefix, name, field, kind in numeric_fields()
        if name not in UNBOUNDED and (b := bounds_of(field, kind)).low is None and b.high is None
    ]
    assert unbounded == []


def test_service_settings_fields_are_checked_under_every_service_prefix() -> None:
    shared = {n for n, f in ServiceSettings.model_fields.items() if numeric_kind(f)}
    assert shared == {"metrics_port"}
    covered = {(p, n) for p, n, _, _ in numeric_fields()}
    for prefix, cls in CLASSES.items():
        if issubclass(cls, ServiceSettings):
            assert {(prefix, n) for n in shared} <= covered
    assert len(cases(refused_values)) > 150  # generated, not hand-picked
