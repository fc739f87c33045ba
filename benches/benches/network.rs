//! Pod networking: a veil pod next to a runc pod on the same private
//! containerd, whose CNI bridge network (Debian's `bridge` + `host-local`)
//! lives in a network namespace the bench creates (`veil_test_support::podnet`).
//! The client is a thread in that namespace, talking to busybox `httpd` at
//! the pod's IP, as a peer on the pod network would:
//!
//! - HTTP round trip: connect, HTTP/1.0 GET of a small page, read to the
//!   server's close (the median of [`GETS`] per pod and round);
//! - TCP download: one GET of a [`BIG_MIB`] MiB file, read to the end
//!   ([`DOWNLOADS`] per pod and round), in MiB/s;
//! - pod start: RunPodSandbox to the web container started (both runtimes),
//!   and the veil sandbox's phases from the shim's `veil-phases` line, as ms
//!   since task Create, `network_ready` among them.
//!
//! Each round starts a fresh veil and runc pod, measures both (interleaved)
//! and removes them. Medians over the rounds.
//!
//! Run: `cargo bench -p veil-benches --bench network` (VEIL_BENCH_RUNS=N
//! rounds, default 3; needs root and `ci/build-artefacts.sh`).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use veil_benches::{ms, plot, runs, summarize};
use veil_shim::phases::parse_line;
use veil_test_support::podnet::{http_get, in_netns, web, web_addr, PodNet};

/// Size of the downloaded file.
const BIG_MIB: usize = 32;
/// Small-page GETs per pod and round.
const GETS: usize = 21;
/// Downloads per pod and round.
const DOWNLOADS: usize = 2;
/// The veil sandbox's marks reported, in order.
const MARKS: &[&str] = &[
    "vmm_spawned",
    "kernel_booted",
    "agent_ready",
    "network_ready",
    "rootfs_attached",
    "container_started",
];

/// What one pod gave in one round.
#[derive(Default)]
struct Samples {
    start: Vec<Duration>,
    rtt: Vec<Duration>,
    mibs: Vec<f64>,
}

/// Round trips and downloads against `ip`, from a thread in `ns`.
fn measure(ns: &std::path::Path, ip: &str, s: &mut Samples) -> Result<()> {
    let addr = web_addr(ip)?;
    let (rtt, mibs) = in_netns(ns, move || {
        let mut rtt = Vec::new();
        for _ in 0..GETS {
            let t = Instant::now();
            http_get(addr, "/index.html")?;
            rtt.push(t.elapsed());
        }
        let mut mibs = Vec::new();
        for _ in 0..DOWNLOADS {
            let t = Instant::now();
            let n = http_get(addr, "/big")?.len();
            let secs = t.elapsed().as_secs_f64();
            ensure!(n >= BIG_MIB << 20, "got {n} bytes of /big");
            mibs.push(n as f64 / f64::from(1 << 20) / secs.max(1e-9));
        }
        Ok((rtt, mibs))
    })?;
    s.rtt.extend(rtt);
    s.mibs.extend(mibs);
    Ok(())
}

/// The veil-phases marks of pod `pod`'s sandbox, as ms since `create`.
fn sandbox_phases(net: &PodNet, pod: &str) -> Result<HashMap<String, f64>> {
    let needle = format!("sandbox={pod} container={pod} ");
    let line = net
        .c
        .log_text()
        .lines()
        .rfind(|l| l.contains("veil-phases") && l.contains(&needle))
        .map(str::to_string)
        .with_context(|| format!("no veil-phases line for the sandbox of {pod}"))?;
    let marks: HashMap<String, u128> = parse_line(&line).unwrap_or_default().into_iter().collect();
    let create = *marks.get("create").context("no create mark")?;
    Ok(marks
        .into_iter()
        .map(|(k, v)| (k, (v as f64 - create as f64) / 1e6))
        .collect())
}

