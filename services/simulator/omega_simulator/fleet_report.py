"""Fleet run reports: a folder with ``report.json``, ``report.md`` and PNG plots, and the
side-by-side comparison of two such folders (``omega-simulator compare A B``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt

from omega_simulator.fleet_measure import Recorder, latency_histogram, percentiles_ms
from omega_simulator.fleet_run import FleetRun
from omega_simulator.fleet_scenario import Fault, Scenario

__all__ = [
    "COMPARED_FIGURES",
    "DEVICE_FAULT_COUNTERS",
    "PLOTS",
    "build_report",
    "compare_reports",
    "fault_figures",
    "load_report",
    "render_markdown",
    "write_report",
]

REPORT_FORMAT = 1
PLOTS = ("latency.png", "throughput.png", "errors.png", "bytes.png")


def _last_active(run: FleetRun) -> int:
    rec = run.recorder
    active = [
        i
        for i in range(rec.windows)
        if rec.scheduled[i] or rec.completed[i] or rec.failed[i] or rec.ok[i] or rec.refused[i]
    ]
    return (max(active) + 1) if active else 1


def _slice(rec: Recorder, windows: list[int]) -> dict[str, Any]:
    hist = latency_histogram(2)
    errors: dict[str, int] = {}
    for i in windows:
        hist.add(rec.window_latency[i])
        for status, counts in rec.window_errors.items():
            if counts[i]:
                errors[status] = errors.get(status, 0) + counts[i]
    scheduled = sum(rec.scheduled[i] for i in windows)
    failed = sum(rec.failed[i] for i in windows)
    pct = percentiles_ms(hist)
    return {
        "scheduled": scheduled,
        "ok": sum(rec.ok[i] for i in windows),
        "failed": failed,
        "error_rate": failed / scheduled if scheduled else 0.0,
        "errors": dict(sorted(errors.items())),
        "latency_ms": {"p50": pct["p50"], "p99": pct["p99"], "max": pct["max"]},
    }


def fault_figures(rec: Recorder, faults: tuple[Fault, ...], n: int) -> dict[str, Any]:
    """What each fault window did, from the series (by scheduled time, at the series' window
    resolution): syncs scheduled inside the windows it overlaps, failed there and elsewhere,
    latency inside vs outside, and how long failures lasted (from the fault's start to the
    last failing window before the first clean one after its end).

    Args:
        rec: the run's merged measurements.
        faults: the scenario's faults.
        n: series windows with activity.

    Returns:
        ``{"faults": [...], "outside": figures of the windows no fault overlaps}``.
    """
    ws = rec.window_seconds
    covered: set[int] = set()
    rows = []
    for f in faults:
        inside = [i for i in range(n) if i * ws < f.end_seconds and (i + 1) * ws > f.start_seconds]
        covered.update(inside)
        outside = [i for i in range(n) if i not in inside]
        last_failing: int | None = None
        for j in range(inside[0] if inside else n, n):
            if (j * ws >= f.end_seconds) and rec.failed[j] == 0 and rec.ok[j] > 0:
                break
            if rec.failed[j]:
                last_failing = j
        rows.append(
            {
                "kind": f.kind,
                "label": f.label(),
                "fault": f.model_dump(mode="json", exclude_none=True),
                "window_seconds": [
                    (inside[0] * ws) if inside else f.start_seconds,
                    ((inside[-1] + 1) * ws) if inside else f.end_seconds,
                ],
                "inside": _slice(rec, inside),
                "outside": _slice(rec, outside),
                "failures_until_seconds": (
                    None if last_failing is None else (last_failing + 1) * ws
                ),
            }
        )
    return {"faults": rows, "outside": _slice(rec, [i for i in range(n) if i not in covered])}


DEVICE_FAULT_COUNTERS: list[tuple[str, str]] = [
    ("malformed_sent", "malformed sent"),
    ("malformed_refused", "malformed refused as expected (INVALID_ARGUMENT)"),
    ("malformed_accepted", "malformed unexpectedly accepted"),
    ("factory_resets", "factory resets"),
    ("resets_resumed", "resets resumed (new changes acknowledged)"),
    ("resets_wedged", "resets wedged (changes not acknowledged)"),
    ("resets_unresolved", "resets without an answered sync after them"),
    ("stale_rollbacks", "stores restored from an older backup (stale versions)"),
    ("stale_detected", "stale versions answered as duplicates naming the shard's later one"),
    ("stale_resumed", "stale stores resumed (renumbered changes applied)"),
    ("stale_passed", "stale stores already past the shard's version (applied at once)"),
    ("stale_applied", "stale versions applied again by the shard (a failure)"),
    ("stale_wedged", "stale stores wedged (shown behind twice)"),
    ("stale_unresolved", "stale stores without a settling answer before the end"),
    ("churn_appeared", "devices appeared mid-run"),
    ("churn_vanished", "devices vanished mid-run"),
]
"""The device-fault counters of a report (``device_faults`` keys) and their labels."""

_DEVICE_FAULT_SETTINGS = (
    "malformed_fraction",
    "factory_reset_fraction",
    "stale_fraction",
    "clock_skew_seconds",
    "churn_fraction",
)


def _device_faults(sc: Scenario, rec: Recorder) -> dict[str, Any]:
    """The device-behaviour faults' settings and what came of them."""
    c = rec.device_faults
    return {
        "settings": {name: getattr(sc, name) for name in _DEVICE_FAULT_SETTINGS},
        **{key: c[key] for key, _label in DEVICE_FAULT_COUNTERS},
    }


