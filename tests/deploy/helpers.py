"""Shared helpers of the deploy/ tests: tools, the settings' env names, .dockerignore rules."""

from __future__ import annotations

import re
import shutil
import sys
from functools import cache
from pathlib import Path

import pytest

from omega_common.settings import ServiceSettings
from omega_constellation.settings import ConstellationSettings
from omega_federation.settings import FederationSettings
from omega_simulator.settings import SimulatorSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
DOCKERFILES = {
    "constellation": DOCKER / "constellation.Dockerfile",
    "federation": DOCKER / "federation.Dockerfile",
    "simulator": DOCKER / "simulator.Dockerfile",
}

# OMEGA_* variables read with os.environ rather than a settings class (documented in README).
NON_SETTINGS_OMEGA_VARS = frozenset({"OMEGA_CACHE_DIR"})


def tool(name: str) -> str:
    """Path of a dev-extras CLI (next to this interpreter, else on PATH), or skip the test.

    The tools come from pyproject's dev extras (``make setup``); a test only skips when the
    package truly could not be installed.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pyproject dev extras; run `make setup`)")
    return found


@cache
def settings_env_names() -> frozenset[str]:
    """Every environment variable a settings class reads: prefix + field name, upper case."""
    classes: list[type[ServiceSettings] | type[SimulatorSettings]] = [
        ConstellationSettings,
        FederationSettings,
        SimulatorSettings,
    ]
    names: set[str] = set()
    for cls in classes:
        prefix = str(cls.model_config.get("env_prefix", ""))
        assert prefix.startswith("OMEGA_"), cls
        names.update(prefix + field.upper() for field in cls.model_fields)
    return frozenset(names)


def unknown_omega_vars(names: object) -> list[str]:
    """The OMEGA_* names among ``names`` that no settings class (nor the cache dir) reads."""
    assert isinstance(names, (list, set, frozenset, dict, tuple))
    known = settings_env_names() | NON_SETTINGS_OMEGA_VARS
    return sorted(n for n in names if str(n).startswith("OMEGA_") and n not in known)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per rule of a .dockerignore (the subset of its syntax used here:
    ``*``, ``?``, ``**``, ``!``; a rule matching a folder also matches everything in it)."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        pattern = pattern.strip().strip("/")
        assert not any(c in pattern for c in "[]\\"), f"unsupported pattern {line!r}"
        rules.append((negated, _glob_regex(pattern)))
    return rules


def excluded(relpath: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves ``relpath`` (posix, relative to the context) out of the context:
    the last rule matching the path or one of its parent folders wins."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negated, regex in rules:
        if any(regex.match(p) for p in prefixes):
            result = not negated
    return result


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, f"{dockerfile}: dangling continuation"
    return out
