#!/usr/bin/env bash
# Run every veil test on a Debian 12 machine: set up (idempotent), lint, build the
# guest artefacts (cached), then the whole workspace's tests, VM tests included.
#
# usage: ci/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

ci/setup.sh
log "cargo fmt --check"
cargo fmt --all -- --check
log "module dependencies (no two files refer to each other)"
python3 ci/check-module-cycles.py
ci/validate-manifests.sh
log "cargo clippy"
cargo clippy --quiet --workspace --all-targets -- -D warnings
# Host binaries in the dev profile: cargo test compiles that profile anyway.
VEIL_HOST_PROFILE=dev ci/build-artefacts.sh
# Every host binary the integration tests run (veil-node has no integration test of
# its own, so cargo test alone would not build it).
log "cargo build --workspace --bins"
cargo build --workspace --bins
log "cargo test"
cargo test --workspace --no-fail-fast
log "all tests passed"
