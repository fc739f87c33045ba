#!/usr/bin/env bash
# Build the veil guest kernel (vmlinux and bzImage) from Debian's linux-source-6.12.
#
# The configuration is `allnoconfig` plus the fragments in this directory. After
# Kconfig has resolved dependencies, every option a fragment asked for is checked
# against the final .config: Kconfig silently drops an option whose dependencies
# are missing, and a guest kernel without, say, DM_CRYPT must not be built quietly.
#
# The result is cached under $VEIL_CACHE/kernel/<key>, where <key> hashes the
# kernel source tarball, the fragments and this script. Prints the artefact
# directory on stdout (everything else goes to stderr).
#
# usage: build.sh [--fragments "base netadmin snp tdx"] [--extra FILE]... [--check-only]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${VEIL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/veil}
src_tar=${VEIL_KERNEL_SOURCE:-/usr/src/linux-source-6.12.tar.xz}
fragments="base netadmin snp tdx"
extra=()
check_only=0

die() { echo "kernel-config/build.sh: error: $*" >&2; exit 1; }
log() { echo "kernel-config/build.sh: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --fragments) fragments=$2; shift 2 ;;
    --extra) extra+=("$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2 ;;
    --check-only) check_only=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[ -f "$src_tar" ] || die "kernel source $src_tar not found: install Debian's linux-source-6.12 (ci/setup.sh does)"

files=()
for f in $fragments; do
  [ -f "$here/$f.config" ] || die "no fragment '$f' ($here/$f.config)"
  files+=("$here/$f.config")
done
files+=("${extra[@]}")

# --- unpack the source once per tarball ---
src_key=$(sha256sum "$src_tar" | cut -c1-16)
src_dir=$cache/kernel-src/$src_key
if [ ! -f "$src_dir/.unpacked" ]; then
  log "unpacking $src_tar into $src_dir"
  rm -rf "$src_dir"; mkdir -p "$src_dir"
  tar -xf "$src_tar" -C "$src_dir" --strip-components=1
  touch "$src_dir/.unpacked"
fi

key=$( { echo "$src_key"; cat "${files[@]}" "$0"; } | sha256sum | cut -c1-16)
out=$cache/kernel/$key
if [ "$check_only" = 0 ] && [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  log "cached: $out"
  echo "$out"; exit 0
fi

build=$cache/kernel-build/$key
mkdir -p "$build"
# The same option may be asked for by several fragments (ACPI, EFI...): keep one copy.
awk '!seen[$0]++' "${files[@]}" > "$build/veil.fragment"
log "configuring (allnoconfig + ${fragments}${extra:+ + extra}) in $build"
make -s -C "$src_dir" O="$build" ARCH=x86_64 KCONFIG_ALLCONFIG="$build/veil.fragment" allnoconfig >&2

# --- every requested option must be in the final .config ---
missing=0
for f in "${files[@]}"; do
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*)
        opt=${line%%=*}
        if ! grep -qxF "$line" "$build/.config"; then
          got=$(grep -E "^(# )?$opt[= ]" "$build/.config" || echo "$opt absent (unknown option or its menu is hidden)")
          echo "  $(basename "$f"): requested $line, final .config has: $got" >&2
          missing=$((missing + 1))
        fi ;;
      "# CONFIG_"*" is not set")
        opt=${line#\# }; opt=${opt%% *}
        if grep -qE "^$opt=" "$build/.config"; then
          echo "  $(basename "$f"): requested $opt off, final .config has: $(grep -E "^$opt=" "$build/.config")" >&2
          missing=$((missing + 1))
        fi ;;
    esac
  done < "$f"
done
if [ "$missing" -gt 0 ]; then
  die "$missing requested option(s) did not land in the final .config (Kconfig dropped them, usually because a dependency is off; see 'make menuconfig' help for each option's 'Depends on')"
fi
log "all requested options are in the final .config"
[ "$check_only" = 1 ] && { echo "$build/.config"; exit 0; }

log "building vmlinux and bzImage with $(nproc) jobs"
make -s -C "$src_dir" O="$build" ARCH=x86_64 -j"$(nproc)" vmlinux bzImage >&2
mkdir -p "$out.tmp"
cp "$build/vmlinux" "$out.tmp/vmlinux"
cp "$build/arch/x86/boot/bzImage" "$out.tmp/bzImage"
cp "$build/.config" "$out.tmp/config"
rm -rf "$out"; mv "$out.tmp" "$out"
log "built: $out"
echo "$out"
