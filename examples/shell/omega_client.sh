#!/usr/bin/env bash
# A shell client of `omega-brain serve --socket PATH`, through socat.
#
# Usage: omega_client.sh SOCKET_PATH [CATALOG_NPZ [CONTENT_ID]]
# Sends init (offline brain in RAM), observe, recommend, stats and shutdown, one request line
# at a time over one connection, and prints "<op>: <reply>". Exits 0 when every reply is ok,
# 2 at the first error reply (after closing the brain), 1 on usage or connection errors.
# Replies always start with their "ok" member, so a prefix test is enough without jq.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
    echo "usage: $0 SOCKET_PATH [CATALOG_NPZ [CONTENT_ID]]" >&2
    exit 1
fi
sock=$1
catalog=${2:-}
content_id=${3:-item-0}
command -v socat >/dev/null || { echo "omega_client.sh: socat not found" >&2; exit 1; }

json_string() {  # $1 as a JSON string literal (escapes \ and ")
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}

coproc BRAIN { exec socat -t 30 - "UNIX-CONNECT:$sock"; }

call() {  # call OP REQUEST_JSON: send one line, print the reply; fails on an error reply
    local reply
    printf '%s\n' "$2" >&"${BRAIN[1]}"
    if ! IFS= read -r -t 60 reply <&"${BRAIN[0]}"; then
        echo "omega_client.sh: no reply to $1 (is the server listening on $sock?)" >&2
        exit 1
    fi
    printf '%s: %s\n' "$1" "$reply"
    [[ $reply =~ ^\{\"ok\":\ *true ]]
}

init='{"op": "init", "device_id": "shell-client", "store_path": ":memory:"'
[[ -n $catalog ]] && init+=", \"catalog_file\": $(json_string "$catalog")"
init+='}'
now_ms=$(( $(date +%s) * 1000 ))

call init "$init" || { echo "omega_client.sh: init failed" >&2; exit 2; }
for step in \
    "observe|{\"op\": \"observe\", \"content_id\": $(json_string "$content_id"), \"started_at_ms\": $now_ms, \"completion\": 0.95}" \
    'recommend|{"op": "recommend", "k": 5}' \
    'stats|{"op": "stats"}'; do
    if ! call "${step%%|*}" "${step#*|}"; then
        echo "omega_client.sh: ${step%%|*} failed" >&2
        call shutdown '{"op": "shutdown"}' || true
        exit 2
    fi
done
call shutdown '{"op": "shutdown"}' || exit 2
