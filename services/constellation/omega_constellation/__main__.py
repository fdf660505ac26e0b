"""``omega-constellation``: run a replica, issue credentials, write a development PKI, probe health.

Commands (settings come from ``OMEGA_CONSTELLATION_*`` environment variables, settings.py):

* ``serve`` (default): run one constellation replica until SIGTERM.
* ``issue-token --device-id ID`` or ``issue-token --service NAME``: print a credential signed
  with the fleet keys (``OMEGA_CONSTELLATION_FLEET_KEYS`` or ``_FLEET_KEYS_FILE``).
* ``dev-pki FOLDER``: write a development CA, server and worker client certificates.
* ``health``: exit 0 when the replica's gRPC health check answers SERVING, 1 otherwise
  (container HEALTHCHECK, probes).
* ``relinquish-moved [--dry-run]``: after the shard ids changed, delete the rows of the
  devices this shard no longer owns (`omega_constellation.relinquish`); prints a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from omega_common.grpc_auth import SERVICE_PREFIX
from omega_common.tls import dev_pki
from omega_constellation.settings import ConstellationSettings


def _issue_token(args: argparse.Namespace) -> int:
    settings = ConstellationSettings()
    keys = settings.keys()
    if args.service:
        subject = SERVICE_PREFIX + args.service
    else:
        subject = args.device_id
        if subject.startswith(SERVICE_PREFIX):
            print(f"a device id may not start with {SERVICE_PREFIX!r}", file=sys.stderr)
            return 2
    print(keys.issue(subject, key_id=args.key_id))
    return 0


def _health() -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from omega_common.tls import channel_credentials

    settings = ConstellationSettings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    target = f"{host}:{settings.port}"
    if settings.plaintext:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, channel_credentials(settings.tls_ca_file))
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=3.0
        )
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(status)
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


def _relinquish(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    import asyncpg

    from omega_constellation.relinquish import relinquish_moved_devices

    settings = ConstellationSettings()

    async def run() -> dict[str, object]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            report = await relinquish_moved_devices(
                conn,
                settings.shard_id,
                settings.shard_ids,
                batch_size=args.batch_size,
                dry_run=args.dry_run,
            )
        finally:
            await conn.close()
        return asdict(report)

    try:
        summary = asyncio.run(run())
    except ValueError as exc:
        print(f"relinquish-moved: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"shard_id": settings.shard_id, **summary}))
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``omega-constellation``."""
    parser = argparse.ArgumentParser(
        prog="omega-constellation",
        description="Constellation sync server: one shard replica. Settings come from "
        "OMEGA_CONSTELLATION_* environment variables (see settings.py).",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="run one replica (the default)")
    issue = commands.add_parser("issue-token", help="print a device or service credential")
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--device-id", help="the device the token is bound to")
    who.add_argument("--service", help="a service name, e.g. federation-worker")
    issue.add_argument("--key-id", help="fleet key id (default: the current one)")
    pki = commands.add_parser("dev-pki", help="write a development CA and certificates")
    pki.add_argument("folder", type=Path)
    pki.add_argument("--host", action="append", help="server name or IP (repeatable)")
    commands.add_parser("health", help="exit 0 when the replica is SERVING, else 1")
    relinquish = commands.add_parser(
        "relinquish-moved",
        help="delete the rows of devices that now belong to another shard (after resharding)",
    )
    relinquish.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    relinquish.add_argument("--batch-size", type=int, default=1000, help="devices per step")
    args = parser.parse_args(argv)
    if args.command == "issue-token":
        raise SystemExit(_issue_token(args))
    if args.command == "dev-pki":
        files = dev_pki(args.folder, hosts=args.host or ("127.0.0.1", "localhost"))
        print(f"CA {files.ca_cert}; server {files.server_cert}; clients {files.client_certs}")
        return
    if args.command == "health":
        raise SystemExit(_health())
    if args.command == "relinquish-moved":
        raise SystemExit(_relinquish(args))
    from omega_constellation.server import main_async

    asyncio.run(main_async(ConstellationSettings()))


if __name__ == "__main__":
    main()
