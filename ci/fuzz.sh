#!/usr/bin/env bash
# Build every fuzz target with libFuzzer and coverage instrumentation on stable
# Rust, then run each for a fixed time from its committed seed corpus. Fails if
# a target does not build or an input crashes, panics, overflows, exceeds the
# RSS limit or hangs.
#
# The fuzz targets live in workspaces of their own (guest-agent/fuzz,
# attestation/fuzz); docs/fuzzing.md says what each covers.
#
# usage: ci/fuzz.sh [TARGET...]     (default: every [[bin]] of every fuzz workspace)
# env:   FUZZ_SECONDS  run time per target (default 15)
#        FUZZ_JOBS     targets run at once (default: the number of cores)
#        FUZZ_ARGS     extra libFuzzer options, e.g. "-only_ascii=1"
#
# A crashing input is left in target/fuzz/artifacts/<target>/; replay it with
#   target/fuzz/<host triple>/release/<target> <that file>
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

WORKSPACES=(guest-agent/fuzz attestation/fuzz)
FUZZ_SECONDS=${FUZZ_SECONDS:-15}
FUZZ_JOBS=${FUZZ_JOBS:-$(nproc)}
HOST=$(rustc -vV | sed -n 's/^host: //p')
# One target directory for both workspaces (their lock files and profiles
# agree, so they share most of the build), apart from the normal builds: the
# flags below change every crate's fingerprint.
FUZZ_DIR="$CARGO_TARGET_DIR/fuzz"
# SanitizerCoverage as cargo-fuzz sets it, less what needs nightly
# (-Zsanitizer=address): inline 8-bit edge counters and the PC table are
# libFuzzer's coverage feedback, trace-compares lets it solve magic numbers and
# compared strings. `--target` below keeps these flags off build scripts and
# proc macros. Debug assertions and overflow checks come from the workspaces'
# release profiles.
export RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing"

bins_of() { sed -n '/^\[\[bin\]\]/,/^name/s/^name = "\(.*\)"/\1/p' "$1/Cargo.toml"; }

declare -A workspace_of=()
all=()
for ws in "${WORKSPACES[@]}"; do
  while read -r t; do
    workspace_of[$t]=$ws
    all+=("$t")
  done < <(bins_of "$ws")
done
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi
for t in "${targets[@]}"; do
  [ -n "${workspace_of[$t]:-}" ] || die "no fuzz target '$t' (there are: ${all[*]})"
done

start=$(date +%s)
for ws in "${WORKSPACES[@]}"; do
  bin_args=()
  for t in "${targets[@]}"; do
    [ "${workspace_of[$t]}" = "$ws" ] && bin_args+=(--bin "$t")
  done
  [ ${#bin_args[@]} -gt 0 ] || continue
  log "building $ws: ${bin_args[*]}"
  cargo build --quiet --locked --release --manifest-path "$ws/Cargo.toml" \
    --target "$HOST" --target-dir "$FUZZ_DIR" "${bin_args[@]}"
done
built=$(date +%s)
log "built ${#targets[@]} fuzz targets in $((built - start)) s"

# run_one TARGET: fuzz it for FUZZ_SECONDS; its log and a one-line summary go
# under $FUZZ_DIR/logs; the exit status is libFuzzer's (0: nothing found).
run_one() {
  local t=$1 ws=${workspace_of[$1]}
  local work="$FUZZ_DIR/corpus/$t" artifacts="$FUZZ_DIR/artifacts/$t/" out="$FUZZ_DIR/logs/$t.log"
  local seeds=() rc=0
  # New inputs go to a scratch corpus under target/, never into the committed seeds.
  mkdir -p "$work" "$artifacts"
  [ -d "$ws/corpus/$t" ] && seeds=("$ws/corpus/$t")
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of options
  "$FUZZ_DIR/$HOST/release/$t" -max_total_time="$FUZZ_SECONDS" -timeout=10 \
    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$artifacts" \
    ${FUZZ_ARGS:-} "$work" "${seeds[@]}" >"$out" 2>&1 || rc=$?
  local runs rate first last
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -1)
  first=$(grep -o 'INITED cov: [0-9]* ft: [0-9]*' "$out" | head -1 | sed 's/INITED //' || true)
  last=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$out" | tail -1 || true)
  printf '%-14s %9s runs %7s exec/s  %-22s -> %-22s corpus %s (%s seeds)\n' \
    "$t" "${runs:-?}" "${rate:-?}" "${first:-?}" "${last:-?}" \
    "$(find "$work" -type f | wc -l)" "$(find "${seeds[@]:-/dev/null}" -type f 2>/dev/null | wc -l)" \
    >"$FUZZ_DIR/logs/$t.summary"
  return "$rc"
}

mkdir -p "$FUZZ_DIR/logs"
log "fuzzing ${#targets[@]} targets for $FUZZ_SECONDS s each, $FUZZ_JOBS at a time"
for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$FUZZ_JOBS" ]; do wait -n || true; done
  rm -f "$FUZZ_DIR/logs/$t.rc"
  { rc=0; run_one "$t" || rc=$?; echo "$rc" >"$FUZZ_DIR/logs/$t.rc"; } &
done
wait
failed=()
for t in "${targets[@]}"; do
  [ "$(cat "$FUZZ_DIR/logs/$t.rc" 2>/dev/null)" = 0 ] || failed+=("$t")
done

log "fuzzing done in $(($(date +%s) - built)) s (build $((built - start)) s); per target (cov = edges, ft = features):"
for t in "${targets[@]}"; do cat "$FUZZ_DIR/logs/$t.summary" >&2 2>/dev/null || echo "$t: no summary" >&2; done
for t in "${failed[@]}"; do
  log "$t FAILED; the end of its log ($FUZZ_DIR/logs/$t.log):"
  tail -40 "$FUZZ_DIR/logs/$t.log" >&2
  log "$t: inputs that failed: $(ls "$FUZZ_DIR/artifacts/$t/" | tr '\n' ' ')"
done
du -sh "$FUZZ_DIR" 2>/dev/null || true
[ ${#failed[@]} -eq 0 ] || die "fuzz targets failed: ${failed[*]}"
log "all ${#targets[@]} fuzz targets ran without a failure"
