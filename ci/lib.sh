# Shared helpers for the ci/ scripts. Source it; do not run it.
# shellcheck shell=bash

VEIL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VEIL_CACHE=${VEIL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/veil}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$VEIL_ROOT/target}
VHOST_DEVICE_VSOCK_VERSION=0.3.0
VIRTIOFSD_VERSION=1.14.0

log() { echo "[$(basename "$0")] $*" >&2; }
die() { echo "[$(basename "$0")] error: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# install_crate NAME VERSION: cargo install into the cache, once per version.
install_crate() {
  local name=$1 version=$2 root="$VEIL_CACHE/tools/$1-$2"
  if [ -x "$root/bin/$name" ]; then
    log "$name $version: cached"
  else
    log "$name $version: cargo install"
    cargo install --locked --quiet --root "$root" "$name" --version "$version"
  fi
}

tool_path() { echo "$VEIL_CACHE/tools/$1-$2/bin/$1"; }
