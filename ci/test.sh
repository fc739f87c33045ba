#!/usr/bin/env bash
# Run every veil test on a Debian 12 machine: set up (idempotent), lint, build the
# fuzz targets for a short fixed time each, then build the guest artefacts
# (cached) and run the whole workspace's tests, VM tests included.
#
# usage: ci/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

# A clean clone builds everything once: incremental state would only double the
# target directory's size on a runner whose disk is not ours to size.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
df -h . | tail -1

ci/setup.sh
log "cargo fmt --check"
cargo fmt --all -- --check
log "module dependencies (no two files refer to each other)"
python3 ci/check-module-cycles.py
ci/validate-manifests.sh
log "cargo clippy"
cargo clippy --quiet --workspace --all-targets -- -D warnings
# Every fuzz target, built on stable and run for a fixed time (docs/fuzzing.md).
# First, so that in CI its build (which shares nothing with the rest: other
# flags) can be removed before the main build fills the disk.
log "fuzz targets"
ci/fuzz.sh
if [ "${CI:-}" = true ]; then rm -rf "${CARGO_TARGET_DIR}/fuzz"; fi
# Host binaries in the dev profile: cargo test compiles that profile anyway.
VEIL_HOST_PROFILE=dev ci/build-artefacts.sh
# Every host binary the integration tests run (veil-node has no integration test of
# its own, so cargo test alone would not build it).
log "cargo build --workspace --bins"
cargo build --workspace --bins
log "cargo test"
cargo test --workspace --no-fail-fast
df -h "${CARGO_TARGET_DIR}" | tail -1
du -sh "${CARGO_TARGET_DIR}" 2>/dev/null || true
log "all tests passed"