def build_report(run: FleetRun) -> dict[str, Any]:
    """The JSON report of a run: scenario, figures, errors, time series, histogram."""
    rec = run.recorder
    sc = run.scenario
    scheduled, ok, failed = rec.total_scheduled, rec.total_ok, rec.total_failed
    refused = rec.total_refused
    up, down = sum(rec.bytes_up), sum(rec.bytes_down)
    lag = percentiles_ms(rec.send_lag)
    n = _last_active(run)
    ws = rec.window_seconds

    def per_second(values: list[int]) -> list[float]:
        return [v / ws for v in values[:n]]

    window_pct = [percentiles_ms(h) for h in rec.window_latency[:n]]
    has_bytes = rec.request_bytes.get_total_count() > 0
    return {
        "format": REPORT_FORMAT,
        "scenario": sc.model_dump(mode="json"),
        "run": {
            "started_at": datetime.fromtimestamp(run.started_at, UTC).isoformat(),
            "wall_seconds": round(run.wall_seconds, 3),
            "shards": run.shards,
            "device_prefix": run.prefix,
            "workers": sc.workers,
            "worker_cpu_seconds": [round(c, 3) for c in run.worker_cpu_seconds],
            "lost_workers": run.lost_workers,
            "closed_loop": run.closed_loop,
            "window_seconds": ws,
        },
        "figures": {
            "devices": sc.devices,
            "scheduled": scheduled,
            "ok": ok,
            "failed": failed,
            "refused_as_expected": refused,
            "accounted": ok + failed + refused == scheduled,
            "error_rate": failed / scheduled if scheduled else 0.0,
            "scheduled_per_second": scheduled / sc.duration_seconds,
            "throughput_per_second": ok / sc.duration_seconds,
            "latency_ms": percentiles_ms(rec.latency),
            "bytes_up": up,
            "bytes_down": down,
            "bytes_up_per_sync": up / (ok + failed + refused) if ok + failed + refused else 0.0,
            "bytes_down_per_sync": down / ok if ok else 0.0,
            "request_bytes_p50": rec.request_bytes.get_value_at_percentile(50) if has_bytes else 0,
            "request_bytes_p99": rec.request_bytes.get_value_at_percentile(99) if has_bytes else 0,
            "redirects": rec.redirects,
            "duplicates": rec.duplicates,
            "send_lag_ms_p99": lag["p99"],
            "send_lag_ms_max": lag["max"],
        },
        "errors": dict(sorted(rec.errors.items())),
        "device_faults": _device_faults(sc, rec) if sc.device_faults else None,
        "series": {
            "t": [i * ws for i in range(n)],
            "scheduled_per_second": per_second(rec.scheduled),
            "completed_per_second": per_second(rec.completed),
            "failed_per_second": per_second(rec.failed),
            "errors_per_second": {s: per_second(v) for s, v in sorted(rec.window_errors.items())},
            "latency_ms": {  # None: no answered sync scheduled in that window
                p: [w[p] if rec.ok[i] else None for i, w in enumerate(window_pct)]
                for p in ("p50", "p90", "p99", "max")
            },
            "bytes_up_per_sync": [
                rec.bytes_up[i] / (rec.ok[i] + rec.failed[i]) if rec.ok[i] + rec.failed[i] else 0
                for i in range(n)
            ],
            "bytes_down_per_sync": [
                rec.bytes_down[i] / rec.ok[i] if rec.ok[i] else 0 for i in range(n)
            ],
        },
        "histograms": {"latency_us": bytes(rec.latency.encode()).decode("ascii")},
        "faults": (
            {**fault_figures(rec, sc.faults, n), "proxy": run.proxy, "kills": run.kills}
            if sc.faults
            else None
        ),
    }


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the run's figures as Markdown, with the plots."""
    sc, f, run = report["scenario"], report["figures"], report["run"]
    lat = f["latency_ms"]
    lines = [
        f"# Fleet run: {sc['name']}",
        "",
        f"{sc['description'] or sc['name']}. Started {run['started_at']}, "
        f"{run['wall_seconds']:.1f} s wall, {run['workers']} "
        f"{'thread(s)' if run.get('closed_loop') else 'worker process(es)'}, "
        f"target {', '.join(f'{k}={v}' for k, v in run['shards'].items())}.",
        "",
        f"{sc['devices']:,} devices, one sync per {sc['sync_interval_seconds']:g} s simulated, "
        f"time compression {sc['time_compression']:g} (one sync per "
        f"{sc['sync_interval_seconds'] / sc['time_compression']:g} s wall), "
        f"duration {sc['duration_seconds']:g} s, seed {sc['seed']}"
        + (
            "; phases: "
            + ", ".join(
                f"x{p['rate_multiplier']:g} from {p['start_seconds']:g} s for "
                f"{p['duration_seconds']:g} s"
                for p in sc["phases"]
            )
            if sc["phases"]
            else ""
        )
        + ".",
        "",
        (
            "Closed loop: no schedule; each sync counts as scheduled when its device started "
            "it, latency from then to its answer."
            if run.get("closed_loop")
            else "Open loop: every sync scheduled in advance; latency from its scheduled time."
        ),
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| syncs scheduled | {f['scheduled']:,} |",
        f"| ok | {f['ok']:,} |",
        f"| failed | {f['failed']:,} ({100 * f['error_rate']:.2f}%) |",
        f"| malformed on purpose, refused as expected | {f.get('refused_as_expected', 0):,} |",
        "| every sync accounted for (ok + failed + refused as expected = scheduled) | "
        f"{f['accounted']} |",
        f"| scheduled rate | {f['scheduled_per_second']:,.1f} /s |",
        f"| throughput (ok) | {f['throughput_per_second']:,.1f} /s |",
        f"| latency p50 / p90 / p99 | {lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} ms |",
        f"| latency p99.9 / max | {lat['p99_9']:.2f} / {lat['max']:.2f} ms |",
        f"| bytes up per sync (mean, p50, p99) | {f['bytes_up_per_sync']:,.0f}, "
        f"{f['request_bytes_p50']:,}, {f['request_bytes_p99']:,} |",
        f"| bytes down per sync (mean) | {f['bytes_down_per_sync']:,.0f} |",
        f"| bytes up / down (total) | {f['bytes_up']:,} / {f['bytes_down']:,} |",
        f"| redirects | {f['redirects']:,} |",
        f"| duplicates (already applied) | {f['duplicates']:,} |",
        f"| simulator send lag p99 / max | {f['send_lag_ms_p99']:.2f} / "
        f"{f['send_lag_ms_max']:.2f} ms |",
        f"| simulator CPU (s, per worker) | "
        f"{', '.join(f'{c:.1f}' for c in run['worker_cpu_seconds']) or '-'} |",
        "",
    ]
    if report["errors"]:
        lines += ["| error | count |", "| --- | ---: |"]
        lines += [f"| {k} | {v:,} |" for k, v in report["errors"].items()]
        lines.append("")
    if report.get("device_faults"):
        lines += _device_faults_markdown(report["device_faults"])
    if report.get("faults"):
        lines += _faults_markdown(report["faults"])
    if run["lost_workers"]:
        lines += ["Lost workers: " + "; ".join(run["lost_workers"]), ""]
    lines += [
        "A send lag near the latency means the simulator, not the server, was the bottleneck.",
        "",
    ]
    lines += [f"![{p[:-4]}]({p})" for p in PLOTS]
    return "\n".join(lines) + "\n"


