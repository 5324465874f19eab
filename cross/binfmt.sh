#!/usr/bin/env bash
# Lets the kernel run aarch64 and armv7 executables through qemu-user
# (binfmt_misc), as tests/tests/cross.rs needs for an agent that upgrades
# itself: the switch execs the new build and its watcher, which plain
# `qemu-aarch64-static agent` would not follow. Root; uses the entries
# Debian's qemu-user-static ships in /usr/lib/binfmt.d (installed by
# `cross/build.sh --setup`). Machine-wide and idempotent; undo with
# `echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64`.
set -euo pipefail
dir=/proc/sys/fs/binfmt_misc
[ -e "$dir/register" ] || mount -t binfmt_misc binfmt_misc "$dir"
for arch in aarch64 arm; do
  conf=/usr/lib/binfmt.d/qemu-$arch.conf
  [ -r "$conf" ] || { echo "binfmt: $conf missing (apt-get install qemu-user-static)" >&2; exit 1; }
  if [ ! -e "$dir/qemu-$arch" ]; then
    cat "$conf" > "$dir/register"
  fi
  head -1 "$dir/qemu-$arch" | grep -q enabled || { echo "binfmt: qemu-$arch not enabled" >&2; exit 1; }
done
echo "binfmt: aarch64 and arm executables run through qemu-user"
