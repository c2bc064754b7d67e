#!/usr/bin/env bash
# Installs the Debian packages the demo and the tests need, if missing.
# Usage: scripts/deps.sh PACKAGE...
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: wireguard-tools would otherwise pull a kernel.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
