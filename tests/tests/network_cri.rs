//! Pod networking end to end (issue 11): a private containerd with the CRI
//! plugin runs inside a network namespace the test creates, with Debian's
//! CNI plugins (`bridge` + `host-local`, `portmap`; `loopback` by
//! containerd) configured as a bridge network on a private subnet, so every
//! packet stays in that namespace. veil pods get their CNI interface inside
//! the VM: a busybox `httpd` in a veil pod answers at the IP PodSandboxStatus
//! reports, from the test namespace, from a second veil pod and from a runc
//! pod (and reaches them); `ip addr` / `ip route` in the container show the
//! CNI address, MTU and default route; `/etc/resolv.conf` is the pod's CRI DNS
//! config; two containers of the pod talk over localhost; a connection to
//! localhost:8080 inside the pod's namespace (what containerd's CRI
//! PortForward makes) reaches the guest's httpd. Removing the pod leaves no
//! tap, redirect, iptables rule or process, and CNI releases the address:
//! the next pod gets it back.

use std::{
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, DnsConfig, PodSandboxConfig,
    PodSandboxStatusRequest,
};
use tonic::transport::Channel;
use veil_tests::{
    containerd::{self, Containerd, Options},
    cri,
    netns::Netns,
    Artefacts,
};

/// The test network: 10.244.77.0/24 behind bridge `veilbr0` (gateway .1),
/// pods from .10 to .12 only, so a released address is the next one given.
const SUBNET: &str = "10.244.77";
const MTU: u32 = 1400;
const NET_NAME: &str = "veil-net";
const DNS_SERVER: &str = "10.96.0.10";
const DNS_SEARCH: &str = "veil-test.svc.cluster.local";

fn conflist() -> String {
    format!(
        r#"{{"cniVersion": "0.4.0", "name": "{NET_NAME}", "plugins": [
  {{"type": "bridge", "bridge": "veilbr0", "isGateway": true, "ipMasq": false, "mtu": {MTU},
    "ipam": {{"type": "host-local", "dataDir": "@DIR@/cni/ipam",
      "ranges": [[{{"subnet": "{SUBNET}.0/24", "rangeStart": "{SUBNET}.10", "rangeEnd": "{SUBNET}.12", "gateway": "{SUBNET}.1"}}]],
      "routes": [{{"dst": "0.0.0.0/0"}}]}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
]}}"#
    )
}

/// What the test runs; fields drop in order: containerd (and its shims)
/// before the namespace it runs in.
struct Net {
    c: Containerd,
    ns: Netns,
    cri: RuntimeServiceClient<Channel>,
    work: tempfile::TempDir,
    pods: Vec<String>,
}

/// Size of the file served for the throughput figure.
const BIG_MIB: usize = 32;

/// A busybox container serving `/tmp/www/index.html` = `text` and
/// `/tmp/www/big` ([`BIG_MIB`] MiB of zeros) on :8080.
fn web(name: &str, text: &str) -> k8s_cri::v1::ContainerConfig {
    let script = format!(
        "mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/big bs=1048576 count={BIG_MIB} 2>/dev/null && echo {text} > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"
    );
    cri::busybox_container(name, &["sh", "-c", &script])
}

impl Net {
    fn pod_config(&self, name: &str) -> PodSandboxConfig {
        let logs = self.work.path().join("logs").join(name);
        let _ = std::fs::create_dir_all(&logs);
        let mut cfg = cri::pod_config(
            name,
            &format!("uid-{name}"),
            name,
            &logs.display().to_string(),
        );
        cfg.dns_config = Some(DnsConfig {
            servers: vec![DNS_SERVER.into()],
            searches: vec![DNS_SEARCH.into()],
            options: vec!["ndots:5".into()],
        });
        cfg
    }

    /// Runs a pod `name` on `handler` with `containers` started; the pod id
    /// and the container ids.
    async fn pod(
        &mut self,
        handler: &str,
        name: &str,
        containers: Vec<k8s_cri::v1::ContainerConfig>,
    ) -> Result<(String, Vec<String>)> {
        let cfg = self.pod_config(name);
        let pod = cri::run_pod(&mut self.cri, handler, &cfg).await?;
        self.pods.push(pod.clone());
        let mut ids = Vec::new();
        for c in containers {
            let id = cri::create_container(&mut self.cri, &pod, &cfg, c).await?;
            cri::start_container(&mut self.cri, &id).await?;
            ids.push(id);
        }
        Ok((pod, ids))
    }

