#!/usr/bin/env bash
# Set veil up on this machine and run its main job: a private containerd runs a
# container in a veil-sim microVM (through containerd-shim-veil-v2) and prints
# what the container printed.
#
# usage: ci/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

ci/setup.sh
ci/build-artefacts.sh
cargo run --quiet -p veil-tests --bin veil-pod-demo
