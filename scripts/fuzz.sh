#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for SECONDS each (default
# 60), starting from its committed corpus (fuzz/corpus/<target>/). New
# inputs the fuzzer finds go to a scratch directory, not into git; a crash
# stops the run with the input under fuzz/artifacts/<target>/, which then
# belongs in the corpus as a regression seed once fixed.
# Installs cargo-fuzz when missing; uses the stable toolchain with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags for the sanitizer).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
if ! command -v cargo-fuzz >/dev/null; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo fuzz list); do
    mkdir -p "$scratch/$target"
    echo "fuzzing $target for ${seconds}s" >&2
    cargo fuzz run "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 2>&1 \
        | grep -E "^(stat::number_of_executed_units|stat::new_units_added|==|SUMMARY|thread|panicked)" || true
    if compgen -G "fuzz/artifacts/$target/*" >/dev/null; then
        echo "fuzz target $target failed: see fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
echo "fuzz: all targets ran ${seconds}s each without a failure"
