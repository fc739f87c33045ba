//! Pod networking end to end (issue 11): a private containerd with the CRI
//! plugin runs inside a network namespace the test creates
//! ([`veil_tests::podnet`]: Debian's `bridge` + `host-local` and `portmap`
//! plugins on a private subnet), so every packet stays in that namespace.
//! veil pods get their CNI interface inside the VM: a busybox `httpd` in a
//! veil pod answers at the IP PodSandboxStatus reports, from the test
//! namespace, from a second veil pod and from a runc pod (and reaches them);
//! `ip addr` / `ip route` in the container show the CNI address, MTU and
//! default route; `/etc/resolv.conf` is the pod's CRI DNS config; two
//! containers of the pod talk over localhost. CRI PortForward works as
//! kubectl uses it: the test calls `PortForward` and speaks the streaming
//! server's WebSocket protocol to the URL it returns, and an HTTP GET through
//! it returns the veil pod's page (and a runc pod's), ending promptly when
//! the server closes; so does a plain connection to localhost:8080 inside
//! the pod's namespace (what containerd makes). Removing the pod leaves no
//! tap, redirect, iptables rule or process, and CNI releases the address:
//! the next pod gets it back.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::PortForwardRequest;
use tungstenite::{client::IntoClientRequest, http::HeaderValue, Message};
use veil_tests::{
    containerd,
    podnet::{
        fd_path, http_get, in_netns, run_in, web, web_addr, PodNet, DNS_SEARCH, DNS_SERVER, MTU,
        NET_NAME, READ_TIMEOUT, SUBNET, WEB_PORT,
    },
};

/// How soon a client reading a response to its end must see the end once
/// the server has closed (busybox httpd closes right after the response).
const EOF_WITHIN: Duration = Duration::from_secs(4);

/// The WebSocket subprotocol of the streaming server's port-forward: binary
/// messages whose first byte is the channel (data `2*i`, error `2*i+1` for
/// the i-th port of the `port` query).
const PORT_FORWARD_PROTOCOL: &str = "v4.channel.k8s.io";

/// A small web server.
fn small_web(name: &str, text: &str) -> k8s_cri::v1::ContainerConfig {
    web(name, text, 1)
}

/// One HTTP/1.0 GET of `/` through CRI PortForward of `pod`'s
/// [`WEB_PORT`], as kubectl does it: the `PortForward` call, then the
/// streaming server's WebSocket protocol (from a thread in the test
/// namespace, where containerd's streaming server listens on loopback). The
/// response and the time from the request to the end of the stream.
async fn port_forward_get(n: &mut PodNet, pod: &str) -> Result<(String, Duration)> {
    let url = n
        .cri
        .port_forward(PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![i32::from(WEB_PORT)],
        })
        .await
        .context("CRI PortForward")?
        .into_inner()
        .url;
    in_netns(&n.ns.path(), move || {
        ws_get(&url).with_context(|| format!("port-forward through {url}"))
    })
}

/// Whether a WebSocket read error is the connection's end.
fn is_close(e: &tungstenite::Error) -> bool {
    matches!(
        e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed
    )
}

/// The port-forward client side of [`port_forward_get`] on streaming URL
/// `url` (`http://127.0.0.1:PORT/portforward/TOKEN`).
fn ws_get(url: &str) -> Result<(String, Duration)> {
    let rest = url
        .strip_prefix("http://")
        .context("the streaming URL is not plain http")?;
    let (host, path) = rest.split_once('/').context("no path in the URL")?;
    let addr: SocketAddr = host.parse().context("the URL's host is not an address")?;
    ensure!(
        addr.ip().is_loopback(),
        "containerd's streaming server is not on loopback"
    );
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut req = format!("ws://{host}/{path}?port={WEB_PORT}").into_client_request()?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(PORT_FORWARD_PROTOCOL),
    );
    let (mut ws, resp) = tungstenite::client(req, tcp).context("WebSocket upgrade")?;
    let proto = resp.headers().get("Sec-WebSocket-Protocol");
    ensure!(
        proto.and_then(|p| p.to_str().ok()) == Some(PORT_FORWARD_PROTOCOL),
        "the server chose subprotocol {proto:?}"
    );
    // The server first names the port, 2 bytes little endian, on the data
    // channel (0) and on the error channel (1).
    let mut named = [false; 2];
    while named != [true; 2] {
        let m = ws.read().context("reading the port announcements")?;
        let b = m.into_data();
        if b.is_empty() {
            continue;
        }
        let ch = usize::from(b[0]);
        ensure!(
            ch < 2 && !named[ch] && b[1..] == WEB_PORT.to_le_bytes(),
            "expected the port on channel 0 and 1, got {:?}",
            &b[..]
        );
        named[ch] = true;
    }
    let mut msg = vec![0u8];
    msg.extend_from_slice(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n");
    ws.send(Message::binary(msg))?;
    let sent = Instant::now();
    let (mut data, mut error) = (Vec::new(), Vec::new());
    loop {
        match ws.read() {
            Ok(Message::Binary(b)) if !b.is_empty() => match b[0] {
                0 => data.extend_from_slice(&b[1..]),
                1 => error.extend_from_slice(&b[1..]),
                c => bail!("message on unknown channel {c}"),
            },
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(e) if is_close(&e) => break,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "no end of the stream after {} bytes ({:?} in)",
                        data.len(),
                        sent.elapsed()
                    )
                })
            }
        }
    }
    let took = sent.elapsed();
    ensure!(
        error.is_empty(),
        "the error channel said: {}",
        String::from_utf8_lossy(&error)
    );
    Ok((String::from_utf8_lossy(&data).into_owned(), took))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veil_pods_are_on_the_cni_network() -> Result<()> {
    // Three addresses, so a released one is the next one given.
    let mut net = PodNet::start("net", 12).await?;
    let started = Instant::now();
    let result = scenario(&mut net).await;
    eprintln!("scenario took {:?}", started.elapsed());
    net.finish(result).await
}

