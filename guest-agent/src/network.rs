//! The pod's network in the guest: `lo` up in every pod, and the interfaces
//! and routes the shim read from the pod's network namespace (CNI's) applied
//! to the VM's NICs through netlink (no `ip` binary in the initrd).
//!
//! The host is untrusted: [`plan`] checks everything it sends (bounded
//! counts, one NIC per MAC, unicast MACs, valid names, MTUs, addresses and
//! prefixes, routes through the pod's own interfaces) before [`apply`]
//! touches a link.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use futures_util::stream::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::AddressHeaderFlags,
        link::{LinkAttribute, LinkMessage},
        route::RouteScope,
    },
    Handle, LinkUnspec, RouteMessageBuilder,
};
use veil_protocol::agent::{CreateSandboxRequest, IpNet, NetInterface, NetRoute};

/// Most interfaces a pod may have.
pub const MAX_INTERFACES: usize = 8;
/// Most addresses of one interface.
pub const MAX_ADDRESSES: usize = 16;
/// Most routes.
pub const MAX_ROUTES: usize = 64;
/// How long a NIC may take to show up after boot.
const NIC_WAIT: Duration = Duration::from_secs(5);

/// Errors configuring the guest's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The host sent something that is not a network configuration.
    #[error("invalid network configuration: {0}")]
    Invalid(String),
    /// No NIC of the VM has an interface's MAC.
    #[error("no network device with MAC {mac} (for {name}) in the VM")]
    NoNic {
        /// The MAC.
        mac: String,
        /// The interface it was to become.
        name: String,
    },
    /// A netlink request failed.
    #[error("netlink: {what}")]
    Netlink {
        /// What was asked.
        what: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// The netlink socket.
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    /// A sysctl of an interface.
    #[error("cannot set {path}")]
    Sysctl {
        /// The /proc/sys path.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

impl crate::status::Classify for NetworkError {
    fn kind(&self) -> crate::status::Kind {
        use crate::status::Kind;
        match self {
            NetworkError::Invalid(_) => Kind::InvalidArgument,
            NetworkError::NoNic { .. } => Kind::FailedPrecondition,
            NetworkError::Netlink { .. }
            | NetworkError::Socket(_)
            | NetworkError::Sysctl { .. } => Kind::Internal,
        }
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// An interface to configure, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfacePlan {
    /// The NIC's MAC.
    pub mac: [u8; 6],
    /// Its new name.
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses.
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A route to add, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Destination network.
    pub destination: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// Next hop, same family.
    pub gateway: Option<IpAddr>,
    /// Index into the plan's interfaces.
    pub device: usize,
    /// `RT_SCOPE_*`.
    pub scope: u8,
    /// Metric.
    pub metric: u32,
}

/// The pod's network, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Interfaces.
    pub interfaces: Vec<IfacePlan>,
    /// Routes, on-link ones first (a gateway must be reachable when its
    /// route is added).
    pub routes: Vec<RoutePlan>,
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn bad(msg: impl Into<String>) -> NetworkError {
    NetworkError::Invalid(msg.into())
}

fn ip_of(bytes: &[u8], what: &str) -> Result<IpAddr, NetworkError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    Err(bad(format!(
        "{what} is {} bytes, not an IPv4 (4) or IPv6 (16) address",
        bytes.len()
    )))
}

fn net_of(n: &IpNet, what: &str) -> Result<(IpAddr, u8), NetworkError> {
    let ip = ip_of(&n.ip, what)?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if n.prefix_len > max {
        return Err(bad(format!(
            "{what} {ip}/{}: the prefix is longer than {max}",
            n.prefix_len
        )));
    }
    Ok((ip, n.prefix_len as u8))
}

/// Whether `name` can name a link: 1-15 bytes, no `/`, `:`, whitespace or
/// NUL, not `.`/`..`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

fn iface_plan(i: &NetInterface, n: usize) -> Result<IfacePlan, NetworkError> {
    let mac = <[u8; 6]>::try_from(i.mac.as_slice())
        .map_err(|_| bad(format!("interface {n}: the MAC is {} bytes", i.mac.len())))?;
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(bad(format!(
            "interface {n}: {} is not a unicast MAC",
            mac_text(&mac)
        )));
    }
    if !valid_name(&i.name) || i.name == "lo" {
        return Err(bad(format!(
            "interface {n}: {:?} cannot name an interface",
            i.name.chars().take(32).collect::<String>()
        )));
    }
    if !(68..=65535).contains(&i.mtu) {
        return Err(bad(format!(
            "{}: MTU {} is outside 68-65535",
            i.name, i.mtu
        )));
    }
    if i.addresses.len() > MAX_ADDRESSES {
        return Err(bad(format!(
            "{}: {} addresses, more than {MAX_ADDRESSES}",
            i.name,
            i.addresses.len()
        )));
    }
    let mut addresses = Vec::new();
    for a in &i.addresses {
        let (ip, len) = net_of(a, &format!("an address of {}", i.name))?;
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
            return Err(bad(format!("{}: {ip} cannot be an address", i.name)));
        }
        if let IpAddr::V4(v4) = ip {
            if v4.is_broadcast() {
                return Err(bad(format!("{}: {ip} cannot be an address", i.name)));
            }
        }
        if addresses.contains(&(ip, len)) {
            return Err(bad(format!("{}: {ip}/{len} given twice", i.name)));
        }
        addresses.push((ip, len));
    }
    Ok(IfacePlan {
        mac,
        name: i.name.clone(),
        mtu: i.mtu,
        addresses,
    })
}