    async fn status(&mut self, pod: &str) -> Result<k8s_cri::v1::PodSandboxStatusResponse> {
        Ok(self
            .cri
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: true,
            })
            .await
            .context("PodSandboxStatus")?
            .into_inner())
    }

    /// The pod's IP as PodSandboxStatus reports it.
    async fn ip(&mut self, pod: &str) -> Result<String> {
        let s = self.status(pod).await?;
        let ip = s
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        ensure!(
            ip.starts_with(&format!("{SUBNET}.")),
            "pod {pod} has IP {ip:?}"
        );
        Ok(ip)
    }

    /// The path of the pod's network namespace, from the verbose status's
    /// runtime spec.
    async fn netns_path(&mut self, pod: &str) -> Result<String> {
        let s = self.status(pod).await?;
        let info = s.info.get("info").context("no verbose info")?;
        let v: serde_json::Value = serde_json::from_str(info)?;
        v.pointer("/runtimeSpec/linux/namespaces")
            .and_then(|n| n.as_array())
            .and_then(|a| {
                a.iter()
                    .find(|n| n["type"] == "network")
                    .and_then(|n| n["path"].as_str())
            })
            .map(str::to_string)
            .context("no network namespace path in the pod's runtime spec")
    }

    /// Runs `script` in container `id` until it succeeds with stdout holding
    /// `want` (30 s); its stdout.
    async fn exec_until(&mut self, id: &str, script: &str, want: &str) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (out, err, code) = cri::exec(&mut self.cri, id, script).await?;
            if code == 0 && out.contains(want) {
                return Ok(out);
            }
            if Instant::now() > deadline {
                bail!("{script:?} in {id}: exit {code}, stdout {out:?}, stderr {err:?}; wanted {want:?}");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// HTTP GET of `/` at `ip`:8080 from the test namespace until the body
    /// holds `want` (30 s).
    async fn get_from_ns(&self, ip: &str, want: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = in_netns(&self.ns.path(), {
                let ip = ip.to_string();
                move || http_get_body(&ip, "/")
            });
            match r {
                Ok(body) if body.contains(want) => return Ok(()),
                other if Instant::now() > deadline => {
                    let diag = [
                        self.ns.ip("addr").unwrap_or_default(),
                        self.ns.ip("route").unwrap_or_default(),
                        self.ns.ip("neigh").unwrap_or_default(),
                    ]
                    .join("\n");
                    bail!(
                        "GET http://{ip}:8080/ from the test namespace: {}\n{diag}",
                        other.map_or_else(|e| format!("{e:#}"), |b| format!("body {b:?}"))
                    );
                }
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }

    async fn remove(&mut self, pod: &str) -> Result<()> {
        cri::remove_pod(&mut self.cri, pod).await?;
        self.pods.retain(|p| p != pod);
        Ok(())
    }
}

/// Runs `f` on a thread inside the network namespace at `ns`.
fn in_netns<T: Send + 'static>(
    ns: &std::path::Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = std::fs::File::open(ns)?;
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in the test namespace panicked"))?
}

