//! The pod network on the host side: the pod's network namespace (the one
//! containerd's CRI plugin made and CNI filled), each CNI interface paired
//! with a tap through tc ingress filters and mirred redirects (the model Kata
//! calls "tcfilter": it works whatever CNI plugin made the interface), the
//! taps handed to QEMU, and what the guest must configure (MAC, MTU,
//! addresses, routes) read through netlink.
//!
//! This module owns the taps and the tc qdiscs it adds; it does not own the
//! namespace or the CNI interfaces (containerd and CNI create and remove
//! them), nor the guest side (the agent configures the guest's NICs from
//! [`PodNetwork::interfaces`] and [`PodNetwork::routes`]).

pub mod forward;
pub mod tap;

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use futures_util::stream::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
        AddressFamily,
    },
    Handle, LinkUnspec, RouteMessageBuilder,
};
use veil_common::{Classify, Kind};

/// Most CNI interfaces a pod may have.
pub const MAX_INTERFACES: usize = 8;
/// Most routes handed to the guest (the agent takes no more).
pub const MAX_ROUTES: usize = 64;
/// Most addresses of one interface handed to the guest.
pub const MAX_ADDRESSES: usize = 16;

/// `ETH_P_ALL`, the protocol of the redirect filters (network byte order,
/// as tc wants it).
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();

/// Errors setting up or tearing down the pod network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The pod's network namespace cannot be entered.
    #[error("cannot enter the pod's network namespace {path}")]
    Enter {
        /// Its path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
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
    /// A tap could not be created.
    #[error("cannot create tap {name} (is /dev/net/tun there?)")]
    Tap {
        /// Its name.
        name: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The namespace holds something veil cannot hand to a VM.
    #[error("{0}")]
    Unsupported(String),
    /// The worker thread died.
    #[error("the network set-up thread failed")]
    Thread,
}

impl Classify for NetworkError {
    fn kind(&self) -> Kind {
        match self {
            NetworkError::Enter { .. } | NetworkError::Tap { .. } => Kind::FailedPrecondition,
            NetworkError::Unsupported(_) => Kind::FailedPrecondition,
            NetworkError::Netlink { .. } | NetworkError::Thread => Kind::Internal,
        }
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_net(ip: IpAddr, prefix_len: u8) -> veil_protocol::agent::IpNet {
    let mut n = veil_protocol::agent::IpNet::new();
    n.ip = ip_bytes(ip);
    n.prefix_len = u32::from(prefix_len);
    n
}

/// A CNI interface as the guest must see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Its name in the pod namespace.
    pub name: String,
    /// Its index there.
    pub index: u32,
    /// MAC address (the guest NIC gets the same).
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u32,
    /// Global-scope addresses and their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
}

impl Interface {
    /// The MAC in `aa:bb:cc:dd:ee:ff` form.
    pub fn mac_text(&self) -> String {
        mac_text(&self.mac)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A route of the pod namespace's main table through a CNI interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub destination: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// Next hop; `None` for an on-link route.
    pub gateway: Option<IpAddr>,
    /// Index of the interface it leaves by.
    pub oif: u32,
    /// Metric.
    pub metric: u32,
    /// Scope (`RT_SCOPE_*`).
    pub scope: u8,
}

/// A CNI interface paired with its tap.
#[derive(Debug)]
pub struct TapLink {
    /// The interface.
    pub iface: Interface,
    /// The tap's name in the pod namespace.
    pub tap_name: String,
    /// The tap, until QEMU holds it ([`PodNetwork::release_taps`]).
    pub tap: Option<OwnedFd>,
}

/// The pod's network on the host: taps wired to the CNI interfaces. Torn
/// down with [`PodNetwork::teardown`] (also on drop).
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    /// The interfaces and their taps, in name order.
    pub links: Vec<TapLink>,
    /// The routes through those interfaces.
    pub routes: Vec<Route>,
    /// The CRI PortForward relay, once started.
    forward: Option<forward::PortForward>,
    torn_down: bool,
}

/// Runs `f` on a thread of its own inside the network namespace at `netns`
/// (a thread, so no other task of the shim ever runs in it), with a
/// current-thread runtime and a netlink connection made there.
async fn in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetworkError>>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let path = netns.to_path_buf();
    std::thread::Builder::new()
        .name("veil-netns".into())
        .spawn(move || {
            let _ = tx.send(run_in_netns(&path, f));
        })
        .map_err(|_| NetworkError::Thread)?;
    rx.await.map_err(|_| NetworkError::Thread)?
}

fn run_in_netns<T, F, Fut>(path: &Path, f: F) -> Result<T, NetworkError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, NetworkError>>,
{
    let enter = |source| NetworkError::Enter {
        path: path.to_path_buf(),
        source,
    };
    let ns = File::open(path).map_err(enter)?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| enter(std::io::Error::from(e)))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(enter)?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(enter)?;
        let conn = tokio::spawn(conn);
        let r = f(handle).await;
        conn.abort();
        r
    })
}

