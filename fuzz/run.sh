#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 30) each, from its corpus in
# fuzz/corpus/TARGET (what a run finds is kept there only locally: CI's copy
# is thrown away). A crash fails the run, with its input under fuzz/artifacts/.
# Builds like `cargo fuzz` does (libFuzzer's coverage instrumentation,
# debug assertions, overflow checks) on the stable toolchain, without
# cargo-fuzz, in a light profile (`fuzz`: opt-level 1) that builds in
# minutes; `cargo fuzz run TARGET` works too for a developer who has it.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the instrumentation off build scripts and proc macros.
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --profile fuzz --locked --bins --target "$host"
mkdir -p artifacts
for target in protocol_decode workload_manifest layer_unpack image_manifest agent_config broker_wire; do
  mkdir -p "corpus/$target" "artifacts/$target"
  work=$(mktemp -d)
  cp -r "corpus/$target/." "$work/"
  echo "fuzzing $target for ${seconds}s ($(ls "$work" | wc -l) seeds)"
  "$CARGO_TARGET_DIR/$host/fuzz/$target" "$work" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 \
    -artifact_prefix="artifacts/$target/" -print_final_stats=1 2>&1 | tail -n 4
  rm -rf "$work"
done
