#!/usr/bin/env bash
# Set veil up on this machine and run its main job, the confidential path of a
# pod: a private containerd runs a container in a veil-sim microVM (through
# containerd-shim-veil-v2); the VM attests to a key broker (veil-kbs on
# 127.0.0.1, simulated TEE CA), whose audit lines show the release of the disk
# key and image policy; the container writes a secret to its root filesystem
# and an emptyDir on its LUKS2-encrypted scratch disk and reads it back; the
# host-side scratch file is searched (LUKS2 header, no secret).
# See docs/storage.md and docs/attestation.md.
#
# usage: ci/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

ci/setup.sh
ci/build-artefacts.sh
cargo run --quiet -p veil-tests --bin veil-pod-demo