fn route_plan(r: &NetRoute, ifaces: &[IfacePlan]) -> Result<RoutePlan, NetworkError> {
    let dest = r
        .destination
        .as_ref()
        .ok_or_else(|| bad("a route has no destination"))?;
    let (destination, prefix_len) = net_of(dest, "a route's destination")?;
    let what = format!("route {destination}/{prefix_len}");
    let gateway = if r.gateway.is_empty() {
        None
    } else {
        let g = ip_of(&r.gateway, &format!("the gateway of {what}"))?;
        if g.is_ipv4() != destination.is_ipv4() {
            return Err(bad(format!("{what}: gateway {g} is of another family")));
        }
        if g.is_unspecified() || g.is_multicast() || g.is_loopback() {
            return Err(bad(format!("{what}: {g} cannot be a gateway")));
        }
        Some(g)
    };
    let device = ifaces
        .iter()
        .position(|i| i.name == r.device)
        .ok_or_else(|| {
            bad(format!(
                "{what}: device {:?} is not an interface of the pod",
                r.device.chars().take(32).collect::<String>()
            ))
        })?;
    let scope = match r.scope {
        0 | 200 | 253 => r.scope as u8,
        s => {
            return Err(bad(format!(
                "{what}: scope {s} is not universe, site or link"
            )))
        }
    };
    Ok(RoutePlan {
        destination,
        prefix_len,
        gateway,
        device,
        scope,
        metric: r.metric,
    })
}

/// Checks the network fields of `req`.
pub fn plan(req: &CreateSandboxRequest) -> Result<Plan, NetworkError> {
    if req.interfaces.len() > MAX_INTERFACES {
        return Err(bad(format!(
            "{} interfaces, more than {MAX_INTERFACES}",
            req.interfaces.len()
        )));
    }
    if req.routes.len() > MAX_ROUTES {
        return Err(bad(format!(
            "{} routes, more than {MAX_ROUTES}",
            req.routes.len()
        )));
    }
    let mut interfaces: Vec<IfacePlan> = Vec::new();
    for (n, i) in req.interfaces.iter().enumerate() {
        let p = iface_plan(i, n)?;
        if interfaces.iter().any(|o| o.mac == p.mac) {
            return Err(bad(format!("MAC {} given twice", mac_text(&p.mac))));
        }
        if interfaces.iter().any(|o| o.name == p.name) {
            return Err(bad(format!("interface name {} given twice", p.name)));
        }
        interfaces.push(p);
    }
    let mut routes = req
        .routes
        .iter()
        .map(|r| route_plan(r, &interfaces))
        .collect::<Result<Vec<_>, _>>()?;
    // Link scope (on-link) routes first, gateways' routes after.
    routes.sort_by_key(|r| std::cmp::Reverse(r.scope));
    Ok(Plan { interfaces, routes })
}

fn mac_of(m: &LinkMessage) -> Option<[u8; 6]> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(a) => <[u8; 6]>::try_from(a.as_slice()).ok(),
        _ => None,
    })
}

async fn links(h: &Handle) -> Result<Vec<LinkMessage>, NetworkError> {
    h.link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list links"))
}

async fn set(h: &Handle, what: String, m: LinkMessage) -> Result<(), NetworkError> {
    h.link().set(m).execute().await.map_err(nl(what))
}

