"""Change detection of secret files (`WatchedFiles`), the reloaded fleet keys
(`FleetKeysFile`), the PEM checks done before a reload (`check_pem_files`) and the periodic
worker's per-round channel refresh. The gRPC side: tests/integration/test_rotation.py."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from omega_common.auth import AuthenticationError, FleetKeys, FleetKeysFile
from omega_common.tls import check_pem_files, dev_pki
from omega_common.watched_files import WatchedFiles
from omega_federation import worker
from omega_federation.settings import FederationSettings
from omega_federation.worker import RoundReport, run_periodic

S1 = base64.b64encode(b"1" * 32).decode()
S2 = base64.b64encode(b"2" * 32).decode()


def _swap(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_watched_files_report_each_change_once_and_only_when_due(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "a"
    path.write_text("1")
    files = WatchedFiles([path, None], recheck_seconds=5, clock=lambda: now[0])
    assert files.paths == (path,)
    _swap(path, "2")
    assert not files.changed()  # not due yet
    now[0] = 5.0
    assert files.changed()
    now[0] = 10.0
    assert not files.changed()  # the same change is not reported twice
    path.unlink()  # a missing file is a change (the reload then fails and is refused)
    now[0] = 15.0
    assert files.changed()
    with pytest.raises(ValueError):
        WatchedFiles([path], recheck_seconds=0)


def test_fleet_keys_file_does_not_stat_on_every_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.json"
    _swap(path, json.dumps({"k1": S1}))
    keys = FleetKeysFile(path, recheck_seconds=3600)
    stats: list[object] = []
    real_stat = os.stat

    def counting_stat(p: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        stats.append(p)
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)  # what watched_files calls
    token = FleetKeys.from_json(json.dumps({"k1": S1})).issue("tv-1")
    for _ in range(1000):
        assert keys.verify(token).device_id == "tv-1"
    assert stats == []


def test_fleet_keys_file_reload_and_refusal(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _swap(path, json.dumps({"k1": S1}))
    outcomes: list[str] = []
    keys = FleetKeysFile(path, recheck_seconds=1e-9, on_reload=outcomes.append)
    both = FleetKeys.from_json(json.dumps({"k1": S1, "k2": S2}))
    with pytest.raises(AuthenticationError, match="unknown key id"):
        keys.verify(both.issue("tv", key_id="k2"))
    _swap(path, json.dumps({"k1": S1, "k2": S2}))
    assert keys.verify(both.issue("tv", key_id="k2")).key_id == "k2"
    assert keys.key_ids == ("k1", "k2") and outcomes == ["ok"]
    _swap(path, "not json")
    assert keys.verify(both.issue("tv", key_id="k1")).key_id == "k1"  # old keys kept
    assert keys.key_ids == ("k1", "k2")  # refused once, not again while unchanged
    assert outcomes == ["ok", "refused"]
    _swap(path, json.dumps({"k2": S2}))
    with pytest.raises(AuthenticationError, match="unknown key id"):
        keys.verify(both.issue("tv", key_id="k1"))
    assert outcomes == ["ok", "refused", "ok"]


def test_check_pem_files_refuses_mismatched_and_truncated_files(tmp_path: Path) -> None:
    a, b = dev_pki(tmp_path / "a"), dev_pki(tmp_path / "b")
    cert, key, ca = check_pem_files(a.server_cert, a.server_key, a.ca_cert)
    assert cert and key and ca
    with pytest.raises(ValueError, match="does not match"):
        check_pem_files(a.server_cert, b.server_key)
    half = tmp_path / "half.crt"
    pem = a.server_cert.read_bytes()
    half.write_bytes(pem[: len(pem) // 2])
    with pytest.raises(ValueError, match="not a PEM certificate"):
        check_pem_files(half, a.server_key)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        check_pem_files(a.server_cert, half)
    with pytest.raises(ValueError, match="cannot read"):
        check_pem_files(tmp_path / "missing.crt", a.server_key)


async def test_periodic_worker_takes_its_channels_from_refresh_each_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stop = asyncio.Event()
    used: list[object] = []
    fresh: list[dict[str, Any]] = [{"shard-0": 1}, {"shard-0": 2}]

    async def fake_round(_settings: Any, _state: Any, channels: Any) -> RoundReport:
        used.append(channels)
        if len(used) == 2:
            stop.set()
        return RoundReport(None, "skipped_locked")

    async def refresh() -> Any:
        return fresh[len(used)]

    monkeypatch.setattr(worker, "run_round", fake_round)
    settings = FederationSettings(interval_seconds=0.001, plaintext=True)
    await run_periodic(settings, None, {}, stop, refresh=refresh)  # type: ignore[arg-type]
    assert used == fresh
