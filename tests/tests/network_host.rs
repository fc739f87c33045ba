//! The shim's pod network on the host, without a VM: in a network namespace
//! the test creates (a veth pair with an address and a default route, as a
//! CNI plugin leaves it), `PodNetwork::setup` pairs the interface with a tap
//! through tc ingress redirects and reads its MAC, MTU, address and routes;
//! teardown removes the qdiscs and the tap goes with its last descriptor.
//! Needs root and `ip`/`tc` (iproute2) to build and inspect the namespace.

use std::net::IpAddr;

use anyhow::{Context, Result};
use veil_shim::network::PodNetwork;
use veil_tests::netns::Netns;

#[tokio::test(flavor = "current_thread")]
async fn cni_interface_is_wired_to_a_tap_and_unwired_at_teardown() -> Result<()> {
    let ns = Netns::create("nettest")?;
    ns.ip("link add eth0 mtu 1400 type veth peer name peer0")?;
    ns.ip("link set eth0 address 0a:58:0a:63:00:02")?;
    ns.ip("addr add 10.99.0.2/24 dev eth0")?;
    ns.ip("link set peer0 up")?;
    ns.ip("link set eth0 up")?;
    ns.ip("route add default via 10.99.0.1 dev eth0")?;

    let mut net = PodNetwork::setup(&ns.path()).await?;
    let eth0 = net
        .interfaces()
        .find(|i| i.name == "eth0")
        .context("eth0 not found")?
        .clone();
    assert_eq!(eth0.mac_text(), "0a:58:0a:63:00:02");
    assert_eq!(eth0.mtu, 1400);
    assert_eq!(eth0.addresses, vec![("10.99.0.2".parse::<IpAddr>()?, 24)]);
    // peer0 is a CNI-side link too (up, Ethernet): it gets a tap of its own.
    assert_eq!(net.links.len(), 2);
    let default = net
        .routes
        .iter()
        .find(|r| r.prefix_len == 0)
        .context("no default route read")?;
    assert_eq!(default.gateway, Some("10.99.0.1".parse()?));
    assert_eq!(default.oif, eth0.index);
    // The subnet route is the kernel's: the guest derives it itself.
    assert!(net.routes.iter().all(|r| r.prefix_len == 0));

    let nics = net.nics();
    assert_eq!(nics.len(), 2);
    assert_eq!(nics[0].mac, "0a:58:0a:63:00:02");
    assert_eq!(nics[0].mtu, 1400);
    let tap = &net.links[0].tap_name.clone();
    let link = ns.ip(&format!("link show {tap}"))?;
    assert!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
    for dev in ["eth0", tap.as_str()] {
        let f = ns.tc(&format!("filter show dev {dev} ingress"))?;
        assert!(f.contains("mirred") && f.contains("Redirect"), "{dev}: {f}");
        // Every frame, not one protocol.
        assert!(f.contains("protocol all"), "{dev}: {f}");
    }

    net.teardown();
    for dev in ["eth0", "peer0"] {
        let q = ns.tc(&format!("qdisc show dev {dev}"))?;
        assert!(!q.contains("ingress"), "{dev} keeps its ingress qdisc: {q}");
    }
    // The tap is removed at teardown.
    assert!(ns.ip(&format!("link show {tap}")).is_err());
    Ok(())
}
