#!/usr/bin/env bash
# Builds the full baton-agent as static binaries for Raspberry Pis:
#
#   aarch64-unknown-linux-musl          64-bit Raspberry Pi OS (Pi 3/4/5, Zero 2 W)
#                                       zig (from PyPI) as C compiler and linker, via cargo-zigbuild
#   armv7-unknown-linux-gnueabihf       32-bit Raspberry Pi OS (Pi 2/3/4 on armhf)
#     + crt-static                      Debian's arm-linux-gnueabihf gcc; glibc linked in;
#                                       compiled as Thumb-2 with NEON (rustc's target
#                                       thumbv7neon-unknown-linux-gnueabihf: every armv7 Pi
#                                       has NEON; Thumb-2 code is about a fifth smaller)
#
# and, only when named, the same static build for x86_64 devices (and for
# measuring the device build's memory on this machine, `bench footprint`):
#   x86_64-unknown-linux-gnu            + crt-static, Debian's libseccomp.a (libseccomp-dev)
#
# libseccomp (Debian's 2.5.4 source) is built as a static library for each
# target and linked in: without it the agent would silently skip seccomp.
# The aarch64 and x86_64 builds leave out unwind tables (the rule of no-unwind-tables.ld).
# All lay out the functions an idle agent runs together (hot-text.ld, made
# by cross/hot-text.sh).
#
# libcontainer 0.7.0 does not compile for 32-bit targets (it compares
# rlimits, inode numbers and filesystem magics as 64-bit values). For armv7
# the build takes cargo's copy of its source, applies four type fixes (see
# `patch_libcontainer`), and builds against that copy; Cargo.lock is left as it was.
# Profile `release-small` (see Cargo.toml). Writes target/cross/<target>/baton-agent,
# target/cross/SHA256SUMS, and prints each binary's size and `file` line.
#
# Usage: cross/build.sh [--setup] [--prune] [TARGET…]
#   --setup   install what is missing first (apt packages, rustup targets, zig, cargo-zigbuild); needs root
#   --prune   afterwards, delete the build trees (about 1.5 GB) and keep only target/cross's binaries
#             and toolchains; a later run rebuilds from scratch (CI uses it: disk is shared)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/target/cross
TOOLS=$OUT/tools
SECCOMP_VERSION=2.5.4
ALL_TARGETS=(aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf)

setup=false
prune=false
targets=()
for a in "$@"; do
  case $a in
    --setup) setup=true ;;
    --prune) prune=true ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) targets+=("$a") ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
mkdir -p "$OUT" "$TOOLS"
export PATH="$TOOLS/venv/bin:$TOOLS/bin:$PATH"

# The rustc target each device build is compiled for (the output keeps the
# platform's name: target/cross/armv7-unknown-linux-gnueabihf/baton-agent).
rust_target() {
  case $1 in
    armv7-unknown-linux-gnueabihf) echo thumbv7neon-unknown-linux-gnueabihf ;;
    *) echo "$1" ;;
  esac
}

log() { printf '\033[1mcross:\033[0m %s\n' "$*" >&2; }

if $setup; then
  log "installing cross toolchains"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user-static gperf file libseccomp-dev \
    python3-venv make >/dev/null
  for t in "${targets[@]}"; do rustup target add "$(rust_target "$t")" >/dev/null; done
  if ! command -v zig >/dev/null; then
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install -q ziglang==0.13.0
    # The wheel ships zig as a module; give it a name on PATH.
    printf '#!/bin/sh\nexec "%s" -m ziglang "$@"\n' "$TOOLS/venv/bin/python3" >"$TOOLS/venv/bin/zig"
    chmod +x "$TOOLS/venv/bin/zig"
  fi
  command -v cargo-zigbuild >/dev/null || cargo install -q --locked cargo-zigbuild --version 0.24.1 --root "$TOOLS"
fi