def _device_faults_markdown(d: dict[str, Any]) -> list[str]:
    st = d["settings"]
    return [
        "## Device faults",
        "",
        f"Malformed share {st['malformed_fraction']:g}, factory-reset share "
        f"{st['factory_reset_fraction']:g}, stale-store share {st.get('stale_fraction', 0):g}, "
        f"clock skew up to {st['clock_skew_seconds']:g} s, churn share "
        f"{st['churn_fraction']:g}.",
        "",
        "| device fault | count |",
        "| --- | ---: |",
        *(f"| {label} | {d.get(key, 0):,} |" for key, label in DEVICE_FAULT_COUNTERS),
        "",
    ]


def _faults_markdown(faults: dict[str, Any]) -> list[str]:
    def lat(x: dict[str, Any]) -> str:
        if not x["ok"]:
            return "-"
        return f"{x['latency_ms']['p50']:.1f} / {x['latency_ms']['p99']:.1f}"

    def errs(x: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in x["errors"].items()) or "-"

    proxy = faults.get("proxy") or {}
    stats = proxy.get("stats", {})
    kills: list[dict[str, Any]] = faults.get("kills") or []
    where = (
        "A loopback TCP proxy sat between the devices and "
        + (", ".join(f"{k}={v}" for k, v in proxy.get("shards", {}).items()) or "the shards")
        + ". "
        if proxy
        else ""
    )
    lines = [
        "## Faults",
        "",
        where + "Syncs are placed by their scheduled time, in series windows; a fault's figures "
        "cover the windows it overlaps, *outside* every other window of the run.",
        "",
        "| fault | windows (s) | scheduled inside | failed inside | errors inside "
        "| failed outside | p50 / p99 ms inside | p50 / p99 ms outside | failures until |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in faults["faults"]:
        i, o = row["inside"], row["outside"]
        until = row["failures_until_seconds"]
        lines.append(
            f"| {row['label']} | {row['window_seconds'][0]:g}-{row['window_seconds'][1]:g} "
            f"| {i['scheduled']:,} | {i['failed']:,} ({100 * i['error_rate']:.1f}%) "
            f"| {errs(i)} | {o['failed']:,} ({100 * o['error_rate']:.1f}%) | {lat(i)} "
            f"| {lat(o)} | {'no failures' if until is None else f'{until:g} s'} |"
        )
    rest = faults["outside"]
    lines += [
        "",
        f"Outside every fault window: {rest['scheduled']:,} syncs scheduled, "
        f"{rest['ok']:,} answered, {rest['failed']:,} failed "
        f"({100 * rest['error_rate']:.2f}%; {errs(rest)}), p50 / p99 {lat(rest)} ms.",
        "",
    ]
    for shard_id, st in stats.items():
        per = "; ".join(
            f"{label}: {v['connections_reset']} reset, {v['connections_held']} held"
            for label, v in st["faults"].items()
        )
        lines.append(f"Proxy of {shard_id}: {st['connections']} connections accepted; {per}.")
    if stats:
        lines.append("")
    for k in kills:
        if k["error"] or k["serving_at_seconds"] is None:
            why = k["error"] or "not played to its end (the run ended first)"
            lines.append(f"Replica {k['replica']} of {k['shard']} ({k['label']}): {why}.")
            continue
        serving = k["serving_at_seconds"]
        lines.append(
            f"Replica {k['replica']} of {k['shard']} ({k['label']}): SIGKILL (pid "
            f"{k['killed_pid']}) at {k['killed_at_seconds']:g} s, restarted at "
            f"{k['restarted_at_seconds']:g} s, SERVING again at {serving:g} s "
            f"(down {serving - k['killed_at_seconds']:.1f} s)."
        )
    if kills:
        lines.append("")
    return lines


_FAULT_COLOURS = {
    "cut": "tab:red",
    "reset": "tab:orange",
    "latency": "tab:purple",
    "kill": "tab:brown",
}


def _mark_faults(ax: Any, report: dict[str, Any]) -> None:
    seen: set[str] = set()
    for f in report["scenario"].get("faults") or ():
        kind = f["kind"]
        ax.axvspan(
            f["start_seconds"],
            f["start_seconds"] + f["duration_seconds"],
            color=_FAULT_COLOURS.get(kind, "tab:gray"),
            alpha=0.15,
            label=None if kind in seen else f"fault: {kind}",
        )
        seen.add(kind)


def _plot(path: Path, title: str, ylabel: str, draw: Callable[[Any], None]) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    try:
        draw(ax)
        ax.set_title(title)
        ax.set_xlabel("run time (s, by scheduled time)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def write_plots(report: dict[str, Any], folder: Path) -> list[Path]:
    """The four PNGs of `PLOTS` in ``folder``."""
    s = report["series"]
    t = s["t"]

    def latency(ax: Any) -> None:
        for p in ("p50", "p90", "p99", "max"):
            values = [math.nan if v is None else v for v in s["latency_ms"][p]]
            ax.plot(t, values, label=p, marker=".")
        ax.set_yscale("log")
        _mark_faults(ax, report)

    def throughput(ax: Any) -> None:
        _mark_faults(ax, report)
        ax.plot(t, s["scheduled_per_second"], label="scheduled", linestyle="--")
        ax.plot(t, s["completed_per_second"], label="answered (by completion time)")
        ax.plot(t, s["failed_per_second"], label="failed")

    def errors(ax: Any) -> None:
        _mark_faults(ax, report)
        if not s["errors_per_second"]:
            ax.plot(t, [0.0] * len(t), label="no errors")
        for status, values in s["errors_per_second"].items():
            ax.plot(t, values, label=status, marker=".")

    def size(ax: Any) -> None:
        ax.plot(t, s["bytes_up_per_sync"], label="up (request)")
        ax.plot(t, s["bytes_down_per_sync"], label="down (answer)")

    paths = [folder / p for p in PLOTS]
    _plot(paths[0], "Sync latency percentiles", "ms (log)", latency)
    _plot(paths[1], "Throughput vs scheduled rate", "syncs / s", throughput)
    _plot(paths[2], "Errors by gRPC status", "syncs / s", errors)
    _plot(paths[3], "Bytes per sync", "bytes", size)
    return paths


def write_report(run: FleetRun, folder: Path) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plots into ``folder``; returns the report."""
    folder.mkdir(parents=True, exist_ok=True)
    report = build_report(run)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(render_markdown(report))
    write_plots(report, folder)
    return report


def load_report(path: Path) -> dict[str, Any]:
    """A run's ``report.json`` (``path``: the file or its folder).

    Raises:
        OSError: unreadable; ValueError: not a fleet report.
    """
    file = path / "report.json" if path.is_dir() else path
    data: dict[str, Any] = json.loads(file.read_text())
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT or "figures" not in data:
        raise ValueError(f"{file} is not an omega-simulator fleet report")
    return data


COMPARED_FIGURES: list[tuple[str, tuple[str, ...], str]] = [
    ("devices", ("figures", "devices"), "{:,.0f}"),
    ("syncs scheduled", ("figures", "scheduled"), "{:,.0f}"),
    ("ok", ("figures", "ok"), "{:,.0f}"),
    ("failed", ("figures", "failed"), "{:,.0f}"),
    ("error rate", ("figures", "error_rate"), "{:.4f}"),
    ("scheduled rate /s", ("figures", "scheduled_per_second"), "{:,.1f}"),
    ("throughput /s", ("figures", "throughput_per_second"), "{:,.1f}"),
    ("latency p50 ms", ("figures", "latency_ms", "p50"), "{:.2f}"),
    ("latency p90 ms", ("figures", "latency_ms", "p90"), "{:.2f}"),
    ("latency p99 ms", ("figures", "latency_ms", "p99"), "{:.2f}"),
    ("latency p99.9 ms", ("figures", "latency_ms", "p99_9"), "{:.2f}"),
    ("latency max ms", ("figures", "latency_ms", "max"), "{:.2f}"),
    ("bytes up per sync", ("figures", "bytes_up_per_sync"), "{:,.0f}"),
    ("bytes down per sync", ("figures", "bytes_down_per_sync"), "{:,.0f}"),
    ("redirects", ("figures", "redirects"), "{:,.0f}"),
    ("duplicates", ("figures", "duplicates"), "{:,.0f}"),
    ("send lag p99 ms", ("figures", "send_lag_ms_p99"), "{:.2f}"),
]


def _get(report: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = report
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def _change(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "n/a"
    if a == b:
        return "="
    if a == 0:
        return "new" if b else "="
    return f"{100.0 * (b - a) / abs(a):+.1f}%"


def compare_reports(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows ``(figure, A, B, change of B against A)`` for every figure of `COMPARED_FIGURES`,
    every error status of either run and every device-fault counter either run used."""
    rows: list[tuple[str, str, str, str]] = []

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else spec.format(value)

    for label, path, spec in COMPARED_FIGURES:
        va, vb = _get(a, path), _get(b, path)
        rows.append((label, fmt(va, spec), fmt(vb, spec), _change(va, vb)))
    for status in sorted(set(a.get("errors", {})) | set(b.get("errors", {}))):
        ea = float(a.get("errors", {}).get(status, 0))
        eb = float(b.get("errors", {}).get(status, 0))
        rows.append((f"errors {status}", f"{ea:,.0f}", f"{eb:,.0f}", _change(ea, eb)))
    fa, fb = a.get("device_faults") or {}, b.get("device_faults") or {}
    for key, label in DEVICE_FAULT_COUNTERS:
        if fa.get(key) or fb.get(key):  # a counter neither run used stays out of the table
            va, vb = float(fa.get(key, 0)), float(fb.get(key, 0))
            rows.append((f"device fault: {label}", f"{va:,.0f}", f"{vb:,.0f}", _change(va, vb)))
    return rows


def compare_markdown(a_name: str, b_name: str, a: dict[str, Any], b: dict[str, Any]) -> str:
    """``compare.md``: the two runs side by side."""
    lines = [
        f"# Fleet runs compared: A = {a_name}, B = {b_name}",
        "",
        f"A: scenario {a['scenario']['name']}, started {a['run']['started_at']}; "
        f"B: scenario {b['scenario']['name']}, started {b['run']['started_at']}.",
        "",
        "| figure | A | B | change (B vs A) |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in compare_reports(a, b)]
    return "\n".join(lines) + "\n"