/// The CNI interfaces: Ethernet links that are up, except loopback.
fn cni_interface(m: &LinkMessage) -> Option<(u32, String, [u8; 6], u32)> {
    if m.header.link_layer_type != LinkLayerType::Ether
        || !m.header.flags.contains(LinkFlags::Up)
        || m.header.flags.contains(LinkFlags::Loopback)
    {
        return None;
    }
    let mut name = None;
    let mut mac = None;
    let mut mtu = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            _ => {}
        }
    }
    Some((m.header.index, name?, mac?, mtu?))
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The routes of the main table the guest must have: unicast, not the ones
/// the kernel derives from addresses (the guest's kernel derives them too).
fn wanted_route(m: &RouteMessage) -> Option<Route> {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    if table != u32::from(rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN)
        || m.header.kind != RouteType::Unicast
        || m.header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let mut destination = None;
    let mut gateway = None;
    let mut oif = None;
    let mut metric = 0;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => destination = route_ip(d),
            RouteAttribute::Gateway(g) => gateway = route_ip(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    let destination = destination.unwrap_or(match m.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    Some(Route {
        destination,
        prefix_len: m.header.destination_prefix_length,
        gateway,
        oif: oif?,
        metric,
        scope: u8::from(m.header.scope),
    })
}

async fn read_interfaces(h: &Handle) -> Result<Vec<Interface>, NetworkError> {
    let links: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list links"))?;
    let mut out = Vec::new();
    for (index, name, mac, mtu) in links.iter().filter_map(cni_interface) {
        let addrs: Vec<_> = h
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl(format!("list the addresses of {name}")))?;
        let addresses: Vec<(IpAddr, u8)> = addrs
            .iter()
            .filter(|a| a.header.index == index)
            .filter_map(|a| {
                a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Address(ip) => Some((*ip, a.header.prefix_len)),
                    _ => None,
                })
            })
            // The guest makes its own link-local address from the same MAC.
            .filter(|(ip, _)| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .collect();
        if addresses.len() > MAX_ADDRESSES {
            return Err(NetworkError::Unsupported(format!(
                "{name} has {} addresses; veil pods take at most {MAX_ADDRESSES}",
                addresses.len()
            )));
        }
        out.push(Interface {
            name,
            index,
            mac,
            mtu,
            addresses,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    if out.len() > MAX_INTERFACES {
        return Err(NetworkError::Unsupported(format!(
            "the pod's network namespace has {} interfaces; veil pods take at most {MAX_INTERFACES}",
            out.len()
        )));
    }
    Ok(out)
}

async fn read_routes(h: &Handle, ifaces: &[Interface]) -> Result<Vec<Route>, NetworkError> {
    let mut routes = Vec::new();
    for msg in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let all: Vec<RouteMessage> = h
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(nl("list routes"))?;
        routes.extend(
            all.iter()
                .filter_map(wanted_route)
                .filter(|r| ifaces.iter().any(|i| i.index == r.oif)),
        );
    }
    if routes.len() > MAX_ROUTES {
        return Err(NetworkError::Unsupported(format!(
            "the pod's network namespace has {} routes; veil pods take at most {MAX_ROUTES}",
            routes.len()
        )));
    }
    Ok(routes)
}

async fn link_index(h: &Handle, name: &str) -> Result<u32, NetworkError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await.map_err(nl(format!("find {name}")))? {
        Some(m) => Ok(m.header.index),
        None => Err(NetworkError::Unsupported(format!("{name} vanished"))),
    }
}

/// Redirects every frame arriving on `from` out of `to`: an ingress qdisc on
/// `from` and a match-all u32 filter with a mirred egress redirect.
async fn redirect(h: &Handle, from: u32, to: u32) -> Result<(), NetworkError> {
    h.qdisc()
        .add(from as i32)
        .ingress()
        .execute()
        .await
        .map_err(nl(format!("ingress qdisc on link {from}")))?;
    h.traffic_filter(from as i32)
        .add()
        .ingress()
        // priority() also overwrites the protocol half of the header
        // (rtnetlink 0.24): set it first.
        .priority(1)
        .protocol(ETH_P_ALL_BE)
        .redirect(to)
        .map_err(nl("build redirect"))?
        .execute()
        .await
        .map_err(nl(format!("redirect filter {from} -> {to}")))
}

async fn remove_ingress(h: &Handle, index: u32) -> Result<(), NetworkError> {
    let mut del = h.qdisc().del(index as i32);
    del.message_mut().header.parent = rtnetlink::packet_route::tc::TcHandle::INGRESS;
    del.message_mut().header.handle = rtnetlink::packet_route::tc::TcHandle {
        major: 0xffff,
        minor: 0,
    };
    del.execute()
        .await
        .map_err(nl(format!("remove ingress qdisc of link {index}")))
}

async fn remove_link(h: &Handle, name: &str) -> Result<(), NetworkError> {
    let index = link_index(h, name).await?;
    h.link()
        .del(index)
        .execute()
        .await
        .map_err(nl(format!("remove {name}")))
}

async fn wire(h: &Handle, ifaces: Vec<Interface>) -> Result<Vec<TapLink>, NetworkError> {
    let mut links: Vec<TapLink> = Vec::new();
    let mut wired: Vec<u32> = Vec::new();
    let result: Result<(), NetworkError> = async {
        for (i, iface) in ifaces.into_iter().enumerate() {
            let tap_name = format!("vtap{i}");
            let fd = tap::open(&tap_name).map_err(|source| NetworkError::Tap {
                name: tap_name.clone(),
                source,
            })?;
            let tap_index = link_index(h, &tap_name).await?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(tap_index)
                        .mtu(iface.mtu)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("bring {tap_name} up")))?;
            let index = iface.index;
            links.push(TapLink {
                iface,
                tap_name,
                tap: Some(fd),
            });
            wired.push(index);
            redirect(h, index, tap_index).await?;
            redirect(h, tap_index, index).await?;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(links),
        Err(e) => {
            for index in wired {
                let _ = remove_ingress(h, index).await;
            }
            Err(e)
        }
    }
}

