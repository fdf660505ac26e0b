"""`omega-simulator fleet` against a real shard process (its own database, device tokens
checked): every scheduled sync is accounted for, the report folder and its plots exist, errors
are counted by gRPC status, and `omega-simulator compare` puts two runs side by side."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from omega_simulator.__main__ import main
from omega_simulator.fleet_report import PLOTS
from tools.fuzz.shard import ShardProcess

from .fleet_support import fleet_keys_file, fleet_shard  # noqa: F401 - the fixtures

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_PNG = b"\x89PNG\r\n\x1a\n"


def _scenario(folder: Path, burst: bool = False) -> Path:
    path = folder / ("burst.toml" if burst else "small.toml")
    text = (
        'name = "small"\ndescription = "2,000 devices at 100x"\ndevices = 2000\n'
        "duration_seconds = 4\ntime_compression = 100\nrpc_timeout_seconds = 5\n"
    )
    if burst:
        # 1,000 devices at 333 syncs/s, 1,000/s for 1.5 s: on a 2-core machine the shard may
        # fall behind (its concurrency bound): B checks the accounting, not the server
        text = text.replace("devices = 2000", "devices = 1000")
        text += "[[phases]]\nstart_seconds = 1\nduration_seconds = 1.5\nrate_multiplier = 3\n"
    path.write_text(text)
    return path


def _fleet(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(["fleet", "--no-live", *argv])
    return int(done.value.code or 0)


def _report(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "report.json").read_text())
    return data


def test_short_fleet_runs_account_for_every_sync_and_compare(
    shard: ShardProcess, fleet_keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", f"shard-0={shard.targets[0]}", "--plaintext"]
    keys = ["--fleet-keys", str(fleet_keys)]
    a, b = tmp_path / "a", tmp_path / "b"
    # A: one worker; the taste comes from the shard's catalog over FetchEmbeddings
    assert _fleet(["--scenario", str(_scenario(tmp_path)), *target, *keys, "--output", str(a)]) == 0
    # B: two workers merged, and a 3x burst in the middle
    code = _fleet(
        [
            "--scenario",
            str(_scenario(tmp_path, burst=True)),
            "--workers",
            "2",
            "--seed",
            "7",
            *target,
            *keys,
            "--output",
            str(b),
        ]
    )
    assert code == 0
    assert _report(a)["figures"]["ok"] >= 0.9 * _report(a)["figures"]["scheduled"]
    for folder, expected in ((a, 2000 * 4 / 3), (b, 1000 * (2.5 + 1.5 * 3) / 3)):
        report = _report(folder)
        f = report["figures"]
        assert f["ok"] + f["failed"] == f["scheduled"]
        assert f["accounted"] is True
        assert sum(report["errors"].values()) == f["failed"]
        assert abs(f["scheduled"] - expected) < 0.05 * expected
        lat = f["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
        assert f["bytes_up"] > 0 and f["bytes_down"] > 0 and f["redirects"] == 0
        assert (
            sum(report["series"]["scheduled_per_second"]) * report["run"]["window_seconds"]
            == f["scheduled"]
        )
        assert (folder / "report.md").read_text().startswith("# Fleet run: small")
        for plot in PLOTS:
            assert (folder / plot).read_bytes()[:8] == _PNG
    assert len(_report(b)["run"]["worker_cpu_seconds"]) == 2
    burst = _report(b)["series"]["scheduled_per_second"]
    assert burst[1] > 2 * burst[0]  # the burst shows in the scheduled rate

    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["compare", str(a), str(b)])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "latency p99 ms" in printed and "syncs scheduled" in printed
    compare = (b / "compare.md").read_text()
    row = next(line for line in compare.splitlines() if line.startswith("| syncs scheduled"))
    na, nb = (_report(x)["figures"]["scheduled"] for x in (a, b))
    assert row == f"| syncs scheduled | {na:,} | {nb:,} | {100 * (nb - na) / na:+.1f}% |"


def test_refused_syncs_are_counted_by_status(shard: ShardProcess, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-keys.json"
    wrong.write_text(json.dumps({"k1": base64.b64encode(os.urandom(32)).decode("ascii")}))
    out = tmp_path / "run"
    code = _fleet(
        [
            "--scenario",
            str(_scenario(tmp_path)),
            "--devices",
            "300",
            "--duration",
            "2",
            "--target",
            shard.targets[0],
            "--plaintext",
            "--fleet-keys",
            str(wrong),
            "--catalog",
            str(shard.log_path.parent / "catalog.npz"),
            "--output",
            str(out),
        ]
    )
    assert code == 0  # the run itself worked: every sync accounted for
    report = _report(out)
    f = report["figures"]
    assert f["ok"] == 0 and f["failed"] == f["scheduled"] > 0
    assert report["errors"] == {"UNAUTHENTICATED": f["scheduled"]}
    assert sum(report["series"]["errors_per_second"]["UNAUTHENTICATED"]) > 0
