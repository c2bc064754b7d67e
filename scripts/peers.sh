#!/usr/bin/env bash
# The Rust user-space WireGuard peers meshd is tested and measured against,
# installed with cargo when missing: Mullvad's GotaTun (recvmmsg + UDP GRO)
# and boringtun's own CLI. Pinned so runs stay comparable. About three
# minutes of building on two cores the first time.
set -euo pipefail
bin="${CARGO_HOME:-$HOME/.cargo}/bin"
command -v gotatun >/dev/null || [ -x "$bin/gotatun" ] ||
    cargo install --locked gotatun-cli --version 0.10.2
command -v boringtun-cli >/dev/null || [ -x "$bin/boringtun-cli" ] ||
    cargo install --locked boringtun-cli --version 0.7.1
