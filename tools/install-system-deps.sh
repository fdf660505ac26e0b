#!/usr/bin/env bash
# System packages the tests use besides the Python ones of pyproject (which `make setup`
# installs): Debian's `prometheus` package, for `promtool check rules` / `promtool test rules`
# (tests/deploy/test_prometheus_rules.py) and the real Prometheus server of
# tests/integration/test_prometheus_live.py.
#
# Idempotent: does nothing when `promtool` and `prometheus` are already on PATH. Installs with
# apt-get only when it can (root, or passwordless sudo, on a Debian/Ubuntu machine); otherwise
# it says why and exits 0, and the tests that need the tools skip with that reason.
# The package's service is not started by this script (in containers, policy-rc.d usually
# forbids it anyway); the tests start their own Prometheus with a temporary configuration.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  echo "install-system-deps: promtool and prometheus present ($(command -v promtool)); nothing to do"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: no apt-get here; install Prometheus (promtool) by hand, the" \
    "Prometheus tests will skip meanwhile" >&2
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "install-system-deps: not root and no passwordless sudo; run" \
    "'apt-get install -y --no-install-recommends prometheus' as root, the Prometheus" \
    "tests will skip meanwhile" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Update the package lists only when the package is unknown to apt (a fresh image).
if ! apt-cache show prometheus >/dev/null 2>&1; then
  "${SUDO[@]}" apt-get update -q
fi
"${SUDO[@]}" apt-get install -y -q --no-install-recommends prometheus
promtool --version