/// A CRI PortForward GET of `pod` returns `want`, ending within
/// [`EOF_WITHIN`].
async fn check_port_forward(n: &mut PodNet, what: &str, pod: &str, want: &str) -> Result<()> {
    let (body, took) = port_forward_get(n, pod).await?;
    ensure!(
        body.starts_with("HTTP/1.") && body.contains(want),
        "CRI PortForward to the {what} pod {pod}: {body:?}"
    );
    ensure!(
        took < EOF_WITHIN,
        "CRI PortForward to the {what} pod {pod}: the stream ended {took:?} after the request"
    );
    eprintln!("CRI PortForward to the {what} pod: page and end of stream in {took:?}");
    Ok(())
}

async fn scenario(n: &mut PodNet) -> Result<Vec<String>> {
    let t0 = Instant::now();
    let (server, ids) = n
        .pod(
            "veil",
            "web",
            vec![
                small_web("web", "hello-from-veil"),
                veil_tests::cri::busybox_container("side", &["sleep", "3600"]),
            ],
        )
        .await?;
    eprintln!("veil pod with 2 containers up in {:?}", t0.elapsed());
    let (web_c, side_c) = (ids[0].clone(), ids[1].clone());
    let ip = n.ip(&server).await?;

    // httpd listens.
    n.exec_until(&web_c, "netstat -ltn", ":8080").await?;
    // Two containers of the pod over localhost.
    // (By IPv4 address, wget without -T: Debian's static busybox wget
    // crashes resolving names, on IPv6 literals and with -T.)
    n.exec_until(
        &side_c,
        "wget -q -O - http://127.0.0.1:8080/",
        "hello-from-veil",
    )
    .await?;
    // From the test namespace, at the pod's IP.
    n.get_from_ns(&ip, "hello-from-veil").await?;
    // What the container sees of its network and DNS.
    let addr = n
        .exec_until(&web_c, "ip addr show eth0", &format!("inet {ip}/24"))
        .await?;
    ensure!(addr.contains(&format!("mtu {MTU}")), "ip addr: {addr}");
    let lo = n.exec_until(&web_c, "ip addr show lo", "127.0.0.1").await?;
    ensure!(lo.contains("UP"), "lo is not up: {lo}");
    n.exec_until(
        &web_c,
        "ip route",
        &format!("default via {SUBNET}.1 dev eth0"),
    )
    .await?;
    let resolv = n
        .exec_until(&web_c, "cat /etc/resolv.conf", DNS_SERVER)
        .await?;
    ensure!(
        resolv.contains(&format!("nameserver {DNS_SERVER}"))
            && resolv.contains(&format!("search {DNS_SEARCH}"))
            && resolv.contains("ndots:5"),
        "resolv.conf: {resolv}"
    );

    // A second veil pod and a runc pod reach it, and it reaches them.
    let (peer, peer_ids) = n
        .pod("veil", "peer", vec![small_web("web", "hello-from-peer")])
        .await?;
    let peer_ip = n.ip(&peer).await?;
    let (runc, runc_ids) = n
        .pod(
            "runc",
            "baseline",
            vec![small_web("web", "hello-from-runc")],
        )
        .await?;
    let runc_ip = n.ip(&runc).await?;
    let get = |ip: &str| format!("wget -q -O - http://{ip}:8080/");
    n.exec_until(&peer_ids[0], &get(&ip), "hello-from-veil")
        .await?;
    n.exec_until(&runc_ids[0], &get(&ip), "hello-from-veil")
        .await?;
    n.exec_until(&web_c, &get(&peer_ip), "hello-from-peer")
        .await?;
    n.exec_until(&web_c, &get(&runc_ip), "hello-from-runc")
        .await?;
    n.get_from_ns(&peer_ip, "hello-from-peer").await?;
    n.get_from_ns(&runc_ip, "hello-from-runc").await?;

    // The host side while the pod runs: a tap and redirects in its
    // namespace (held open to look again after the pod is gone).
    let ns_path = n.netns_path(&server).await?;
    let held = std::fs::File::open(&ns_path).with_context(|| format!("open {ns_path}"))?;
    let held_path = fd_path(&held);
    let links = run_in(&held_path, &["ip", "-o", "link"])?;
    ensure!(
        links.contains("vtap0"),
        "no tap in the pod namespace: {links}"
    );
    let filters = run_in(
        &held_path,
        &["tc", "filter", "show", "dev", "eth0", "ingress"],
    )?;
    ensure!(
        filters.contains("protocol all") && filters.contains("mirred"),
        "no redirect on eth0: {filters}"
    );

    // What containerd's CRI PortForward does: dial localhost:PORT inside
    // the pod's namespace. The shim's redirect and relay carry it to the
    // guest's localhost, and the end of the response arrives as the end of
    // the connection.
    let t = Instant::now();
    let body = in_netns(&held_path, || http_get(web_addr("127.0.0.1")?, "/"))?;
    let took = t.elapsed();
    let body = String::from_utf8_lossy(&body);
    ensure!(
        body.contains("hello-from-veil"),
        "localhost:{WEB_PORT} of the pod namespace: {body:?}"
    );
    ensure!(
        took < EOF_WITHIN,
        "localhost:{WEB_PORT} of the pod namespace: the connection ended after {took:?}"
    );
    let nat = run_in(&held_path, &["iptables", "-t", "nat", "-S", "OUTPUT"])?;
    ensure!(nat.contains("REDIRECT"), "no localhost redirect: {nat}");
    // CRI PortForward itself, to the veil pod and to the runc pod.
    check_port_forward(n, "veil", &server, "hello-from-veil").await?;
    check_port_forward(n, "runc", &runc, "hello-from-runc").await?;

    // Removing the pod: no tap, no redirect, no process; the address is
    // released.
    let t1 = Instant::now();
    n.remove(&server).await?;
    eprintln!("veil pod removed in {:?}", t1.elapsed());
    let links = run_in(&held_path, &["ip", "-o", "link"])?;
    ensure!(!links.contains("vtap"), "tap left behind: {links}");
    let qdiscs = run_in(&held_path, &["tc", "qdisc", "show"])?;
    ensure!(
        !qdiscs.contains("ingress"),
        "ingress qdisc left behind: {qdiscs}"
    );
    let nat = run_in(&held_path, &["iptables", "-t", "nat", "-S", "OUTPUT"])?;
    ensure!(
        !nat.contains("REDIRECT"),
        "localhost redirect left behind: {nat}"
    );
    drop(held);
    let dir = format!("{}/{server}/", containerd::VEIL_STATE_DIR);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<_> = containerd::processes()
            .into_iter()
            .filter(|(_, c)| c.contains(&dir))
            .collect();
        if left.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "processes of {server} left: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = n.c.dir().join("cni/ipam").join(NET_NAME).join(&ip);
    ensure!(!lease.exists(), "{} still reserved", lease.display());

    // The next pod gets the released address (the only free one).
    let (again, _) = n
        .pod("veil", "again", vec![small_web("web", "hello-again")])
        .await?;
    let again_ip = n.ip(&again).await?;
    let again_ns = n.netns_path(&again).await?;
    ensure!(
        again_ip == ip,
        "the next pod got {again_ip}, not the released {ip}"
    );
    // The test namespace still holds the removed pod's MAC for this
    // address (REACHABLE, then DELAY and PROBE: up to ~50 s; runc pods
    // announce nothing, so a reused runc pod IP waits that long). The veil
    // agent announces each address once its NIC has carrier (gratuitous
    // ARP), so the new pod answers at once.
    let reach = Duration::from_secs(5);
    if let Err(e) = n.get_from_ns_within(&again_ip, "hello-again", reach).await {
        let h = std::path::Path::new(&again_ns);
        let diag = [
            run_in(h, &["ip", "-s", "link"]).unwrap_or_default(),
            run_in(h, &["tc", "-s", "filter", "show", "dev", "eth0", "ingress"])
                .unwrap_or_default(),
            n.ns.ip("-s link").unwrap_or_default(),
        ]
        .join("\n");
        bail!("{e:#}\nthe new pod's namespace:\n{diag}");
    }

    for p in [&peer, &runc, &again] {
        n.remove(p).await?;
    }
    Ok(vec![server, peer, again])
}