impl PodNetwork {
    /// Pairs each CNI interface of the namespace at `netns` with a tap and
    /// reads what the guest must configure. A namespace with no CNI
    /// interface gives an empty network (loopback only).
    pub async fn setup(netns: &Path) -> Result<PodNetwork, NetworkError> {
        let (links, routes) = in_netns(netns, |h| async move {
            let ifaces = read_interfaces(&h).await?;
            let routes = read_routes(&h, &ifaces).await?;
            let links = wire(&h, ifaces).await?;
            Ok((links, routes))
        })
        .await?;
        Ok(PodNetwork {
            netns: netns.to_path_buf(),
            links,
            routes,
            forward: None,
            torn_down: false,
        })
    }

    /// Starts relaying the localhost connections of the pod's namespace
    /// (CRI PortForward) to the guest reached through `transport`.
    pub async fn start_port_forward(
        &mut self,
        transport: veil_protocol::vsock::GuestTransport,
    ) -> Result<(), NetworkError> {
        let f = forward::PortForward::start(&self.netns, transport).await?;
        self.forward = Some(f);
        Ok(())
    }

    /// The interfaces the guest configures.
    pub fn interfaces(&self) -> impl Iterator<Item = &Interface> {
        self.links.iter().map(|l| &l.iface)
    }

    /// What the agent configures, as CreateSandbox fields: the interfaces
    /// (by MAC) and the routes (by interface name).
    pub fn guest_config(
        &self,
    ) -> (
        Vec<veil_protocol::agent::NetInterface>,
        Vec<veil_protocol::agent::NetRoute>,
    ) {
        use veil_protocol::agent::{NetInterface, NetRoute};
        let ifaces = self
            .interfaces()
            .map(|i| {
                let mut n = NetInterface::new();
                n.mac = i.mac.to_vec();
                n.name = i.name.clone();
                n.mtu = i.mtu;
                n.addresses = i.addresses.iter().map(|(ip, p)| ip_net(*ip, *p)).collect();
                n
            })
            .collect();
        let routes = self
            .routes
            .iter()
            .filter_map(|r| {
                let dev = self.interfaces().find(|i| i.index == r.oif)?;
                let mut n = NetRoute::new();
                n.destination = protobuf::MessageField::some(ip_net(r.destination, r.prefix_len));
                n.gateway = r.gateway.map(ip_bytes).unwrap_or_default();
                n.device = dev.name.clone();
                n.scope = u32::from(r.scope);
                n.metric = r.metric;
                Some(n)
            })
            .collect();
        (ifaces, routes)
    }

