#!/usr/bin/env bash
# Build the guest artefacts (cached by their inputs) and record their paths in
# target/veil-artefacts.env, where the tests and benchmarks find them:
#   - the guest kernel (kernel-config/build.sh, cached by fragments + source)
#   - the static veil-agent and the initrd with it as /init (cached by content)
#   - the floor initrd: a trivial /init that prints and powers off (benchmarks)
#   - the shim, containerd-shim-veil-v2, for the containerd tests
#   - the key broker veil-kbs and the operator CLI veil, for the attestation
#     tests
#
# The host binaries are built with cargo profile $VEIL_HOST_PROFILE: `release`
# (the default; benchmarks want it) or `dev` (ci/test.sh: `cargo test` builds
# the same crates in dev anyway, so CI compiles the dependency tree once less).
#
# usage: ci/build-artefacts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

kernel_dir=$(kernel-config/build.sh)

log "building the static agent"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --quiet --profile guest --target x86_64-unknown-linux-gnu -p veil-agent
agent="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/guest/veil-agent"
[ -x "$agent" ] || die "agent binary $agent missing after build"

# build_initrd NAME INIT: initrd cached under the hash of its inputs.
build_initrd() {
  local name=$1 init=$2 key out
  key=$( { sha256sum "$init"; cat rootfs/build.sh; } | sha256sum | cut -c1-16)
  out="$VEIL_CACHE/initrd/$key/$name.cpio"
  if [ ! -f "$out" ]; then
    mkdir -p "$(dirname "$out")"
    rootfs/build.sh --init "$init" --out "$out"
  fi
  echo "$out"
}
initrd=$(build_initrd initrd "$agent")

floor_init="$CARGO_TARGET_DIR/veil-floor-init"
gcc -static -Os -s -o "$floor_init" rootfs/floor-init.c
floor_initrd=$(build_initrd floor "$floor_init")

vdv=$(tool_path vhost-device-vsock "$VHOST_DEVICE_VSOCK_VERSION")
[ -x "$vdv" ] || die "vhost-device-vsock not installed at $vdv: run ci/setup.sh"
vfsd=$(tool_path virtiofsd "$VIRTIOFSD_VERSION")
[ -x "$vfsd" ] || die "virtiofsd not installed at $vfsd: run ci/setup.sh"
qemu=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not found: run ci/setup.sh"

profile=${VEIL_HOST_PROFILE:-release}
case $profile in
  release) bin_dir="$CARGO_TARGET_DIR/release" ;;
  dev) bin_dir="$CARGO_TARGET_DIR/debug" ;;
  *) die "VEIL_HOST_PROFILE must be release or dev, not '$profile'" ;;
esac

log "building the shim ($profile)"
cargo build --quiet --profile "$profile" -p containerd-shim-veil-v2
shim="$bin_dir/containerd-shim-veil-v2"
[ -x "$shim" ] || die "shim binary $shim missing after build"

log "building the key broker and the veil CLI ($profile)"
cargo build --quiet --profile "$profile" -p veil-kbs --bins
kbs="$bin_dir/veil-kbs"
veil_cli="$bin_dir/veil"
[ -x "$kbs" ] || die "veil-kbs binary $kbs missing after build"
[ -x "$veil_cli" ] || die "veil binary $veil_cli missing after build"

mkdir -p "$CARGO_TARGET_DIR"
cat > "$CARGO_TARGET_DIR/veil-artefacts.env" <<ENV
VEIL_KERNEL=$kernel_dir/vmlinux
VEIL_BZIMAGE=$kernel_dir/bzImage
VEIL_INITRD=$initrd
VEIL_FLOOR_INITRD=$floor_initrd
VEIL_AGENT=$agent
VEIL_VHOST_DEVICE_VSOCK=$vdv
VEIL_VIRTIOFSD=$vfsd
VEIL_QEMU=$qemu
VEIL_SHIM=$shim
VEIL_KBS=$kbs
VEIL_CLI=$veil_cli
ENV
log "artefacts recorded in $CARGO_TARGET_DIR/veil-artefacts.env"
cat "$CARGO_TARGET_DIR/veil-artefacts.env" >&2
