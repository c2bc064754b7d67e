#!/usr/bin/env bash
# The whole test suite: unit, property, CLI and network-namespace tests,
# the fuzz corpora replayed (in cargo test), then every fuzz target run
# briefly. Run as root on Debian; installs the tools the tests use when
# missing (and cargo-fuzz, gotatun and boringtun-cli).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: the namespace tests need root; run it as root" >&2
    exit 1
fi
scripts/deps.sh iproute2 iputils-ping tcpdump iperf3 dnsutils dnsmasq wireguard-tools wireguard-go socat python3 nftables faketime \
    prometheus groff-base systemd podman containernetworking-plugins runc catatonit busybox-static \
    etcd-server etcd-client protobuf-compiler libprotobuf-dev
scripts/peers.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --all-targets
scripts/fuzz.sh "${FUZZ_SECONDS:-5}"
