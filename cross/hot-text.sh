#!/usr/bin/env bash
# Regenerates cross/hot-text.ld: the functions an agent runs from start-up
# through an idle, TLS-connected minute, laid out together at link time.
#
# Why: each page of the binary the agent touches maps its 64 KiB neighbourhood
# (the kernel's fault-around), and the code an idle agent runs was spread over
# the whole text, so ~5.6 MB of a 6 MB static binary stayed resident. Packed
# into one output section (~1.1 MB) the same run keeps ~1.3 MB less resident
# (BENCHMARKS.md, "Agent footprint"). Layout only: the same code, the same
# behaviour. A function added since the last run simply stays in `.text`.
#
# How: builds the agent unstripped twice, statically as cross/build.sh does
# and dynamically linked (profile release-small, in target/hot-profile so the
# real build is left alone; the two run slightly different code, and a list
# from both kept ~200 KiB more of an idle agent's pages together than one
# from the static build alone), starts a controller with its embedded broker
# over TLS, joins each agent with a token, runs it under valgrind's callgrind
# for SECONDS (default 60) with a heartbeat every second, and writes one
# input-section pattern per function that ran in either (crate hashes
# wildcarded, so the same list serves the aarch64 and armv7 builds). Needs
# loopback ports 18080/18883, valgrind, python3, and the release controller
# (built here). The profiles stay in target/hot-profile/callgrind-*.out.
#
# Usage: cross/hot-text.sh [SECONDS]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECS=${1:-60}
TARGET_DIR=$ROOT/target/hot-profile
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

log() { printf '\033[1mhot-text:\033[0m %s\n' "$*" >&2; }
command -v valgrind >/dev/null || { echo "hot-text: valgrind is needed (apt-get install valgrind)" >&2; exit 2; }

log "building the controller (release) and two unstripped agents (static, dynamic)"
(cd "$ROOT" && cargo build --locked -q --release -p baton-controller)
(cd "$ROOT" && CARGO_PROFILE_RELEASE_SMALL_STRIP=false CARGO_TARGET_DIR=$TARGET_DIR \
  LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu LIBSECCOMP_LINK_TYPE=static \
  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static -C link-arg=-Wl,-T,$ROOT/cross/no-unwind-tables.ld" \
  cargo build --locked -q --profile release-small -p baton-agent --target x86_64-unknown-linux-gnu)
(cd "$ROOT" && CARGO_PROFILE_RELEASE_SMALL_STRIP=false CARGO_TARGET_DIR=$TARGET_DIR \
  cargo build --locked -q --profile release-small -p baton-agent)
STATIC=$TARGET_DIR/x86_64-unknown-linux-gnu/release-small/baton-agent
DYNAMIC=$TARGET_DIR/release-small/baton-agent
BATON=$ROOT/target/release/baton

log "starting a controller (embedded broker, TLS, device accounts)"
"$BATON" server --listen 127.0.0.1:18080 --data-dir "$WORK/controller" --mqtt-listen 127.0.0.1:18883 \
  --mqtt-auth --mqtt-tls --resolve-digests false >"$WORK/controller.log" 2>&1 &
for _ in $(seq 100); do curl -sf http://127.0.0.1:18080/healthz >/dev/null && break; sleep 0.2; done

profile() { # AGENT DEVICE-ID CALLGRIND-OUT
  local agent=$1 id=$2 out=$3
  local token
  token=$("$BATON" --server http://127.0.0.1:18080 token create | tr -d '\n')
  "$agent" join "$token" --broker mqtts://127.0.0.1:18883 --device-id "$id" --data-dir "$WORK/$id" --config /dev/null
  : >"$WORK/$id.toml"
  log "running $agent under callgrind for ${SECS} s"
  valgrind -q --tool=callgrind --demangle=no --callgrind-out-file="$out" \
    "$agent" --broker mqtts://127.0.0.1:18883 --device-id "$id" --data-dir "$WORK/$id" \
    --heartbeat-interval 1 --config "$WORK/$id.toml" >"$WORK/$id.log" 2>&1 &
  local pid=$!
  sleep "$SECS"
  curl -sf "http://127.0.0.1:18080/api/v1/devices/$id" | grep -q '"status":"online"' \
    || { echo "hot-text: $id never came online; its log:" >&2; tail -20 "$WORK/$id.log" >&2; exit 1; }
  kill -INT "$pid"
  wait "$pid" || true
}
profile "$STATIC" hot-static "$TARGET_DIR/callgrind-static.out"
profile "$DYNAMIC" hot-dynamic "$TARGET_DIR/callgrind-dynamic.out"

python3 - "$SECS" "$TARGET_DIR/callgrind-static.out" "$STATIC" "$TARGET_DIR/callgrind-dynamic.out" "$DYNAMIC" \
  >"$ROOT/cross/hot-text.ld" <<'EOF'
import re, subprocess, sys
from collections import defaultdict
secs, runs = sys.argv[1], sys.argv[2:]
syms = set()
for out, binary in zip(runs[::2], runs[1::2]):
    names, ran = {}, set()
    for line in open(out, errors="replace"):
        m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            kind, i, name = m.groups()
            if name is not None:
                names[i] = name
            if kind == "fn":
                ran.add(i)
    # Every name at the address of a function that ran: the linker's input
    # section is named after one of the aliases, callgrind after any of them.
    at, of = defaultdict(set), {}
    nm = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True, check=True)
    for line in nm.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            at[parts[0]].add(parts[2])
            of[parts[2]] = parts[0]
    for i in ran:
        name = names.get(i, "")
        syms |= at.get(of.get(name, ""), {name})
patterns = set()
for sym in syms:
    # Copies LTO made get a numbered suffix (".llvm.N", ".N"), unstable across builds.
    sym = re.sub(r"(\.llvm)?\.\d+$", "", sym)
    if sym.startswith("_ZN"):
        # Legacy mangling: the trailing hash differs per target and build.
        patterns.add(re.sub(r"17h[0-9a-f]{16}E$", "17h*E", sym) + "*")
    elif sym.startswith("_R"):
        # v0 mangling (the standard library): crate disambiguators differ per target.
        patterns.add(re.sub(r"Cs[0-9A-Za-z]+_(?=\d)", "Cs*_", sym) + "*")
print(f"/* Generated by cross/hot-text.sh ({secs} s of an idle agent over TLS, static and")
print("   dynamic builds): the functions that ran, in one output section before .text, so")
print("   the pages an idle agent keeps resident are few and together. Layout only. */")
print("SECTIONS {\n  .text.baton.hot : {")
for p in sorted(patterns):
    print(f"    *(.text.{p})")
print("  }\n} INSERT BEFORE .text;")
EOF
log "wrote cross/hot-text.ld: $(grep -c '^    \*' "$ROOT/cross/hot-text.ld") functions"