/// The index of the NIC of each interface of `plan`, waiting a little for
/// NICs the kernel has not probed yet.
async fn find_nics(h: &Handle, plan: &Plan) -> Result<Vec<u32>, NetworkError> {
    let deadline = Instant::now() + NIC_WAIT;
    loop {
        let all = links(h).await?;
        let found: Vec<Option<u32>> = plan
            .interfaces
            .iter()
            .map(|i| {
                all.iter()
                    .find(|l| mac_of(l) == Some(i.mac))
                    .map(|l| l.header.index)
            })
            .collect();
        if let Some(missing) = found.iter().position(Option::is_none) {
            if Instant::now() > deadline {
                let i = &plan.interfaces[missing];
                return Err(NetworkError::NoNic {
                    mac: mac_text(&i.mac),
                    name: i.name.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        return Ok(found.into_iter().flatten().collect());
    }
}

fn route_message(r: &RoutePlan, oif: u32) -> rtnetlink::packet_route::route::RouteMessage {
    let scope = RouteScope::from(r.scope);
    match (r.destination, r.gateway) {
        (IpAddr::V4(d), g) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d, r.prefix_len)
                .output_interface(oif)
                .scope(scope)
                .priority(r.metric);
            if let Some(IpAddr::V4(g)) = g {
                b = b.gateway(g);
            }
            b.build()
        }
        (IpAddr::V6(d), g) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d, r.prefix_len)
                .output_interface(oif)
                .scope(scope)
                .priority(r.metric);
            if let Some(IpAddr::V6(g)) = g {
                b = b.gateway(g);
            }
            b.build()
        }
    }
}

/// Brings `lo` up, then configures `plan`'s interfaces and routes.
pub async fn apply(plan: &Plan) -> Result<(), NetworkError> {
    let (conn, h, _) = rtnetlink::new_connection().map_err(NetworkError::Socket)?;
    let conn = tokio::spawn(conn);
    let r = apply_with(&h, plan).await;
    conn.abort();
    r
}

