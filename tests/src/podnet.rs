//! A pod network for tests and benchmarks: a private containerd with the CRI
//! plugin running inside a network namespace the caller's [`PodNet`] creates,
//! with Debian's CNI plugins (`bridge` + `host-local`, `portmap`; `loopback`
//! by containerd) configured as a bridge network on a private subnet, so
//! every packet stays in that namespace. Pods are started through CRI;
//! [`in_netns`] runs a client on a thread inside the namespace (where the
//! pods' addresses and containerd's streaming server are), and [`http_get`]
//! is that client.
//!
//! Dropping a [`PodNet`] stops containerd (and its shims) before it deletes
//! the namespace.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ContainerConfig, DnsConfig, PodSandboxConfig,
    PodSandboxStatusRequest, PodSandboxStatusResponse,
};
use tonic::transport::Channel;

use crate::{
    containerd::{Containerd, Options},
    cri,
    netns::Netns,
    Artefacts,
};

/// The subnet: `SUBNET.0/24` behind bridge `veilbr0`, gateway `SUBNET.1`,
/// pods from `SUBNET.10`.
pub const SUBNET: &str = "10.244.77";
/// The MTU the bridge plugin gives the pods' interfaces.
pub const MTU: u32 = 1400;
/// The CNI network's name (host-local keeps its leases under it).
pub const NET_NAME: &str = "veil-net";
/// The DNS server every pod is configured with.
pub const DNS_SERVER: &str = "10.96.0.10";
/// The DNS search domain every pod is configured with.
pub const DNS_SEARCH: &str = "veil-test.svc.cluster.local";
/// The port [`web`] containers serve on.
pub const WEB_PORT: u16 = 8080;

/// The conflist: pod addresses from `SUBNET.10` to `SUBNET.<last>`.
fn conflist(last: u8) -> String {
    format!(
        r#"{{"cniVersion": "0.4.0", "name": "{NET_NAME}", "plugins": [
  {{"type": "bridge", "bridge": "veilbr0", "isGateway": true, "ipMasq": false, "mtu": {MTU},
    "ipam": {{"type": "host-local", "dataDir": "@DIR@/cni/ipam",
      "ranges": [[{{"subnet": "{SUBNET}.0/24", "rangeStart": "{SUBNET}.10", "rangeEnd": "{SUBNET}.{last}", "gateway": "{SUBNET}.1"}}]],
      "routes": [{{"dst": "0.0.0.0/0"}}]}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
]}}"#
    )
}

/// A busybox container serving `/tmp/www/index.html` = `text` and
/// `/tmp/www/big` (`big_mib` MiB of zeros) with `httpd` on [`WEB_PORT`].
pub fn web(name: &str, text: &str, big_mib: usize) -> ContainerConfig {
    let script = format!(
        "mkdir -p /tmp/www && dd if=/dev/zero of=/tmp/www/big bs=1048576 count={big_mib} 2>/dev/null && echo {text} > /tmp/www/index.html && exec httpd -f -p {WEB_PORT} -h /tmp/www"
    );
    cri::busybox_container(name, &["sh", "-c", &script])
}

/// containerd on a bridge network in a namespace of its own, and the pods
/// started on it. Fields drop in order: containerd (and its shims) before
/// the namespace it runs in.
pub struct PodNet {
    /// The private containerd.
    pub c: Containerd,
    /// The namespace containerd, the bridge and the clients run in.
    pub ns: Netns,
    /// A CRI client to `c`.
    pub cri: RuntimeServiceClient<Channel>,
    work: tempfile::TempDir,
    pods: Vec<String>,
}

impl PodNet {
    /// Creates namespace `veil-<prefix>-PID`, starts containerd in it with
    /// pod addresses `SUBNET.10`..=`SUBNET.<last>`, imports the pod images
    /// and connects the CRI client.
    pub async fn start(prefix: &str, last: u8) -> Result<Self> {
        let ns = Netns::create(prefix)?;
        let a = Artefacts::locate()?;
        let c = Containerd::start_with(
            &a,
            &Options {
                netns: Some(ns.path()),
                cni_conflist: Some(conflist(last)),
            },
        )?;
        let work = tempfile::tempdir()?;
        cri::import_pod_images(&c, work.path())?;
        let cri = cri::client(&c).await?;
        Ok(PodNet {
            c,
            ns,
            cri,
            work,
            pods: Vec::new(),
        })
    }

