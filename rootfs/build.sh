#!/usr/bin/env bash
# Build a veil guest initrd: a newc cpio archive with the given program as /init.
#
# The archive is reproducible: the same inputs give the same bytes, whatever the
# files' timestamps, owners or the order the filesystem lists them in. This
# matters because launch measurements are computed over the initrd.
#
# usage: build.sh --init PROGRAM --out FILE [--add SRC:DEST]... [--gzip]
#   --init PROGRAM   the executable placed at /init (the agent, normally)
#   --add SRC:DEST   an extra file (mode kept, 0755 or 0644) at DEST inside the guest
#   --gzip           compress (slower to unpack under software emulation; off by default)
set -euo pipefail

die() { echo "rootfs/build.sh: error: $*" >&2; exit 1; }

init="" out="" gzip=0
adds=()
while [ $# -gt 0 ]; do
  case "$1" in
    --init) init=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --add) adds+=("$2"); shift 2 ;;
    --gzip) gzip=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$init" ] || die "--init PROGRAM is required"
[ -n "$out" ] || die "--out FILE is required"
[ -f "$init" ] || die "init program '$init' does not exist"
[ -x "$init" ] || die "init program '$init' is not executable"
if file_out=$(LC_ALL=C od -An -c -N4 "$init" | tr -d ' \n') && [ "$file_out" != '177ELF' ]; then
  die "init program '$init' is not an ELF binary"
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# Directory skeleton: mount points the agent uses, and /dev/console so the
# kernel can give /init its stdio before devtmpfs is mounted.
for d in dev proc sys run tmp etc sbin usr usr/bin mnt; do mkdir -p "$stage/$d"; done
mknod -m 600 "$stage/dev/console" c 5 1
install -m 0755 "$init" "$stage/init"
for a in "${adds[@]}"; do
  src=${a%%:*}; dest=${a#*:}
  [ -f "$src" ] || die "--add: '$src' does not exist"
  case "$dest" in /*) ;; *) die "--add: destination '$dest' must be absolute" ;; esac
  mkdir -p "$stage$(dirname "$dest")"
  if [ -x "$src" ]; then mode=0755; else mode=0644; fi
  install -m "$mode" "$src" "$stage$dest"
done

# Normalise everything that is not content: directory modes and all timestamps.
find "$stage" -type d -exec chmod 0755 {} +
chmod 1777 "$stage/tmp"
find "$stage" -exec touch -h -d @0 {} +

tmp_out="$out.tmp.$$"
(
  cd "$stage"
  find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible
) > "$tmp_out"
if [ "$gzip" = 1 ]; then
  gzip -n -9 < "$tmp_out" > "$tmp_out.gz" && mv "$tmp_out.gz" "$tmp_out"
fi
mv "$tmp_out" "$out"
echo "rootfs/build.sh: wrote $out ($(stat -c %s "$out") bytes)" >&2
