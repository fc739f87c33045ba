#!/usr/bin/env bash
# Set veil up on this machine and run its main job: boot a pod microVM and talk
# to the agent inside it over vsock.
#
# usage: ci/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

ci/setup.sh
ci/build-artefacts.sh
cargo run --quiet -p veil-tests --bin veil-boot-demo
