#!/usr/bin/env bash
# Validate every Kubernetes manifest in deploy/kubernetes against the
# published schemas of the Kubernetes version below, offline
# (kubernetes-validate from PyPI bundles them; ci/setup.sh installs it).
#
# usage: ci/validate-manifests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/lib.sh

# The oldest release with ValidatingAdmissionPolicy in admissionregistration/v1.
K8S_VERSION=1.30.0
KV="${VEIL_CACHE:-$HOME/.cache/veil}/tools/kubernetes-validate-1.37.0/bin/kubernetes-validate"
[ -x "$KV" ] || KV="$(command -v kubernetes-validate)" || die "kubernetes-validate not found: run ci/setup.sh"
log "validating deploy/kubernetes against Kubernetes $K8S_VERSION schemas"
for v in "$K8S_VERSION" 1.33.0; do
  "$KV" --strict --kubernetes-version "$v" deploy/kubernetes/*.yaml
done
