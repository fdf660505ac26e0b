"""``python -m tools.fuzz``: fuzz a constellation shard (started here, or one running locally).

Without ``--target`` a shard is started as a child process (``python -m omega_constellation``)
on 127.0.0.1 with a database of its own on the Postgres at ``--postgres-url`` (default
``$OMEGA_TEST_POSTGRES_URL`` or ``postgresql://postgres@127.0.0.1:5432/postgres``; the embedded
Postgres when that does not answer); it is stopped and its database dropped at the end.
It checks credentials (fleet keys made for the run) and the cases carry a seeded mix of
credentials (`tools.fuzz.credentials`); ``--no-auth`` fuzzes a shard with credentials off.
Against a running server (``--target``), give its fleet keys with ``--fleet-keys-file`` (or
``OMEGA_CONSTELLATION_FLEET_KEYS``) to send the mix; without keys the cases carry none.

Exit status: 0 when every check passed, 1 when one failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from omega_common.auth import FleetKeys
from tools.fuzz.credentials import CredentialMix
from tools.fuzz.runner import FuzzConfig, FuzzReport, run_fuzz
from tools.fuzz.shard import ShardProcess, admin_dsn


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.fuzz", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--cases", type=int, default=10_000, help="cases to send (10000)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (0)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    parser.add_argument(
        "--time-limit", type=float, default=900.0, help="stop sending after this many s (900)"
    )
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        help="host:port of a running server's listener on 127.0.0.1 (repeat for each); "
        "default: start a shard",
    )
    parser.add_argument("--pid", type=int, help="with --target: the server's pid (memory check)")
    parser.add_argument(
        "--database-url", help="with --target: the server's database (nothing-written check)"
    )
    parser.add_argument("--log", type=Path, help="with --target: the server's log file")
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=1 << 20,
        help="with --target: the device listener's receive limit (1 MiB)",
    )
    parser.add_argument(
        "--internal-max-request-bytes",
        type=int,
        default=64 << 20,
        help="with --target: the receive limit of the other targets (64 MiB)",
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="start the shard with credentials off (OMEGA_CONSTELLATION_AUTH=false) and send "
        "none; with --target: send none",
    )
    parser.add_argument(
        "--fleet-keys-file",
        type=Path,
        help="with --target: the server's fleet keys JSON (default: "
        "$OMEGA_CONSTELLATION_FLEET_KEYS if set), to send the credential mix",
    )
    parser.add_argument(
        "--service-name",
        default="federation-worker",
        help="the service the internal listener accepts (federation-worker)",
    )
    parser.add_argument("--postgres-url", help="maintenance DSN for the started shard's database")
    parser.add_argument(
        "--services", help="comma-separated full service names to fuzz (default: all listed)"
    )
    parser.add_argument(
        "--case", type=int, action="append", help="only this case index (repeat); prints each"
    )
    parser.add_argument(
        "--max-replayed",
        type=int,
        default=10_000,
        help="refused cases sent again to check that they write nothing (10000)",
    )
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    return parser


def _target_keys(args: argparse.Namespace) -> FleetKeys | None:
    """The running server's fleet keys (``--fleet-keys-file`` or the environment), if given."""
    if args.no_auth:
        return None
    if args.fleet_keys_file is not None:
        return FleetKeys.from_file(args.fleet_keys_file)
    text = os.environ.get("OMEGA_CONSTELLATION_FLEET_KEYS")
    return FleetKeys.from_json(text) if text else None


def _config(args: argparse.Namespace, keys: FleetKeys | None, targets: list[str]) -> FuzzConfig:
    mix = (
        CredentialMix(keys, args.seed, internal_targets=targets[1:], service=args.service_name)
        if keys is not None
        else None
    )
    return FuzzConfig(
        cases=args.cases,
        seed=args.seed,
        concurrency=args.concurrency,
        time_limit_seconds=args.time_limit,
        services=frozenset(args.services.split(",")) if args.services else None,
        metadata=mix,
        record=bool(args.case),
        max_replayed=args.max_replayed,
    )


async def _main(args: argparse.Namespace) -> FuzzReport:
    if args.target:
        config = _config(args, _target_keys(args), args.target)
        return await run_fuzz(
            args.target,
            config,
            pid=args.pid,
            database_url=args.database_url,
            log_path=args.log,
            max_request_bytes=args.max_request_bytes,
            internal_max_request_bytes=args.internal_max_request_bytes,
            indices=args.case,
        )
    with tempfile.TemporaryDirectory(prefix="omega-fuzz-") as workdir:
        shard = await ShardProcess.start(
            await admin_dsn(args.postgres_url), Path(workdir), auth=not args.no_auth
        )
        try:
            print(
                f"shard pid {shard.pid} on {', '.join(shard.targets)}, credentials"
                f" {'on' if shard.keys is not None else 'off'}",
                flush=True,
            )
            return await run_fuzz(
                shard.targets,
                _config(args, shard.keys, shard.targets),
                pid=shard.pid,
                database_url=shard.database_url,
                log_path=shard.log_path,
                max_request_bytes=shard.max_request_bytes,
                internal_max_request_bytes=shard.internal_max_request_bytes,
                indices=args.case,
            )
        finally:
            await shard.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzer; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.cases < 0 or args.concurrency < 1:
        print("--cases must be >= 0 and --concurrency >= 1", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_main(args))
    except ValueError as exc:  # a target that is not local
        print(exc, file=sys.stderr)
        return 2
    for record in report.records:
        print(json.dumps(record))
    print(report.summary())
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "ok": report.ok,
                    "cases": report.cases_run,
                    "seconds": report.seconds,
                    "statuses": [
                        {"method": m, "code": c, "count": n}
                        for (m, c), n in sorted(report.statuses.items())
                    ],
                    "credentials": [
                        {"credential": k, "code": c, "count": n}
                        for (k, c), n in sorted(report.credentials.items())
                    ],
                    "rss_start_bytes": report.rss_start_bytes,
                    "rss_warmup_cases": report.rss_warmup_cases,
                    "rss_baseline_bytes": report.rss_baseline_bytes,
                    "rss_growth_bytes": report.rss_growth_bytes,
                    "rss_end_bytes": report.rss_end_bytes,
                    "rss_peak_bytes": report.rss_peak_bytes,
                    "rss_samples": report.rss_samples,
                    "failures": report.failures,
                    "examples": report.examples,
                },
                indent=2,
            )
        )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