    /// The VM's virtio-net devices: one per tap still held, with the CNI
    /// interface's MAC and MTU; kernel vhost-net where `/dev/vhost-net`
    /// exists. Call before [`PodNetwork::release_taps`].
    pub fn nics(&self) -> Vec<crate::vmm::Nic> {
        let vhost = Path::new("/dev/vhost-net").exists();
        self.links
            .iter()
            .filter_map(|l| {
                Some(crate::vmm::Nic {
                    tap_fd: std::os::fd::AsRawFd::as_raw_fd(l.tap.as_ref()?),
                    mac: l.iface.mac_text(),
                    mtu: l.iface.mtu,
                    vhost,
                })
            })
            .collect()
    }

    /// Closes the shim's tap descriptors once QEMU holds its own: from then
    /// on a tap lives exactly as long as the VM.
    pub fn release_taps(&mut self) {
        for l in &mut self.links {
            l.tap = None;
        }
    }

    /// Removes the redirects (the ingress qdiscs of the CNI interfaces, and
    /// with them their filters) and closes the taps. Idempotent; best
    /// effort: a namespace already gone has nothing left to remove.
    pub fn teardown(&mut self) {
        if std::mem::replace(&mut self.torn_down, true) {
            return;
        }
        self.release_taps();
        let indexes: Vec<u32> = self.links.iter().map(|l| l.iface.index).collect();
        let taps: Vec<String> = self.links.iter().map(|l| l.tap_name.clone()).collect();
        let forward_port = self.forward.take().map(|f| {
            f.stop();
            f.port
        });
        if (indexes.is_empty() && forward_port.is_none()) || !self.netns.exists() {
            return;
        }
        let path = self.netns.clone();
        let joined = std::thread::Builder::new()
            .name("veil-netns".into())
            .spawn(move || {
                run_in_netns(&path, |h| async move {
                    for i in indexes {
                        if let Err(e) = remove_ingress(&h, i).await {
                            tracing::debug!(error = %veil_common::error_chain(&e), "pod network teardown");
                        }
                    }
                    if let Some(p) = forward_port {
                        if let Err(e) = forward::remove_rule(p) {
                            tracing::debug!(error = %veil_common::error_chain(&e), "pod network teardown");
                        }
                    }
                    // The taps go now even while QEMU still holds them (it
                    // is stopped later, after containerd's CNI DEL).
                    for t in taps {
                        if let Err(e) = remove_link(&h, &t).await {
                            tracing::debug!(error = %veil_common::error_chain(&e), "pod network teardown");
                        }
                    }
                    Ok(())
                })
            })
            .map(|t| t.join());
        if let Ok(Ok(Err(e))) = joined {
            tracing::debug!(error = %veil_common::error_chain(&e), "pod network teardown");
        }
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_in_text() {
        assert_eq!(
            mac_text(&[0x0a, 0x58, 0, 1, 0xfe, 0x10]),
            "0a:58:00:01:fe:10"
        );
    }

    #[test]
    fn kernel_and_local_routes_are_left_to_the_guest() {
        let mut m = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::new(10, 0, 0, 0), 24)
            .output_interface(3)
            .build();
        m.header.protocol = RouteProtocol::Boot;
        let r = wanted_route(&m).unwrap();
        assert_eq!(r.oif, 3);
        assert_eq!(r.prefix_len, 24);
        assert_eq!(r.gateway, None);
        m.header.protocol = RouteProtocol::Kernel;
        assert!(wanted_route(&m).is_none());
        m.header.protocol = RouteProtocol::Boot;
        m.header.kind = RouteType::Local;
        assert!(wanted_route(&m).is_none());
    }

    #[test]
    fn default_route_via_gateway() {
        let mut m = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(Ipv4Addr::new(10, 0, 0, 1))
            .output_interface(2)
            .build();
        m.header.protocol = RouteProtocol::Boot;
        let r = wanted_route(&m).unwrap();
        assert_eq!(r.destination, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(r.prefix_len, 0);
        assert_eq!(r.gateway, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
    }
}
