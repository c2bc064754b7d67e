#!/bin/sh
# Assembles the sidecar image's root file system: meshd, meshctl and nft
# (TAP mode's bridge filter runs `nft -f -`), each with the shared libraries
# `ldd` names, plus the directories the agent uses. The Containerfile's
# builder stage runs it on binaries it compiled; the tests run it on
# binaries compiled on the host (see the Containerfile's ROOTFS argument).
#
# Usage: deploy/rootfs.sh OUT_DIR MESHD MESHCTL
# NFT=/path/to/nft overrides where nft is taken from. Binaries are copied
# without debug info when `strip` is available (a debug build is ~170 MB).
set -eu
if [ $# -ne 3 ]; then
    echo "usage: $0 OUT_DIR MESHD MESHCTL" >&2
    exit 2
fi
out=$1 meshd=$2 meshctl=$3
nft=${NFT:-$(command -v nft || echo /usr/sbin/nft)}
for bin in "$meshd" "$meshctl" "$nft"; do
    [ -x "$bin" ] || { echo "$0: $bin is not an executable file" >&2; exit 1; }
done

mkdir -p "$out/usr/local/bin" "$out/usr/sbin" "$out/etc/meshnet" \
    "$out/var/lib/meshnet" "$out/run/meshnet" "$out/run/netns" "$out/etc/netns" "$out/tmp"
chmod 1777 "$out/tmp"

install_bin() {
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug -o "$2" "$1"
    else
        cp "$1" "$2"
    fi
    chmod 0755 "$2"
}
install_bin "$meshd" "$out/usr/local/bin/meshd"
install_bin "$meshctl" "$out/usr/local/bin/meshctl"
install_bin "$nft" "$out/usr/sbin/nft"

# Libraries at the paths the binaries look them up by (ldd's resolved path,
# and the dynamic loader by its absolute name), symlinks resolved.
ldd "$meshd" "$meshctl" "$nft" \
    | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $2 ~ /^\(/ { print $1 }' \
    | sort -u \
    | while read -r lib; do
        mkdir -p "$out$(dirname "$lib")"
        cp -L "$lib" "$out$lib"
    done
