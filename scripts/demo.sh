#!/usr/bin/env bash
# The demo: a three-host mesh in network namespaces, pings across the
# overlay, `meshctl peers`. Run as root on Debian; cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/demo.sh: creating network namespaces needs root; run it as root" >&2
    exit 1
fi
# protobuf-compiler, libprotobuf-dev: the default `etcd` feature runs protoc.
scripts/deps.sh iproute2 iputils-ping dnsutils nftables protobuf-compiler libprotobuf-dev
cargo build --release --quiet --bins --example demo
exec target/release/examples/demo
