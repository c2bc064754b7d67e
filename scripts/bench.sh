#!/usr/bin/env bash
# The benchmarks: per-packet cost of the core beside raw ChaCha20-Poly1305
# and of splitting and coalescing device IO (criterion), then meshd end to
# end (TUN with and without offloads, TAP) beside veth, wireguard-go,
# gotatun and boringtun-cli (the last two are installed here with cargo
# when missing). Run as root on Debian; a few minutes. Results:
# target/criterion/, target/netns-bench.json and target/netns-bench.svg;
# then what a handshake flood costs the agent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/bench.sh: the end-to-end benchmark creates network namespaces; run it as root" >&2
    exit 1
fi
scripts/deps.sh iproute2 iputils-ping iperf3 wireguard-tools wireguard-go
scripts/peers.sh
scripts/deps.sh iproute2 iputils-ping iperf3 wireguard-tools wireguard-go protobuf-compiler libprotobuf-dev
cargo bench --bench encap
cargo bench --bench offload
cargo bench --bench netns
cargo bench --bench flood
