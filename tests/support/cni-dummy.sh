#!/bin/sh
# A CNI plugin for the test containerd: gives the pod's network namespace a
# veth pair with both ends inside it (CNI_IFNAME, normally eth0, and its
# peer; the kernels tests run on need not have the dummy driver) and a fixed
# test address on CNI_IFNAME, so
# containerd's CRI finds the pod IP it requires, without touching the node's
# network namespace (no veth, no bridge, no route outside the pod).
# Spec: CNI 0.4.0 (CNI_COMMAND ADD/DEL/CHECK/VERSION, config on stdin).
set -eu
addr=10.88.255.2/24
case "${CNI_COMMAND:-}" in
  VERSION)
    echo '{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}' ;;
  ADD)
    cat >/dev/null
    nsenter --net="$CNI_NETNS" ip link add "$CNI_IFNAME" type veth peer name "$CNI_IFNAME-peer"
    nsenter --net="$CNI_NETNS" ip link set "$CNI_IFNAME-peer" up
    nsenter --net="$CNI_NETNS" ip addr add "$addr" dev "$CNI_IFNAME"
    nsenter --net="$CNI_NETNS" ip link set "$CNI_IFNAME" up
    printf '{"cniVersion":"0.4.0","interfaces":[{"name":"%s","sandbox":"%s"}],"ips":[{"version":"4","address":"%s","interface":0}]}\n' \
      "$CNI_IFNAME" "$CNI_NETNS" "$addr" ;;
  DEL|CHECK)
    cat >/dev/null ;;
  *)
    echo "{\"code\":4,\"msg\":\"unknown CNI_COMMAND '${CNI_COMMAND:-}'\"}"; exit 1 ;;
esac
