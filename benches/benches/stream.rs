//! Stdio stream throughput: 100 MiB written by a process, read by the client,
//! (a) through a container's stdout — process → pipe → veil-agent → stream
//! connection — and (b) through a plain connection — the same process writing
//! straight into a unix socket. Same run, same machine; the container path
//! must be within 2x of the plain one.
//!
//! The agent is the static release build recorded by `ci/build-artefacts.sh`
//! (`VEIL_AGENT`), run in host mode (as root).
//!
//! usage: cargo bench -p veil-benches --bench stream [-- --runs N]

use std::{
    os::unix::net::UnixStream as StdUnixStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tokio::io::AsyncReadExt;
use veil_protocol::{
    agent::*,
    agent_ttrpc::{ContainersClient, SandboxClient},
};
use veil_test_support::{agent::HostAgent, rootfs};

const MIB: usize = 1024 * 1024;
const TOTAL_MIB: usize = 100;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

fn writer_args() -> Vec<String> {
    ["dd", "if=/dev/zero", "bs=1M", &format!("count={TOTAL_MIB}")]
        .map(String::from)
        .to_vec()
}

/// One measurement: from the start request to EOF, and from the first byte to EOF.
#[derive(Clone, Copy)]
struct Sample {
    total: Duration,
    streaming: Duration,
}

/// Reads to EOF; returns the byte count and when the first byte came.
async fn read_all<R: tokio::io::AsyncRead + Unpin>(mut r: R) -> Result<(usize, Instant)> {
    let mut buf = vec![0u8; MIB];
    let mut total = 0;
    let mut first = None;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, first.unwrap_or_else(Instant::now)));
        }
        first.get_or_insert_with(Instant::now);
        total += n;
    }
}

/// (b): busybox dd writing into one end of a socketpair.
async fn plain_once() -> Result<Sample> {
    let (ours, theirs) = StdUnixStream::pair()?;
    let start = Instant::now();
    let mut child = Command::new(rootfs::BUSYBOX)
        .args(writer_args())
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stderr(Stdio::null())
        .spawn()?;
    ours.set_nonblocking(true)?;
    let (n, first) = read_all(tokio::net::UnixStream::from_std(ours)?).await?;
    let sample = Sample {
        total: start.elapsed(),
        streaming: first.elapsed(),
    };
    child.wait()?;
    if n != TOTAL_MIB * MIB {
        bail!("plain connection delivered {n} bytes");
    }
    Ok(sample)
}

/// (a): the same dd as a container's init, its stdout read from the agent.
async fn container_once(agent: &HostAgent, c: &ContainersClient, i: usize) -> Result<Sample> {
    let id = format!("bench{i}");
    let mut spec =
        rootfs::default_spec(&writer_args().iter().map(String::as_str).collect::<Vec<_>>());
    // Share the network namespace, as a veil container shares its VM's: a
    // network namespace's teardown (kernel work on the other core) would
    // otherwise overlap the next run.
    if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network");
    }
    let mut req = CreateContainerRequest::new();
    req.container_id = id.clone();
    req.oci_spec = serde_json::to_vec(&spec)?;
    let mut root = Rootfs::new();
    root.storage_id = "bb".into();
    req.rootfs = Some(root).into();
    let mut io = veil_protocol::agent::Stdio::new();
    io.stdout = true;
    req.stdio = Some(io).into();
    c.create_container(ctx(), &req).await?;
    let out = agent.open_stream(&id, "", StreamKind::STDOUT).await?;
    let mut creq = ContainerRequest::new();
    creq.container_id = id.clone();
    let start = Instant::now();
    c.start_container(ctx(), &creq).await?;
    let (n, first) = read_all(out).await?;
    let sample = Sample {
        total: start.elapsed(),
        streaming: first.elapsed(),
    };
    let mut w = ProcessRequest::new();
    w.container_id = id.clone();
    let status = c.wait_process(ctx(), &w).await?.exit_status;
    c.remove_container(ctx(), &creq).await?;
    if n != TOTAL_MIB * MIB || status != 0 {
        bail!("container delivered {n} bytes, exit {status}");
    }
    Ok(sample)
}

fn agent_binary() -> Result<std::path::PathBuf> {
    if let Ok(p) = std::env::var("VEIL_AGENT") {
        return Ok(p.into());
    }
    let env = veil_test_support::workspace_root().join("target/veil-artefacts.env");
    let text = std::fs::read_to_string(&env).with_context(|| {
        format!(
            "{} missing: run ci/build-artefacts.sh, or set VEIL_AGENT",
            env.display()
        )
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("VEIL_AGENT="))
        .map(|p| p.trim().into())
        .context("VEIL_AGENT not recorded: run ci/build-artefacts.sh")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib_s(d: Duration) -> f64 {
    TOTAL_MIB as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut runs = 5;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--runs" {
            runs = args.next().context("--runs N")?.parse()?;
        }
    }
    let agent = HostAgent::start(&agent_binary()?)?;
    let rootfs_dir = agent.scratch().join("busybox");
    rootfs::busybox_rootfs(&rootfs_dir)?;
    let client = agent.client()?;
    let sandbox = SandboxClient::new(client.clone());
    let containers = ContainersClient::new(client);
    let mut sb = CreateSandboxRequest::new();
    sb.sandbox_id = "bench".into();
    sandbox.create_sandbox(ctx(), &sb).await?;
    let mut st = AddStorageRequest::new();
    st.storage_id = "bb".into();
    st.source = StorageSource::DIRECTORY.into();
    st.locator = rootfs_dir.to_string_lossy().into_owned();
    sandbox.add_storage(ctx(), &st).await?;

    // Warm up both paths once.
    plain_once().await?;
    container_once(&agent, &containers, 0).await?;
    let mut plain = Vec::new();
    let mut cont = Vec::new();
    for i in 0..runs {
        plain.push(plain_once().await?);
        cont.push(container_once(&agent, &containers, i + 1).await?);
    }
    let med = |v: &[Sample], f: fn(&Sample) -> Duration| median(v.iter().map(f).collect());
    let (p, c) = (med(&plain, |s| s.streaming), med(&cont, |s| s.streaming));
    let (pt, ct) = (med(&plain, |s| s.total), med(&cont, |s| s.total));
    println!(
        "stream throughput, {TOTAL_MIB} MiB, median of {runs} runs (host mode), first byte to EOF:"
    );
    println!(
        "  plain connection   {:8.1} ms  {:8.1} MiB/s",
        p.as_secs_f64() * 1e3,
        mib_s(p)
    );
    println!(
        "  container stdout   {:8.1} ms  {:8.1} MiB/s",
        c.as_secs_f64() * 1e3,
        mib_s(c)
    );
    let ratio = c.as_secs_f64() / p.as_secs_f64();
    println!("  ratio container/plain: {ratio:.2} (budget 2.00)");
    println!(
        "  (start to EOF, including process / container start: plain {:.1} ms, container {:.1} ms)",
        pt.as_secs_f64() * 1e3,
        ct.as_secs_f64() * 1e3
    );
    sandbox
        .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        .await?;
    if ratio > 2.0 {
        bail!("container stdout is {ratio:.2}x slower than a plain connection (budget 2x)");
    }
    Ok(())
}
