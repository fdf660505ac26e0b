"""deploy/OPERATIONS.md, the operator guide: its settings tables cannot drift from the code.

The tables between the generated-block markers are rebuilt from the settings classes by
``tools/settings_table.py``; when a setting changes, regenerate them with

    .venv/bin/python -m tools.settings_table --write

and commit the result. The prose around them is checked for the names it uses: every
``OMEGA_*`` variable is a real setting, and the links it relies on exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from omega_constellation.settings import ConstellationSettings
from tests.deploy.helpers import DEPLOY, ROOT, unknown_omega_vars
from tools import settings_table

DOC = DEPLOY / "OPERATIONS.md"
REGENERATE = "run `.venv/bin/python -m tools.settings_table --write` and commit the file"


def test_the_settings_tables_match_the_settings_classes() -> None:
    diff = settings_table.check(DOC)
    assert not diff, (
        "deploy/OPERATIONS.md's settings tables differ from the settings classes: "
        f"{REGENERATE}\n" + "".join(diff[:60])
    )


def test_every_setting_has_a_row() -> None:
    text = DOC.read_text()
    for _heading, _source, cls in settings_table.SERVICES:
        prefix = str(cls.model_config.get("env_prefix", ""))
        for name in cls.model_fields:
            assert f"| `{prefix}{name.upper()}` |" in text, f"{prefix}{name.upper()} has no row"


def test_secrets_show_no_default() -> None:
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in DOC.read_text().splitlines()
        if line.startswith("| `OMEGA_")
    }
    for name in ("OMEGA_CONSTELLATION_FLEET_KEYS", "OMEGA_FEDERATION_SERVICE_TOKEN"):
        cells = [c.strip() for c in rows[name].split("|")]
        assert cells[3] == "(secret)", rows[name]


def test_ranges_come_from_the_field_constraints() -> None:
    port = settings_table.table(ConstellationSettings)
    assert "| `OMEGA_CONSTELLATION_PORT` | integer | `50051` | >= 0, <= 65535 |" in port
    assert '| `OMEGA_CONSTELLATION_SHARD_IDS` | JSON list of strings | `["shard-0"]` |' in port
    assert "at least 1 item |" in port


def test_check_mode_fails_on_a_stale_document(tmp_path: Path) -> None:
    stale = tmp_path / "OPERATIONS.md"
    stale.write_text(
        DOC.read_text().replace("| `OMEGA_CONSTELLATION_PORT` | integer | `50051`", "| x |", 1)
    )
    assert settings_table.main(["--check", "--doc", str(stale)]) == 1
    assert settings_table.main(["--write", "--doc", str(stale)]) == 0
    assert stale.read_text() == DOC.read_text()
    assert settings_table.main(["--check", "--doc", str(stale)]) == 0


def test_markers_are_required() -> None:
    with pytest.raises(ValueError, match="marker"):
        settings_table.replace_block("no markers here", settings_table.render())


def test_every_variable_named_in_the_prose_is_a_setting() -> None:
    names = set(re.findall(r"\bOMEGA_[A-Z0-9_]*[A-Z0-9]\b", DOC.read_text()))
    assert not unknown_omega_vars(names), unknown_omega_vars(names)


def test_links_exist() -> None:
    text = DOC.read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        assert (DOC.parent / target).resolve().exists(), target
    readme = (DEPLOY / "README.md").read_text()
    assert "## Alerts" in readme and "(README.md#alerts)" in text
    assert "(OPERATIONS.md)" in readme
    assert "Not here yet" not in readme
    for path in ("k8s/postgres.yaml", "libs/omega_common/auth.py", "tools/settings_table.py"):
        assert (ROOT / path).is_file(), path
