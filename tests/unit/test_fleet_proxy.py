"""The fleet's fault proxy against a loopback echo server: it forwards bytes, adds latency per
direction, resets and refuses connections, black-holes them for a window; fault windows are
validated by the scenario model; the report splits the run's figures inside/outside them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from omega_simulator.fleet_measure import Recorder
from omega_simulator.fleet_proxy import FaultProxies, FaultProxy, Timeline
from omega_simulator.fleet_report import fault_figures
from omega_simulator.fleet_scenario import Fault, Scenario, ScenarioError, load_scenario

pytestmark = pytest.mark.timeout(30)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()


async def _proxy(target: str, *faults: Fault, origin: float | None = None) -> FaultProxy:
    timeline = Timeline()
    timeline.begin(time.time() if origin is None else origin)
    proxy = FaultProxy(target, faults, timeline)
    await proxy.start()
    return proxy


async def _round_trip(address: str, payload: bytes = b"ping") -> tuple[bytes, float]:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        t0 = time.monotonic()
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
        return data, time.monotonic() - t0
    finally:
        writer.close()


async def test_forwards_bytes_both_ways(echo: str) -> None:
    proxy = await _proxy(echo)
    try:
        payload = bytes(range(256)) * 1000
        data, _ = await _round_trip(proxy.address, payload)
        assert data == payload
        assert proxy.stats()["connections"] == 1
    finally:
        await proxy.stop()


async def test_latency_is_added_per_direction_inside_the_window(echo: str) -> None:
    fault = Fault(kind="latency", start_seconds=0, duration_seconds=60, up_ms=80, down_ms=40)
    proxy = await _proxy(echo, fault)
    try:
        _, inside = await _round_trip(proxy.address)
        assert 0.115 <= inside < 0.5
    finally:
        await proxy.stop()
    later = await _proxy(echo, fault, origin=time.time() - 120)  # window over
    try:
        _, after = await _round_trip(later.address)
        assert after < 0.05
    finally:
        await later.stop()


async def test_cut_refuse_resets_open_connections_and_new_ones_until_it_ends(echo: str) -> None:
    cut = Fault(kind="cut", start_seconds=0.3, duration_seconds=0.5, mode="refuse")
    proxy = await _proxy(echo, cut)
    try:
        host, _, port = proxy.address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        await asyncio.sleep(0.45)  # inside the cut: the open connection was reset
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            writer.write(b"b")
            await writer.drain()
            await asyncio.wait_for(reader.readexactly(1), 2)
        writer.close()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _round_trip(proxy.address)
        await asyncio.sleep(0.5)  # after the cut
        data, _ = await _round_trip(proxy.address)
        assert data == b"ping"
        reset = proxy.stats()["faults"][cut.label()]["connections_reset"]
        assert reset >= 2
    finally:
        await proxy.stop()


async def test_cut_blackhole_holds_bytes_until_the_window_ends(echo: str) -> None:
    cut = Fault(kind="cut", start_seconds=0, duration_seconds=0.6, mode="blackhole")
    proxy = await _proxy(echo, cut)
    try:
        data, took = await _round_trip(proxy.address)
        assert data == b"ping"
        assert 0.5 <= took < 2.0
        assert proxy.stats()["faults"][cut.label()]["connections_held"] == 1
    finally:
        await proxy.stop()


async def test_reset_all_resets_every_connection_during_the_window(echo: str) -> None:
    fault = Fault(kind="reset", start_seconds=0, duration_seconds=60, fraction=1.0)
    proxy = await _proxy(echo, fault)
    try:
        for _ in range(3):
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await _round_trip(proxy.address)
        assert proxy.stats()["faults"][fault.label()]["connections_reset"] == 3
    finally:
        await proxy.stop()


def test_fault_proxies_thread_forwards_to_each_shard() -> None:
    async def serve_and_check(addresses: dict[str, str]) -> bytes:
        return (await _round_trip(addresses["a"]))[0]

    async def main() -> None:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proxies = FaultProxies({"a": f"127.0.0.1:{port}"}, [], seed=1)
        addresses = await asyncio.to_thread(proxies.start)
        try:
            assert addresses["a"] != f"127.0.0.1:{port}"
            assert await serve_and_check(addresses) == b"ping"
        finally:
            await asyncio.to_thread(proxies.stop)
            server.close()

    asyncio.run(main())


def _scenario(**faults: Any) -> dict[str, Any]:
    return {"name": "f", "devices": 10, "duration_seconds": 30, "faults": [faults]}


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"kind": "latency", "start_seconds": 1, "duration_seconds": 2}, "needs up_ms"),
        (
            {"kind": "latency", "start_seconds": 1, "duration_seconds": 2, "fraction": 0.5},
            "takes no fraction",
        ),
        ({"kind": "reset", "start_seconds": 1, "duration_seconds": 2}, "needs a fraction"),
        ({"kind": "cut", "start_seconds": 40, "duration_seconds": 2}, "after the run's end"),
        ({"kind": "flood", "start_seconds": 1, "duration_seconds": 2}, "kind"),
        ({"kind": "cut", "start_seconds": 1, "duration_seconds": 2, "mode": "x"}, "mode"),
    ],
)
def test_invalid_faults_are_refused_with_the_reason(
    tmp_path: Any, fault: dict[str, Any], message: str
) -> None:
    import json

    path = tmp_path / "s.toml"
    lines = ['name = "f"', "devices = 10", "duration_seconds = 30", "[[faults]]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in fault.items()]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ScenarioError, match=message):
        load_scenario(str(path))


def test_overlapping_cuts_on_one_shard_are_refused() -> None:
    data = _scenario(kind="cut", start_seconds=1, duration_seconds=5)
    data["faults"].append({"kind": "cut", "start_seconds": 3, "duration_seconds": 1})
    with pytest.raises(ValueError, match="overlap"):
        Scenario.model_validate(data)
    data["faults"][0]["shard"] = "a"
    data["faults"][1]["shard"] = "b"
    assert len(Scenario.model_validate(data).faults) == 2


def test_fault_figures_split_the_run_inside_and_outside_each_window() -> None:
    rec = Recorder(1.0, 12)
    fault = Fault(kind="cut", start_seconds=4, duration_seconds=2)
    for w in range(10):
        t = w + 0.5
        rec.schedule([t] * 10)
        for _ in range(10):
            if 4 <= t < 6 or (t == 6.5 and _ < 2):  # the cut, and 2 stragglers just after
                rec.record_failure(t, "UNAVAILABLE")
            else:
                rec.record_ok(t, t + 0.005, 100, 50, False)
    out = fault_figures(rec, (fault,), 10)
    row = out["faults"][0]
    assert row["window_seconds"] == [4.0, 6.0]
    assert row["inside"]["scheduled"] == 20 and row["inside"]["failed"] == 20
    assert row["inside"]["errors"] == {"UNAVAILABLE": 20}
    assert row["outside"]["failed"] == 2 and row["outside"]["ok"] == 78
    assert row["failures_until_seconds"] == 7.0
    assert out["outside"]["scheduled"] == 80
    assert 4.0 < row["outside"]["latency_ms"]["p50"] < 6.0
