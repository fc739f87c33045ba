//! The node's metrics end to end: `veil-node metrics` on loopback, a
//! `veil-sim` pod through the real containerd and shim attesting to the
//! real `veil-kbs`, and Prometheus' text as a scrape gets it: the pod per
//! handler, its guest memory, the host RSS of its shim, QEMU and vsock
//! backend, its start phases and its attestation's outcome; after the pod
//! is removed the running-pod series are gone and the counters stay.

use std::{
    io::{Read, Write},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use veil_shim::process::{ManagedChild, SpawnOptions};
use veil_tests::{
    containerd::VEIL_STATE_DIR,
    node::veil_node_bin,
    oci,
    storage::{Confidential, NS},
};

fn scrape(addr: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").context("no HTTP head")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "scrape: {head}");
    Ok(body.to_string())
}

/// The value of the first sample line starting with `series`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn node_metrics_show_a_running_veil_sim_pod_and_its_attestation() -> Result<()> {
    let env = Confidential::new()?;
    let metrics_dir = std::path::Path::new(VEIL_STATE_DIR).join("metrics");
    let log = env.work.path().join("veil-node.log");
    let mut cmd = Command::new(veil_node_bin()?);
    cmd.args([
        "metrics",
        "--metrics-listen",
        "127.0.0.1:0",
        "--state-dir",
        VEIL_STATE_DIR,
    ]);
    let node = ManagedChild::spawn(
        "veil-node",
        cmd,
        &log,
        SpawnOptions {
            die_with_parent_thread: true,
            ..Default::default()
        },
    )?;
    let result = scenario(&env, &log);
    drop(node);
    let _ = std::fs::remove_dir_all(&metrics_dir);
    if result.is_err() {
        eprintln!("containerd log:\n{}", env.c.log_text());
    }
    result
}

fn scenario(env: &Confidential, log: &std::path::Path) -> Result<()> {
    let t = Instant::now();
    let addr = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(a) = text
            .lines()
            .find_map(|l| l.strip_prefix("serving metrics on "))
        {
            break a.trim().to_string();
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("veil-node metrics did not start: {text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let root_hash = env.busybox_root_hash()?;
    env.resources(&root_hash)?;
    env.register("metrics-pod", |_| {})?;
    let _broker = env.start_broker("metrics-pod")?;

    let mut args = env.run_args("veil-sim", oci::BUSYBOX_IMAGE);
    args.extend([
        "-d".into(),
        oci::BUSYBOX_IMAGE.into(),
        "metered".into(),
        "sleep".into(),
        "1000".into(),
    ]);
    let out = env.c.ctr(NS).args(&args).output()?;
    ensure!(
        out.status.success(),
        "ctr run: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let text = scrape(&addr)?;
    eprintln!("{text}");
    ensure!(
        value(&text, r#"veil_pods{handler="veil-sim"}"#) == Some(1.0),
        "pods: {text}"
    );
    ensure!(
        value(
            &text,
            r#"veil_pod_guest_memory_bytes{pod="metered",handler="veil-sim"}"#
        )
        .is_some_and(|v| v > 0.0),
        "guest memory: {text}"
    );
    for component in ["shim", "vmm", "vsock_backend"] {
        let series = format!(r#"veil_pod_host_rss_bytes{{pod="metered",component="{component}"}}"#);
        ensure!(
            value(&text, &series).is_some_and(|v| v > 1024.0 * 1024.0),
            "{component} RSS: {text}"
        );
    }
    ensure!(
        value(
            &text,
            r#"veil_attestations_total{handler="veil-sim",outcome="released",reason=""}"#
        ) == Some(1.0),
        "attestations: {text}"
    );
    ensure!(
        value(
            &text,
            r#"veil_pod_start_phase_seconds_count{handler="veil-sim",phase="total"}"#
        ) == Some(1.0),
        "start phases: {text}"
    );
    ensure!(
        text.contains(r#"phase="attested""#),
        "no attested phase: {text}"
    );

    env.c.kill_and_remove(NS, "metered")?;
    env.c.wait_clean(&["metered"])?;
    let text = scrape(&addr)?;
    ensure!(!text.contains("veil_pods{"), "pod still counted: {text}");
    ensure!(
        text.contains(r#"outcome="released""#),
        "counter lost: {text}"
    );
    Ok(())
}
