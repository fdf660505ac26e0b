"""deploy/docker: the images' Dockerfiles, linted by hadolint and checked for what the
deployment relies on; the build context (.dockerignore) builds the project wheel.

No Docker engine exists on these machines: nothing here builds an image. What is real: the
lint, the Dockerfiles' content, and `pip wheel` of exactly the files the context lets through.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.deploy.helpers import (
    DOCKER,
    DOCKERFILES,
    ROOT,
    dockerignore_rules,
    excluded,
    instructions,
    tool,
    unknown_omega_vars,
)

HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OCI_LABELS = {
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.created",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.vendor",
    "org.opencontainers.image.base.name",
}


def _hadolint(*files: Path) -> tuple[int, list[dict[str, object]]]:
    done = subprocess.run(
        [tool("hadolint"), "-c", str(HADOLINT_CONFIG), "-f", "json", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(done.stdout or "[]")
    assert isinstance(findings, list), done.stdout
    return done.returncode, findings


def test_hadolint_reports_nothing_on_every_dockerfile() -> None:
    code, findings = _hadolint(*DOCKERFILES.values())
    assert findings == [], json.dumps(findings, indent=1)
    assert code == 0


def test_hadolint_config_is_strict_and_ignores_nothing() -> None:
    import yaml

    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert config["failure-threshold"] == "info"
    assert config.get("ignored", []) == [], "document every ignored rule here and in the test"
    assert set(config["label-schema"]) == OCI_LABELS
    assert config["strict-labels"] is True


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs with this config: the usual mistakes are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    code, findings = _hadolint(bad)
    codes = {str(f["code"]) for f in findings}
    assert code != 0
    assert {"DL3007", "DL3013", "DL3042", "DL3049", "DL3002"} <= codes, codes


def _stages(dockerfile: Path) -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            current = stages.setdefault(name.strip(), [])
            current.append((keyword, image.strip()))
        elif current is not None:
            current.append((keyword, rest))
    return stages


def _env(items: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in items:
        if keyword == "ENV":
            for word in shlex.split(rest):
                name, _, value = word.partition("=")
                env[name] = value
    return env


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_is_multi_stage_slim_non_root_labelled(image: str) -> None:
    dockerfile = DOCKERFILES[image]
    stages = _stages(dockerfile)
    assert list(stages) == ["base", "build", "runtime"]
    assert stages["base"][0] == ("FROM", "python:3.11-slim-bookworm")
    assert stages["build"][0] == ("FROM", "base")
    assert stages["runtime"][0] == ("FROM", "base")
    # Build stage: the project wheel and its dependencies' from pyproject.toml, nothing else.
    build = [rest for keyword, rest in stages["build"] if keyword == "RUN"]
    assert build == ["pip wheel --no-cache-dir --wheel-dir /wheels ."]
    # Runtime: installs only from those wheels (no index, no dev extras), as a numeric non-root
    # user, with the allocator setting.
    runtime = stages["runtime"]
    runs = " ".join(rest for keyword, rest in runtime if keyword == "RUN")
    assert "--no-index --find-links=/wheels" in runs
    assert '"exogenesis-omega==${VERSION}"' in runs
    assert "[dev]" not in dockerfile.read_text()
    assert not any(keyword == "COPY" for keyword, _ in runtime), "runtime copies nothing"
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users == ["10001:10001"]
    env = _env(stages["base"]) | _env(runtime)
    assert env["MALLOC_ARENA_MAX"] == "2"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert unknown_omega_vars(list(env)) == []
    # OCI labels, with the version of pyproject.toml.
    labels = " ".join(rest for keyword, rest in stages["base"] if keyword == "LABEL")
    found = set(re.findall(r"(org\.opencontainers\.image\.[a-z.]+)=", labels))
    assert found == OCI_LABELS
    assert f'org.opencontainers.image.title="omega-{image}"' in labels
    global_args = dockerfile.read_text().split("\nFROM ", 1)[0]
    assert f"ARG VERSION={PYPROJECT['project']['version']}" in global_args
    # The entry point is the project's console script of this service.
    entry = [json.loads(rest) for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    assert entry == [[f"omega-{image}"]]
    assert f"omega-{image}" in PYPROJECT["project"]["scripts"]


def _one(items: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for k, rest in items if k == keyword]
    assert len(found) == 1, (keyword, found)
    return found[0]


def test_constellation_image_ports_and_healthcheck() -> None:
    runtime = _stages(DOCKERFILES["constellation"])["runtime"]
    env = _env(runtime)
    exposed = set(_one(runtime, "EXPOSE").split())
    assert exposed == {
        env["OMEGA_CONSTELLATION_PORT"],
        env["OMEGA_CONSTELLATION_FEDERATION_PORT"],
        env["OMEGA_CONSTELLATION_METRICS_PORT"],
    }
    assert env["OMEGA_CONSTELLATION_HOST"] == "0.0.0.0"
    assert env["OMEGA_CONSTELLATION_FEDERATION_HOST"] == "0.0.0.0"
    health = _one(runtime, "HEALTHCHECK")
    assert health.endswith('CMD ["omega-constellation", "health"]'), health
    assert json.loads(_one(runtime, "CMD")) == ["serve"]


def test_federation_image_ports_and_healthcheck() -> None:
    runtime = _stages(DOCKERFILES["federation"])["runtime"]
    env = _env(runtime)
    assert _one(runtime, "EXPOSE").split() == [env["OMEGA_FEDERATION_METRICS_PORT"]]
    health = _one(runtime, "HEALTHCHECK")
    command = json.loads(health.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")  # the probe is valid Python
    assert "OMEGA_FEDERATION_METRICS_PORT" in command[2]
    assert json.loads(_one(runtime, "CMD")) == ["periodic"]


def test_simulator_image_is_a_batch_job() -> None:
    runtime = _stages(DOCKERFILES["simulator"])["runtime"]
    assert _one(runtime, "HEALTHCHECK") == "NONE"
    assert json.loads(_one(runtime, "CMD")) == ["run"]
    assert not [rest for keyword, rest in runtime if keyword == "EXPOSE"]


def _copy_sources() -> set[str]:
    sources: set[str] = set()
    for dockerfile in DOCKERFILES.values():
        for keyword, rest in instructions(dockerfile):
            if keyword == "COPY":
                words = [w for w in rest.split() if not w.startswith("--")]
                sources.update(words[:-1])
    return sources


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    rules = dockerignore_rules(ROOT / ".dockerignore")
    sources = _copy_sources()
    assert sources == {"pyproject.toml", "README.md", "libs", "services"}
    for source in sources:
        assert not excluded(source, rules), source
    assert not excluded("libs/omega_common/settings.py", rules)
    assert not excluded("services/constellation/omega_constellation/__main__.py", rules)
    for path in (
        ".git/config",
        ".venv/bin/python",
        "deploy/dev-secrets/server.key",
        "tests/conftest.py",
        "reports/simulation-report.json",
        "libs/omega_common/__pycache__/settings.cpython-311.pyc",
        "exogenesis_omega.egg-info/PKG-INFO",
        "build/lib/x.py",
    ):
        assert excluded(path, rules), path


def test_the_filtered_build_context_builds_the_wheel(tmp_path: Path) -> None:
    """What `pip wheel .` in the build stage does, on exactly the files the context keeps
    (offline: no index, the venv's setuptools)."""
    rules = dockerignore_rules(ROOT / ".dockerignore")
    context = tmp_path / "context"
    for source in _copy_sources():
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if not excluded(rel, rules):
                (context / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, context / rel)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index"),
            *("--no-build-isolation", "--wheel-dir", str(wheels), str(context)),
        ],
        check=True,
        timeout=240,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("exogenesis_omega-*.whl")
    assert wheel.name.startswith(f"exogenesis_omega-{PYPROJECT['project']['version']}-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        assert any(n.startswith(package.replace(".", "/") + "/") for n in names), package
    # The services migrate their schema at start-up from these files (omega_common.db).
    for service in ("constellation", "federation"):
        folder = ROOT / "services" / service / f"omega_{service}" / "migrations"
        for sql in folder.glob("*.sql"):
            assert f"omega_{service}/migrations/{sql.name}" in names, sql
    for image in DOCKERFILES:
        assert f"omega-{image} = omega_{image}.__main__:main" in scripts
