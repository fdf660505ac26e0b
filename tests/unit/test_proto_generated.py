"""The committed generated code matches proto/ (`make proto-check`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_generated_code_is_fresh() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["make", "-s", "proto-check", f"VENV={Path(sys.executable).parent.parent}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
