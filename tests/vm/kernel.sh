#!/usr/bin/env bash
# Fetches Debian's current amd64 kernel package (no install: unpacked into a
# directory) for the cgroup v2 VM test in agent/tests/runtime.rs, and prints
# that directory. Needs apt sources for Debian; run as root.
#
#   export BATON_VM_KERNEL_DIR=$(tests/vm/kernel.sh)
#   cargo test -p baton-agent --test runtime in_a_cgroup_v2_vm
#
# Usage: tests/vm/kernel.sh [DIR]    (default: target/vm-kernel)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-$ROOT/target/vm-kernel}
if ! compgen -G "$DIR/boot/vmlinuz-*" >/dev/null; then
  # linux-image-amd64 is a metapackage: the kernel is the package it depends on.
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "kernel.sh: no linux-image package found (apt-get update?)" >&2; exit 1; }
  dl=$(mktemp -d)
  (cd "$dl" && apt-get download -q "$pkg" >/dev/null 2>&1)
  rm -rf "$DIR" && mkdir -p "$DIR"
  dpkg-deb -x "$dl"/"$pkg"_*.deb "$DIR"
  rm -rf "$dl"
  # Keep the kernel and the modules the VM loads (virtio, 9p, overlayfs,
  # dummy; the list is in the test): 350 MB less.
  mods=$(echo "$DIR"/lib/modules/*)
  keep=$(mktemp -d)
  for m in drivers/virtio net/9p fs/9p fs/netfs fs/fscache fs/overlayfs drivers/net/dummy.ko; do
    # (a kernel that builds one of them in has no file for it)
    [ -e "$mods/kernel/$m" ] || continue
    mkdir -p "$keep/$(dirname "$m")" && cp -r "$mods/kernel/$m" "$keep/$m"
  done
  rm -rf "$DIR/lib" "$DIR/usr" "$DIR/etc" "$DIR/boot"/{System.map,config}-*
  mkdir -p "$mods" && mv "$keep" "$mods/kernel"
fi
echo "$DIR"
