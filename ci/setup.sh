#!/usr/bin/env bash
# Install everything veil needs on a Debian 12 machine: system packages and tools.
# Idempotent: a second run installs nothing new. Run as root (sudo is used only when not root).
#
# usage: ci/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

# System packages, by purpose.
packages=(
  # build (build-essential's g++ also compiles libFuzzer for ci/fuzz.sh)
  build-essential pkg-config git curl ca-certificates python3 python3-venv python3-pip
  # protoc, for the CRI client (k8s-cri) used by the tests
  protobuf-compiler
  # guest kernel (Linux 6.12 source and what its build needs)
  linux-source-6.12 flex bison bc libelf-dev libssl-dev cpio xz-utils kmod
  # VMM and firmware
  qemu-system-x86 ovmf
  # guest image pieces: static busybox for test rootfs, disk tools
  busybox-static e2fsprogs erofs-utils cryptsetup-bin
  # container engine pieces: seccomp for the agent, containerd + runc for tests and baselines
  libseccomp-dev containerd runc
  # CNI plugins: test pods get a network namespace of their own (veil refuses hostNetwork)
  containernetworking-plugins
  # ip and tc: the network tests build and inspect the namespaces they create
  iproute2
  # iptables: the shim redirects localhost of a veil pod's namespace for CRI PortForward
  iptables
  # virtiofsd (from crates.io, below) links libcap-ng and libseccomp
  libcap-ng-dev
  # the benchmarks' PNG plots label their axes with DejaVu Sans
  fonts-dejavu-core
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
  log "system packages: all present"
fi

command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"

# Tools from crates.io, each cached under $VEIL_CACHE/tools/<name>-<version>.
install_crate vhost-device-vsock "$VHOST_DEVICE_VSOCK_VERSION"
# virtio-fs for directory volumes of plain `veil` pods (docs/volumes.md).
install_crate virtiofsd "$VIRTIOFSD_VERSION"
# Offline validation of deploy/kubernetes against Kubernetes' schemas
# (ci/validate-manifests.sh), in a venv of its own under $VEIL_CACHE.
KV_VENV="$VEIL_CACHE/tools/kubernetes-validate-1.37.0"
if [ ! -x "$KV_VENV/bin/kubernetes-validate" ]; then
  log "installing kubernetes-validate 1.37.0 from PyPI"
  python3 -m venv "$KV_VENV"
  "$KV_VENV/bin/pip" install --quiet kubernetes-validate==1.37.0
fi
log "setup done"
