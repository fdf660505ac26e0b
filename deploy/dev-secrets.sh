#!/usr/bin/env bash
# Write the development secrets of deploy/compose.yaml into deploy/dev-secrets/ (git-ignored)
# or the folder given as $1. For a local stack only: production mounts its own.
#
#   make deploy-secrets                  # or: PYTHON=.venv/bin/python bash deploy/dev-secrets.sh
#
# It writes:
#   ca.crt ca.key server.crt server.key  development PKI (`omega-constellation dev-pki`): the
#                                        server certificate names every replica, the shard's
#                                        network alias and the loopback (health checks)
#   client-federation-worker.crt/.key    the worker's client certificate (mutual TLS)
#   fleet-keys.json                      one fresh 32-byte fleet secret {"dev-1": "<base64>"}
#   federation-service-token             `omega-constellation issue-token --service federation-worker`
#   postgres-password grafana-admin-password
#   constellation.env federation.env     the services' database DSNs (they carry the password)
#
# The folder is mode 0700 (only you can reach the files on the host); the files inside are
# made readable (0644) so that the containers' unprivileged users can read their bind mounts.
# It refuses to overwrite an existing folder: Postgres keeps the password it was initialised
# with in its volume, so regenerate with `docker compose -f deploy/compose.yaml down -v` first
# and pass --force.
set -euo pipefail

force=false
if [[ "${1:-}" == "--force" ]]; then
    force=true
    shift
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/dev-secrets}"
py="${PYTHON:-python3}"

if [[ -e "$out/fleet-keys.json" && "$force" != true ]]; then
    echo "$out already holds secrets; remove the stack's volumes and pass --force to replace them" >&2
    exit 1
fi

umask 077
mkdir -p "$out"
chmod 700 "$out"

"$py" -m omega_constellation dev-pki "$out" \
    --host shard-0 --host constellation-0 --host constellation-1 --host constellation-2 \
    --host localhost --host 127.0.0.1 >/dev/null

"$py" - "$out" <<'PY'
import base64
import json
import secrets
import sys
from pathlib import Path

out = Path(sys.argv[1])
key = base64.b64encode(secrets.token_bytes(32)).decode("ascii")
(out / "fleet-keys.json").write_text(json.dumps({"dev-1": key}) + "\n")
password = secrets.token_urlsafe(24)
(out / "postgres-password").write_text(password + "\n")
(out / "grafana-admin-password").write_text(secrets.token_urlsafe(18) + "\n")
dsn = f"postgresql://omega:{password}@postgres:5432"
(out / "constellation.env").write_text(f"OMEGA_CONSTELLATION_DATABASE_URL={dsn}/omega\n")
(out / "federation.env").write_text(f"OMEGA_FEDERATION_DATABASE_URL={dsn}/omega_federation\n")
PY

OMEGA_CONSTELLATION_FLEET_KEYS_FILE="$out/fleet-keys.json" \
    "$py" -m omega_constellation issue-token --service federation-worker \
    >"$out/federation-service-token"

chmod 644 "$out"/*
chmod 600 "$out/ca.key"  # never mounted: stays private to you
echo "development secrets written to $out"