async fn bench(net: &mut PodNet, rounds: usize) -> Result<Vec<String>> {
    let mut veil = Samples::default();
    let mut runc = Samples::default();
    let mut phases: HashMap<String, Vec<f64>> = HashMap::new();
    let mut veil_pods = Vec::new();
    for i in 0..rounds {
        let mut pods = Vec::new();
        for (handler, s) in [("veil", &mut veil), ("runc", &mut runc)] {
            let t = Instant::now();
            let (pod, _) = net
                .pod(
                    handler,
                    &format!("{handler}-{i}"),
                    vec![web("web", &format!("hello-{handler}"), BIG_MIB)],
                )
                .await?;
            s.start.push(t.elapsed());
            let ip = net.ip(&pod).await?;
            // httpd up (it writes the big file first).
            net.get_from_ns(&ip, &format!("hello-{handler}")).await?;
            if handler == "veil" {
                for (k, v) in sandbox_phases(net, &pod)? {
                    phases.entry(k).or_default().push(v);
                }
                veil_pods.push(pod.clone());
            }
            pods.push((pod, ip));
        }
        // Interleaved: veil, runc.
        measure(&net.ns.path(), &pods[0].1, &mut veil)?;
        measure(&net.ns.path(), &pods[1].1, &mut runc)?;
        eprintln!(
            "round {}/{rounds}: veil {} / {:.0} MiB/s, runc {} / {:.0} MiB/s",
            i + 1,
            ms(summarize(&veil.rtt[veil.rtt.len() - GETS..]).median),
            plot::median_of(&veil.mibs[veil.mibs.len() - DOWNLOADS..]),
            ms(summarize(&runc.rtt[runc.rtt.len() - GETS..]).median),
            plot::median_of(&runc.mibs[runc.mibs.len() - DOWNLOADS..]),
        );
        for (pod, _) in pods {
            net.remove(&pod).await?;
        }
    }
    println!(
        "pod network, {rounds} rounds (a fresh veil and runc pod each), client in the CNI bridge's namespace, medians:"
    );
    println!("{:<48} {:>12} {:>12}", "", "veil pod", "runc pod");
    let row = |name: &str, v: String, r: String| println!("{name:<48} {v:>12} {r:>12}");
    row(
        &format!("HTTP/1.0 GET round trip (n={})", veil.rtt.len()),
        ms(summarize(&veil.rtt).median),
        ms(summarize(&runc.rtt).median),
    );
    row(
        &format!("TCP download, {BIG_MIB} MiB (n={})", veil.mibs.len()),
        format!("{:.0} MiB/s", plot::median_of(&veil.mibs)),
        format!("{:.0} MiB/s", plot::median_of(&runc.mibs)),
    );
    row(
        &format!("pod start, RunPodSandbox → web started (n={rounds})"),
        ms(summarize(&veil.start).median),
        ms(summarize(&runc.start).median),
    );
    println!("veil sandbox phases, ms since task Create (medians):");
    let mut marks = serde_json::Map::new();
    for m in MARKS {
        if let Some(v) = phases.get(*m) {
            println!("  {m:<20} {:>8.0} ms", plot::median_of(v));
            marks.insert(m.to_string(), plot::median_of(v).into());
        }
    }
    let msf = |d: &[std::time::Duration]| summarize(d).median.as_secs_f64() * 1000.0;
    let json = serde_json::json!({
        "bench": "network",
        "rounds": rounds,
        "accel": veil_benches::accel_name(),
        "http_rtt_ms": {"veil": msf(&veil.rtt), "runc": msf(&runc.rtt)},
        "download_mib_s": {"veil": plot::median_of(&veil.mibs), "runc": plot::median_of(&runc.mibs)},
        "pod_start_ms": {"veil": msf(&veil.start), "runc": msf(&runc.start)},
        "veil_phase_marks_ms": marks,
    });
    let j = plot::write_json("network", &json)?;
    let rtt = plot::bars(
        "network-rtt",
        &format!(
            "HTTP/1.0 GET round trip to the pod's IP, medians of {}",
            veil.rtt.len()
        ),
        "ms",
        &[
            ("veil pod".into(), msf(&veil.rtt)),
            ("runc pod".into(), msf(&runc.rtt)),
        ],
    )?;
    let tput = plot::bars(
        "network-download",
        &format!(
            "TCP download of {BIG_MIB} MiB from the pod, medians of {}",
            veil.mibs.len()
        ),
        "MiB/s",
        &[
            ("veil pod".into(), plot::median_of(&veil.mibs)),
            ("runc pod".into(), plot::median_of(&runc.mibs)),
        ],
    )?;
    println!(
        "results: {} {} {}",
        j.display(),
        rtt.display(),
        tput.display()
    );
    Ok(veil_pods)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // Two fresh addresses per round: no address is reused in a run.
    let rounds = runs(3).clamp(1, 10);
    let mut net = PodNet::start("bench-net", 40).await?;
    let result = bench(&mut net, rounds).await;
    net.finish(result).await
}