async fn apply_with(h: &Handle, plan: &Plan) -> Result<(), NetworkError> {
    // The kernel gives lo 127.0.0.1/8 and ::1 when it comes up.
    set(
        h,
        "bring lo up".into(),
        LinkUnspec::new_with_name("lo").up().build(),
    )
    .await?;
    if plan.interfaces.is_empty() {
        return Ok(());
    }
    let nics = find_nics(h, plan).await?;
    // Down and to a name of its own first, so renames cannot collide (the
    // kernel's eth1 may be the one to become eth0).
    for (n, idx) in nics.iter().enumerate() {
        set(
            h,
            format!("prepare NIC {idx}"),
            LinkUnspec::new_with_index(*idx)
                .down()
                .name(format!("veilnic{n}"))
                .build(),
        )
        .await?;
    }
    for (i, idx) in plan.interfaces.iter().zip(&nics) {
        set(
            h,
            format!("name NIC {} {} (MTU {})", mac_text(&i.mac), i.name, i.mtu),
            LinkUnspec::new_with_index(*idx)
                .name(i.name.clone())
                .mtu(i.mtu)
                .build(),
        )
        .await?;
        for (ip, len) in &i.addresses {
            let mut add = h.address().add(*idx, *ip, *len);
            if ip.is_ipv6() {
                // The host's namespace already owns it; a VM NIC waiting
                // for duplicate detection would delay the pod.
                add.message_mut().header.flags = AddressHeaderFlags::Nodad;
            }
            add.execute()
                .await
                .map_err(nl(format!("add {ip}/{len} to {}", i.name)))?;
        }
        // A gratuitous ARP when it comes up: peers that cached the MAC of
        // the address's previous owner (a released pod IP) learn this one.
        // The kernel's (arp_notify) is lost when carrier comes after the
        // link is up; the agent's own follows once it has carrier.
        let path = format!("/proc/sys/net/ipv4/conf/{}/arp_notify", i.name);
        std::fs::write(&path, "1").map_err(|source| NetworkError::Sysctl { path, source })?;
        set(
            h,
            format!("bring {} up", i.name),
            LinkUnspec::new_with_index(*idx).up().build(),
        )
        .await?;
        let v4 = i
            .addresses
            .iter()
            .filter_map(|(ip, _)| match ip {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
            .collect();
        crate::garp::announce(i.name.clone(), *idx, i.mac, v4);
    }
    for r in &plan.routes {
        let dev = &plan.interfaces[r.device];
        h.route()
            .add(route_message(r, nics[r.device]))
            .execute()
            .await
            .map_err(nl(format!(
                "add route {}/{}{} dev {}",
                r.destination,
                r.prefix_len,
                r.gateway.map(|g| format!(" via {g}")).unwrap_or_default(),
                dev.name
            )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(ip: &str, len: u32) -> IpNet {
        let ip: IpAddr = ip.parse().unwrap();
        let mut n = IpNet::new();
        n.ip = match ip {
            IpAddr::V4(v) => v.octets().to_vec(),
            IpAddr::V6(v) => v.octets().to_vec(),
        };
        n.prefix_len = len;
        n
    }

    fn req() -> CreateSandboxRequest {
        let mut r = CreateSandboxRequest::new();
        let mut i = NetInterface::new();
        i.mac = vec![0x0a, 0x58, 10, 88, 0, 2];
        i.name = "eth0".into();
        i.mtu = 1500;
        i.addresses = vec![net("10.88.0.2", 16), net("fd00::2", 64)];
        r.interfaces.push(i);
        let mut d = NetRoute::new();
        d.destination = protobuf::MessageField::some(net("0.0.0.0", 0));
        d.gateway = vec![10, 88, 0, 1];
        d.device = "eth0".into();
        r.routes.push(d);
        let mut l = NetRoute::new();
        l.destination = protobuf::MessageField::some(net("10.99.0.0", 24));
        l.device = "eth0".into();
        l.scope = 253;
        r.routes.push(l);
        r
    }

    #[test]
    fn a_cni_network_is_planned_with_on_link_routes_first() {
        let p = plan(&req()).unwrap();
        assert_eq!(p.interfaces[0].name, "eth0");
        assert_eq!(p.interfaces[0].addresses.len(), 2);
        assert_eq!(p.routes[0].scope, 253);
        assert_eq!(p.routes[1].gateway, Some("10.88.0.1".parse().unwrap()));
        assert_eq!(plan(&CreateSandboxRequest::new()).unwrap(), Plan::default());
    }

    #[test]
    fn what_the_host_must_not_send_is_refused() {
        let refused = |f: &dyn Fn(&mut CreateSandboxRequest)| {
            let mut r = req();
            f(&mut r);
            assert!(plan(&r).is_err());
        };
        refused(&|r| r.interfaces[0].mac = vec![1, 2, 3, 4, 5, 6]); // multicast
        refused(&|r| r.interfaces[0].mac = vec![0; 6]);
        refused(&|r| r.interfaces[0].mac = vec![2; 5]);
        refused(&|r| r.interfaces[0].name = "lo".into());
        refused(&|r| r.interfaces[0].name = "a/b".into());
        refused(&|r| r.interfaces[0].name = "sixteen-bytes-xx".into());
        refused(&|r| r.interfaces[0].mtu = 67);
        refused(&|r| r.interfaces[0].mtu = 65536);
        refused(&|r| r.interfaces[0].addresses[0].prefix_len = 33);
        refused(&|r| r.interfaces[0].addresses[1].prefix_len = 129);
        refused(&|r| r.interfaces[0].addresses[0].ip = vec![1, 2, 3]);
        refused(&|r| r.interfaces[0].addresses[0] = net("224.0.0.1", 4));
        refused(&|r| r.interfaces[0].addresses[0] = net("127.0.0.1", 8));
        refused(&|r| r.interfaces[0].addresses[0] = net("0.0.0.0", 0));
        refused(&|r| {
            let a = r.interfaces[0].addresses[0].clone();
            r.interfaces[0].addresses.push(a);
        });
        refused(&|r| {
            r.interfaces[0].addresses = (0..17).map(|n| net(&format!("10.0.0.{n}"), 24)).collect()
        });
        refused(&|r| {
            let mut dup = r.interfaces[0].clone();
            dup.name = "eth1".into();
            r.interfaces.push(dup);
        });
        refused(&|r| {
            let mut dup = r.interfaces[0].clone();
            dup.mac[5] = 9;
            r.interfaces.push(dup);
        });
        refused(&|r| {
            r.interfaces = (0..9)
                .map(|n| {
                    let mut i = r.interfaces[0].clone();
                    i.mac[5] = n;
                    i.name = format!("eth{n}");
                    i
                })
                .collect()
        });
        refused(&|r| r.routes[0].device = "eth9".into());
        refused(&|r| r.routes[0].gateway = b"\xfd\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x01".to_vec());
        refused(&|r| r.routes[0].scope = 254);
        refused(&|r| r.routes[0].destination = protobuf::MessageField::none());
        refused(&|r| r.routes = (0..65).map(|_| r.routes[0].clone()).collect());
    }
}