/// One HTTP/1.0 GET of `path` from `ip`:8080; the response as text.
fn http_get_body(ip: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr(ip)?, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn addr(ip: &str) -> Result<std::net::SocketAddr> {
    Ok(std::net::SocketAddr::new(ip.parse()?, 8080))
}

/// An HTTP/1.0 GET of `/` from `ip`:8080, read until the response holds
/// `want` (not to its end: a close does not cross hybrid vsock as EOF).
fn http_get_until(ip: &str, want: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr(ip)?, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains(want) {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// One HTTP/1.0 GET of `path` from `ip`:8080 on a new connection; the
/// bytes of the response.
fn http_get(ip: &str, path: &str) -> Result<usize> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr(ip)?, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n;
    }
}

/// From a thread inside `ns`: the median time of 21 GETs of the small page
/// (connect, request, response, close) and the throughput of one GET of the
/// big file, in MiB/s.
fn measure(ns: &std::path::Path, ip: &str) -> Result<(Duration, f64)> {
    let ip = ip.to_string();
    in_netns(ns, move || {
        let mut rtts = Vec::new();
        for _ in 0..21 {
            let t = Instant::now();
            http_get(&ip, "/index.html")?;
            rtts.push(t.elapsed());
        }
        rtts.sort();
        let t = Instant::now();
        let bytes = http_get(&ip, "/big")?;
        let secs = t.elapsed().as_secs_f64();
        ensure!(bytes >= BIG_MIB << 20, "got {bytes} bytes of /big");
        Ok((
            rtts[rtts.len() / 2],
            bytes as f64 / f64::from(1 << 20) / secs,
        ))
    })
}

/// Runs `cmd` in the network namespace held open by `fd` of this process.
fn in_held_ns(fd: &std::fs::File, cmd: &[&str]) -> Result<String> {
    let ns = format!("--net=/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
    let mut args = vec!["nsenter", ns.as_str()];
    args.extend(cmd);
    veil_tests::netns::run(&args)
}

/// A `veil-phases` log line as milliseconds since `create`.
fn phases_ms(line: &str) -> String {
    let marks = veil_shim::phases::parse_line(line).unwrap_or_default();
    let base = marks.iter().find(|(k, _)| k == "create").map_or(0, |m| m.1);
    marks
        .iter()
        .filter(|(k, _)| k != "sandbox" && k != "container")
        .map(|(k, v)| format!("{k}={:.0}ms", (*v as f64 - base as f64) / 1e6))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn veil_pods_are_on_the_cni_network() -> Result<()> {
    let ns = Netns::create("net")?;
    let a = Artefacts::locate()?;
    let c = Containerd::start_with(
        &a,
        &Options {
            netns: Some(ns.path()),
            cni_conflist: Some(conflist()),
        },
    )?;
    let work = tempfile::tempdir()?;
    cri::import_pod_images(&c, work.path())?;
    let cri = cri::client(&c).await?;
    let mut net = Net {
        c,
        ns,
        cri,
        work,
        pods: Vec::new(),
    };
    let started = Instant::now();
    let result = scenario(&mut net).await;
    eprintln!("scenario took {:?}", started.elapsed());
    match result {
        Ok(veil_pods) => {
            let pods: Vec<&str> = veil_pods.iter().map(String::as_str).collect();
            net.c.wait_clean(&pods)
        }
        Err(e) => {
            eprintln!("containerd log:\n{}", net.c.log_text());
            for p in net.pods.clone() {
                let _ = net.remove(&p).await;
            }
            Err(e)
        }
    }
}

async fn scenario(n: &mut Net) -> Result<Vec<String>> {
    let t0 = Instant::now();
    let (server, ids) = n
        .pod(
            "veil",
            "web",
            vec![
                web("web", "hello-from-veil"),
                cri::busybox_container("side", &["sleep", "3600"]),
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
        .pod("veil", "peer", vec![web("web", "hello-from-peer")])
        .await?;
    let peer_ip = n.ip(&peer).await?;
    let (runc, runc_ids) = n
        .pod("runc", "baseline", vec![web("web", "hello-from-runc")])
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

    // Figures: request round trip and TCP throughput from the test
    // namespace to the veil pod and to the runc pod.
    for (what, addr) in [("veil", &ip), ("runc", &runc_ip)] {
        let (rtt, mibs) = measure(&n.ns.path(), addr)?;
        eprintln!(
            "figure: {what} pod: HTTP GET round trip median {rtt:?}, TCP download {mibs:.1} MiB/s"
        );
    }
    for l in n.c.log_text().lines().filter(|l| l.contains("veil-phases")) {
        eprintln!("figure: {}", phases_ms(l));
    }

    // The host side while the pod runs: a tap and redirects in its
    // namespace (held open to look again after the pod is gone).
    let ns_path = n.netns_path(&server).await?;
    let held = std::fs::File::open(&ns_path).with_context(|| format!("open {ns_path}"))?;
    let links = in_held_ns(&held, &["ip", "-o", "link"])?;
    ensure!(
        links.contains("vtap0"),
        "no tap in the pod namespace: {links}"
    );
    let filters = in_held_ns(&held, &["tc", "filter", "show", "dev", "eth0", "ingress"])?;
    ensure!(
        filters.contains("protocol all") && filters.contains("mirred"),
        "no redirect on eth0: {filters}"
    );

    // What containerd's CRI PortForward does: dial localhost:PORT inside
    // the pod's namespace. The shim's redirect and relay carry it to the
    // guest's localhost.
    let held_path = std::path::PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        held.as_raw_fd()
    ));
    let body = in_netns(&held_path, || {
        http_get_until("127.0.0.1", "hello-from-veil")
    })?;
    ensure!(
        body.contains("hello-from-veil"),
        "localhost:8080 of the pod namespace: {body:?}"
    );
    let nat = in_held_ns(&held, &["iptables", "-t", "nat", "-S", "OUTPUT"])?;
    ensure!(nat.contains("REDIRECT"), "no localhost redirect: {nat}");

    // Removing the pod: no tap, no redirect, no process; the address is
    // released.
    let t1 = Instant::now();
    n.remove(&server).await?;
    eprintln!("veil pod removed in {:?}", t1.elapsed());
    let links = in_held_ns(&held, &["ip", "-o", "link"])?;
    ensure!(!links.contains("vtap"), "tap left behind: {links}");
    let qdiscs = in_held_ns(&held, &["tc", "qdisc", "show"])?;
    ensure!(
        !qdiscs.contains("ingress"),
        "ingress qdisc left behind: {qdiscs}"
    );
    let nat = in_held_ns(&held, &["iptables", "-t", "nat", "-S", "OUTPUT"])?;
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
        .pod("veil", "again", vec![web("web", "hello-again")])
        .await?;
    let again_ip = n.ip(&again).await?;
    let again_ns = n.netns_path(&again).await?;
    ensure!(
        again_ip == ip,
        "the next pod got {again_ip}, not the released {ip}"
    );
    // KNOWN ISSUE (docs/network.md): the test namespace keeps the removed
    // pod's MAC for this address (the entry stays in DELAY; neither CNI's
    // nor the guest's gratuitous ARP replaces it), so the reused address is
    // unreachable for longer than this test waits. The stale entry is
    // dropped here so the new pod's own reachability is what is checked.
    let _ = n.ns.ip(&format!("neigh del {again_ip} dev veilbr0"));
    if let Err(e) = n.get_from_ns(&again_ip, "hello-again").await {
        let h = std::fs::File::open(&again_ns)?;
        let diag = [
            in_held_ns(&h, &["ip", "-s", "link"]).unwrap_or_default(),
            in_held_ns(
                &h,
                &["tc", "-s", "filter", "show", "dev", "eth0", "ingress"],
            )
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