    /// What a run of `result` leaves: on success, checks that nothing of
    /// `veil_pods` is left (containerd's `wait_clean`); on failure, prints
    /// containerd's log, removes the pods still running and returns the
    /// error.
    pub async fn finish(mut self, result: Result<Vec<String>>) -> Result<()> {
        match result {
            Ok(veil_pods) => {
                let pods: Vec<&str> = veil_pods.iter().map(String::as_str).collect();
                self.c.wait_clean(&pods)
            }
            Err(e) => {
                eprintln!("containerd log:\n{}", self.c.log_text());
                for p in self.pods.clone() {
                    let _ = self.remove(&p).await;
                }
                Err(e)
            }
        }
    }

    /// The CRI config of pod `name`: the test DNS config, logs in the work
    /// directory.
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
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
    pub async fn pod(
        &mut self,
        handler: &str,
        name: &str,
        containers: Vec<ContainerConfig>,
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

    /// The verbose PodSandboxStatus of `pod`.
    pub async fn status(&mut self, pod: &str) -> Result<PodSandboxStatusResponse> {
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
    pub async fn ip(&mut self, pod: &str) -> Result<String> {
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
    pub async fn netns_path(&mut self, pod: &str) -> Result<String> {
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
    pub async fn exec_until(&mut self, id: &str, script: &str, want: &str) -> Result<String> {
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

    /// HTTP GET of `/` at `ip`:[`WEB_PORT`] from the test namespace until
    /// the body holds `want` (30 s).
    pub async fn get_from_ns(&self, ip: &str, want: &str) -> Result<()> {
        self.get_from_ns_within(ip, want, Duration::from_secs(30))
            .await
    }

    /// [`Self::get_from_ns`], giving up after `wait`.
    pub async fn get_from_ns_within(&self, ip: &str, want: &str, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            let r = web_addr(ip).and_then(|a| in_netns(&self.ns.path(), move || http_get(a, "/")));
            match r {
                Ok(body) if String::from_utf8_lossy(&body).contains(want) => return Ok(()),
                other if Instant::now() > deadline => {
                    let diag = [
                        self.ns.ip("addr").unwrap_or_default(),
                        self.ns.ip("route").unwrap_or_default(),
                        self.ns.ip("neigh").unwrap_or_default(),
                    ]
                    .join("\n");
                    bail!(
                        "GET http://{ip}:{WEB_PORT}/ from the test namespace: {}\n{diag}",
                        other.map_or_else(
                            |e| format!("{e:#}"),
                            |b| format!("body {:?}", String::from_utf8_lossy(&b))
                        )
                    );
                }
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }

    /// Stops and removes `pod`.
    pub async fn remove(&mut self, pod: &str) -> Result<()> {
        cri::remove_pod(&mut self.cri, pod).await?;
        self.pods.retain(|p| p != pod);
        Ok(())
    }
}

/// Runs `f` on a thread inside the network namespace at `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = std::fs::File::open(ns).with_context(|| format!("open {}", ns.display()))?;
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in a network namespace panicked"))?
}

/// `ip`:[`WEB_PORT`].
pub fn web_addr(ip: &str) -> Result<SocketAddr> {
    Ok(SocketAddr::new(
        ip.parse().with_context(|| format!("IP {ip:?}"))?,
        WEB_PORT,
    ))
}

/// How long a reader may wait for the next bytes (or the end) of a
/// response before [`http_get`] fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP/1.0 GET of `path` from `addr` on a new connection, read to the
/// end of the connection (the server closes it): the response, headers
/// included. Fails when no byte and no end arrives for [`READ_TIMEOUT`].
pub fn http_get(addr: SocketAddr, path: &str) -> Result<Vec<u8>> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .with_context(|| format!("GET {path} from {addr}: no end after {} bytes", out.len()))?;
    Ok(out)
}

/// Runs `cmd` in the network namespace at `ns` (`nsenter --net=`); its
/// stdout.
pub fn run_in(ns: &Path, cmd: &[&str]) -> Result<String> {
    let ns = format!("--net={}", ns.display());
    let mut args = vec!["nsenter", ns.as_str()];
    args.extend(cmd);
    crate::netns::run(&args)
}

/// The path through which this process's open descriptor `fd` names a
/// namespace (so it can be entered after its mount is gone).
pub fn fd_path(fd: &std::fs::File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ))
}