# Debian's libseccomp source, fetched once (deb-src enabled on the fly).
seccomp_source() {
  local src=$OUT/libseccomp-$SECCOMP_VERSION
  if [ ! -f "$src/configure" ]; then
    log "fetching libseccomp $SECCOMP_VERSION source"
    local dl=$OUT/src-download
    rm -rf "$dl" && mkdir -p "$dl"
    if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
      sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >/etc/apt/sources.list.d/baton-deb-src.sources
      apt-get update -q >/dev/null
    fi
    (cd "$dl" && apt-get source -q --download-only "libseccomp=$SECCOMP_VERSION-1+deb12u1" >/dev/null 2>&1 \
      || apt-get source -q --download-only libseccomp >/dev/null)
    mkdir -p "$src"
    tar -xzf "$dl"/libseccomp_"$SECCOMP_VERSION".orig.tar.gz -C "$src" --strip-components=1
  fi
  echo "$src"
}

# Static libseccomp for one target, built with that target's C compiler.
build_seccomp() {
  local target=$1 host=$2 cc=$3 ar=$4
  local prefix=$OUT/$target/seccomp
  if [ -f "$prefix/lib/libseccomp.a" ]; then
    return
  fi
  local src build
  src=$(seccomp_source)
  build=$OUT/$target/seccomp-build
  rm -rf "$build" && mkdir -p "$build"
  log "building libseccomp for $target"
  (cd "$build" && CC="$cc" AR="$ar" "$src/configure" -q --host="$host" --prefix="$prefix" \
      --enable-static --disable-shared --disable-python >/dev/null \
    && make -s -j"$(nproc)" >/dev/null && make -s install >/dev/null)
}

# libcontainer's source with the 32-bit fixes, in target/cross (never in the repo).
patch_libcontainer() {
  local dst=$OUT/libcontainer-0.7.0-32bit
  if [ ! -f "$dst/.patched" ]; then
    local src
    src=$(cd "$ROOT" && cargo metadata --locked --format-version 1 2>/dev/null \
      | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="libcontainer"))')
    rm -rf "$dst" && cp -r "$(dirname "$src")" "$dst"
    # RLIM_INFINITY is u32::MAX where rlim_t is 32 bits wide.
    sed -i 's/rlim_cur != u64::MAX/rlim_cur != nix::libc::RLIM_INFINITY/' "$dst/src/process/fork.rs"
    # setrlimit takes the target's rlim_t (u64::MAX narrows to RLIM_INFINITY).
    sed -i 's/rlim_cur: rlimit.soft(),/rlim_cur: rlimit.soft() as _,/; s/rlim_max: rlimit.hard(),/rlim_max: rlimit.hard() as _,/' \
      "$dst/src/syscall/linux.rs"
    # statfs f_type and st_ino are 32 bits wide on 32-bit glibc.
    sed -i 's/FsType(DEVPTS_SUPER_MAGIC)/FsType(DEVPTS_SUPER_MAGIC as _)/g; s/stat.st_ino != PTMX_INO/stat.st_ino as u64 != PTMX_INO/' \
      "$dst/src/tty.rs"
    for f in src/process/fork.rs src/syscall/linux.rs src/tty.rs; do
      cmp -s "$(dirname "$src")/$f" "$dst/$f" && { echo "cross: libcontainer fix did not apply to $f" >&2; exit 1; }
    done
    touch "$dst/.patched"
  fi
  echo "$dst"
}

# Linked without unwind tables (the build aborts on panic; see the script).
# armv7 keeps its small ARM exception index: glibc's own unwinder reads it.
# And every build lays out the functions an idle agent runs together
# (hot-text.ld, made by cross/hot-text.sh): fewer of its pages resident.
# One script per target: given the two as separate INSERT scripts, zig's
# lld kept .eh_frame, so the discard rule goes into the same SECTIONS.
link_script() { # TARGET [no-unwind]
  local script=$OUT/$1/link.ld
  if [ "${2:-}" = no-unwind ]; then
    sed 's|^} INSERT BEFORE \.text;$|  /DISCARD/ : { *(.eh_frame) *(.eh_frame_hdr) }\n} INSERT BEFORE .text;|' \
      "$ROOT/cross/hot-text.ld" >"$script"
    grep -q DISCARD "$script" || { echo "cross: could not add the unwind-table rule to $script" >&2; exit 1; }
  else
    cp "$ROOT/cross/hot-text.ld" "$script"
  fi
  echo "-C link-arg=-Wl,-T,$script"
}

