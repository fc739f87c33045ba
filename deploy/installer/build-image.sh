#!/usr/bin/env bash
# Build the installer image offline: an OCI image layout in a tar (for
# `ctr images import` or a registry push with any OCI tool), no daemon.
# One layer: veil-node with the shared libraries it links, and the artefacts
# under /veil (bin/: shim, vhost-device-vsock, virtiofsd; share/: kernel,
# initrd) and /veil/VERSION, the artefacts' version (VEIL_ARTEFACTS_VERSION,
# default the tag of REF), which install copies to /opt/veil/VERSION and
# records. Entrypoint: `veil-node`; the DaemonSet passes `run ...`.
#
# usage: deploy/installer/build-image.sh OUT.tar [REF]   (after ci/build-artefacts.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
. ci/lib.sh
out=$(realpath -m "${1:?usage: build-image.sh OUT.tar [REF]}")
ref=${2:-veil-node:$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}
target=${CARGO_TARGET_DIR:-target}
env_file="$target/veil-artefacts.env"
[ -f "$env_file" ] || die "$env_file missing: run ci/build-artefacts.sh"
get() { sed -n "s/^$1=//p" "$env_file"; }
node_bin="$target/debug/veil-node"
[ -x "$node_bin" ] || die "$node_bin missing: cargo build -p veil-node"

work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root/veil/bin" "$root/veil/share" "$root/usr/bin"
cp "$node_bin" "$root/usr/bin/veil-node"
cp "$(get VEIL_SHIM)" "$root/veil/bin/containerd-shim-veil-v2"
cp "$(get VEIL_VHOST_DEVICE_VSOCK)" "$root/veil/bin/vhost-device-vsock"
cp "$(get VEIL_VIRTIOFSD)" "$root/veil/bin/virtiofsd"
cp "$(get VEIL_KERNEL)" "$root/veil/share/vmlinux"
cp "$(get VEIL_INITRD)" "$root/veil/share/veil-initrd.cpio"
echo "${VEIL_ARTEFACTS_VERSION:-${ref##*:}}" > "$root/veil/VERSION"
# The libraries veil-node links (and the loader), at their own paths.
for lib in $(ldd "$node_bin" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
done

blobs="$work/layout/blobs/sha256"; mkdir -p "$blobs"
put() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "$blobs/$d"; echo "$d"; }
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n "$work/layer.tar"
layer_size=$(stat -c %s "$work/layer.tar.gz"); layer=$(put "$work/layer.tar.gz")
cat > "$work/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin"],"Entrypoint":["/usr/bin/veil-node"],"Cmd":["run","--root","/host","--host-mount-ns"]},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]}}
JSON
config_size=$(stat -c %s "$work/config.json"); config=$(put "$work/config.json")
cat > "$work/manifest.json" <<JSON
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config","size":$config_size},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:$layer","size":$layer_size}]}
JSON
manifest_size=$(stat -c %s "$work/manifest.json"); manifest=$(put "$work/manifest.json")
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/layout/oci-layout"
cat > "$work/layout/index.json" <<JSON
{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest","size":$manifest_size,"annotations":{"org.opencontainers.image.ref.name":"$ref","io.containerd.image.name":"$ref"}}]}
JSON
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/layout" -cf "$out" .
log "wrote $out ($ref)"