build_target() {
  local target=$1 rtarget
  rtarget=$(rust_target "$target")
  local bin=$ROOT/target/$rtarget/release-small/baton-agent
  mkdir -p "$OUT/$target"
  # Linked again every time: cargo does not see the linker scripts change.
  rm -f "$bin" "$ROOT/target/$rtarget/release-small/deps/baton_agent-"*
  case $target in
    aarch64-unknown-linux-musl)
      # zig cc as a plain C compiler for libseccomp (cargo-zigbuild does the same for Rust).
      local wrap=$OUT/$target/zigcc
      printf '#!/bin/sh\nexec zig cc -target aarch64-linux-musl "$@"\n' >"$wrap"
      printf '#!/bin/sh\nexec zig ar "$@"\n' >"$wrap-ar"
      chmod +x "$wrap" "$wrap-ar"
      build_seccomp "$target" aarch64-linux-musl "$wrap" "$wrap-ar"
      log "building baton-agent for $target"
      (cd "$ROOT" && LIBSECCOMP_LIB_PATH=$OUT/$target/seccomp/lib LIBSECCOMP_LINK_TYPE=static \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="$(link_script "$target" no-unwind)" \
        cargo zigbuild --locked -q --profile release-small -p baton-agent --target "$target")
      ;;
    armv7-unknown-linux-gnueabihf)
      build_seccomp "$target" arm-linux-gnueabihf arm-linux-gnueabihf-gcc arm-linux-gnueabihf-ar
      local patched
      patched=$(patch_libcontainer)
      log "building baton-agent for $target"
      # The patch section rewrites Cargo.lock's libcontainer entry: keep the committed one.
      cp "$ROOT/Cargo.lock" "$OUT/Cargo.lock.committed"
      trap 'cp "$OUT/Cargo.lock.committed" "$ROOT/Cargo.lock"' EXIT
      (cd "$ROOT" && LIBSECCOMP_LIB_PATH=$OUT/$target/seccomp/lib LIBSECCOMP_LINK_TYPE=static \
        CARGO_TARGET_THUMBV7NEON_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc \
        CARGO_TARGET_THUMBV7NEON_UNKNOWN_LINUX_GNUEABIHF_RUSTFLAGS="-C target-feature=+crt-static $(link_script "$target")" \
        CC_thumbv7neon_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc \
        AR_thumbv7neon_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar \
        cargo build -q --profile release-small -p baton-agent --target "$rtarget" \
          --config "patch.crates-io.libcontainer.path=\"$patched\"")
      cp "$OUT/Cargo.lock.committed" "$ROOT/Cargo.lock"
      trap - EXIT
      ;;
    x86_64-unknown-linux-gnu)
      log "building baton-agent for $target (static)"
      (cd "$ROOT" && LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu LIBSECCOMP_LINK_TYPE=static \
        CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static $(link_script "$target" no-unwind)" \
        cargo build --locked -q --profile release-small -p baton-agent --target "$target")
      ;;
    *) echo "cross: unknown target $target (known: ${ALL_TARGETS[*]} x86_64-unknown-linux-gnu)" >&2; exit 2 ;;
  esac
  cp "$bin" "$OUT/$target/baton-agent"
}

for t in "${targets[@]}"; do
  build_target "$t"
done

cd "$OUT"
sha256sum */baton-agent >SHA256SUMS
for t in "${targets[@]}"; do
  size=$(stat -c %s "$t/baton-agent")
  printf "%-32s %6.2f MiB  %s\n" "$t" "$(awk "BEGIN{print $size/1048576}")" "$(file -b "$t/baton-agent" | grep -oE 'statically linked|static-pie linked' || echo 'NOT STATIC')"
done
echo "checksums: $OUT/SHA256SUMS"

if $prune; then
  # Cargo's trees for the targets and for the host side of cross builds
  # (build scripts, proc macros under release-small), and libseccomp's build trees.
  for t in "${targets[@]}"; do rm -rf "$ROOT/target/$(rust_target "$t")"; done
  rm -rf "$ROOT/target/release-small" "$OUT"/*/seccomp-build "$OUT"/libseccomp-*/ "$OUT/src-download"
  log "pruned build trees: $(du -sh "$ROOT/target" | cut -f1) left in target/"
fi
