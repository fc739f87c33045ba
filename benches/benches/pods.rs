//! Many pods on one node: pods started at once, the host footprint of each
//! while ten run, and a long series of sequential starts — with the veil
//! runtime through a private containerd (`ctr run -d`), each start timed
//! until `ctr` returned (the task is running).
//!
//! - parallel: N pods (`VEIL_BENCH_PARALLEL`, default "10,20": 10, then 20
//!   if every one of the 10 ran) started from N threads at once; p50/p99 of
//!   their start times, how many ran, and that all were removed with
//!   nothing left.
//! - footprint, with the first parallel batch running: per pod, outside
//!   guest RAM, the PSS (`/proc/PID/smaps`: shared pages count once per
//!   node, split between their users) and RSS of the shim, of QEMU without
//!   its guest-RAM memfd, and of the vsock backend (and virtiofsd when the
//!   handler shares directories); medians over the pods.
//! - sequential: `VEIL_BENCH_SEQ` (default 50) starts one after another,
//!   each removed before the next; p50/p99, next to runc's on the same
//!   containerd.
//!
//! Each figure is also split by mapping class (anonymous memory, the
//! process's own binary, libraries, the guest kernel and initrd files);
//! `VEIL_BENCH_SMAPS_DIR=<dir>` copies every measured process's raw smaps
//! there.
//!
//! Results: `benches/results/pods.json`, `pods-start.png` (distributions),
//! `pods-footprint.png`.
//!
//! Run: `cargo bench -p veil-benches --bench pods` (needs root and
//! `ci/build-artefacts.sh`).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use veil_benches::plot;
use veil_test_support::containerd::{processes, Containerd};

const NS: &str = "veil-bench";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// `ctr run -d … sleep` for `id`; how long until `ctr` returned.
fn start(c: &Containerd, rt: Option<&str>, id: &str) -> Result<Duration> {
    let mut cmd = veil_benches::ctr_run(c, NS, rt, &["-d"], id);
    cmd.args(["sleep", "100000"]);
    let t = Instant::now();
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "{id}: ctr run -d failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(t.elapsed())
}

/// The value at quantile `q` of sorted `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What a mapping of a process holds, from its name in `smaps`.
fn mapping_class(name: &str, exe: &str) -> &'static str {
    if name.contains("memfd:") {
        GUEST_RAM
    } else if name.is_empty()
        || name.starts_with("[heap]")
        || name.starts_with("[stack")
        || name.starts_with("[anon")
    {
        "anonymous"
    } else if !exe.is_empty() && name.starts_with(exe) {
        "own binary"
    } else if name.contains(".so") {
        "libraries"
    } else if name.ends_with("/vmlinux") || name.ends_with("/bzImage") {
        "guest kernel file"
    } else if name.contains("initrd") {
        "initrd file"
    } else {
        "other"
    }
}

/// The mapping class of guest RAM, left out of QEMU's figures.
const GUEST_RAM: &str = "guest RAM (memfd)";

/// PSS and RSS (KiB) of `pid` per mapping class (see [`mapping_class`]).
fn smaps_classes(pid: u32) -> Result<Classes> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut out = Classes::new();
    let mut class = "other";
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let Some(first) = f.next() else { continue };
        if !first.ends_with(':') {
            // A mapping's header: "start-end perms offset dev inode [name]".
            let name = line
                .splitn(6, char::is_whitespace)
                .nth(5)
                .unwrap_or("")
                .trim();
            class = mapping_class(name, &exe);
            continue;
        }
        let kib: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let e = out.entry(class).or_default();
        match first {
            "Pss:" => e.0 += kib,
            "Rss:" => e.1 += kib,
            _ => {}
        }
    }
    Ok(out)
}

/// (PSS, RSS) KiB per mapping class of one process.
type Classes = BTreeMap<&'static str, (u64, u64)>;

/// The total (PSS, RSS) of `c`, without guest RAM when `skip_guest_ram`.
fn total(c: &Classes, skip_guest_ram: bool) -> (u64, u64) {
    c.iter()
        .filter(|(k, _)| !(skip_guest_ram && **k == GUEST_RAM))
        .fold((0, 0), |a, (_, v)| (a.0 + v.0, a.1 + v.1))
}

/// One component of a pod: its total (PSS, RSS) KiB and its classes.
struct Part {
    total: (u64, u64),
    classes: Classes,
}

/// Per component, the figures of each running pod in `ids`.
fn footprint(ids: &[String]) -> Result<BTreeMap<&'static str, Vec<Part>>> {
    let procs = processes();
    let mut out: BTreeMap<&'static str, Vec<Part>> = BTreeMap::new();
    for id in ids {
        // `/run/veil/<id>/…` (or `-id <id>`) is in each of the pod's command lines.
        let of = |pat: &str| {
            procs
                .iter()
                .find(|(_, cmd)| {
                    cmd.contains(pat)
                        && (cmd.contains(&format!("/{id}/")) || cmd.contains(&format!("-id {id} ")))
                })
                .map(|(p, _)| *p)
        };
        let parts: [(&'static str, &str, bool, bool); 4] = [
            ("shim", "containerd-shim-veil-v2", false, true),
            ("QEMU (without guest RAM)", "qemu-system", true, true),
            ("vhost-device-vsock", "vhost-device-vsock", false, true),
            ("virtiofsd", "virtiofsd", false, false),
        ];
        for (name, pat, skip_guest_ram, required) in parts {
            match of(pat) {
                Some(pid) => {
                    if let Some(dir) = std::env::var_os("VEIL_BENCH_SMAPS_DIR") {
                        // For a closer look: the raw smaps of every process measured.
                        let to = std::path::Path::new(&dir).join(format!("{id}-{pat}.smaps"));
                        std::fs::copy(format!("/proc/{pid}/smaps"), &to).with_context(|| {
                            format!("copying smaps of {pid} to {}", to.display())
                        })?;
                    }
                    let mut classes = smaps_classes(pid)?;
                    let total = total(&classes, skip_guest_ram);
                    if skip_guest_ram {
                        classes.remove(GUEST_RAM);
                    }
                    out.entry(name).or_default().push(Part { total, classes });
                }
                None if required => bail!("pod {id}: no {pat} process found"),
                None => {}
            }
        }
    }
    Ok(out)
}

/// Starts `n` pods at once; their start times (ms), sorted, and the
/// failures. Every pod that was created is removed before this returns.
fn parallel(c: &Containerd, rt: &str, n: usize) -> Result<(Vec<f64>, Vec<String>, Vec<String>)> {
    let ids: Vec<String> = (0..n).map(|i| format!("par{n}-{i:02}")).collect();
    let results: Vec<Result<Duration>> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| s.spawn(|| start(c, Some(rt), id)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("start thread panicked")))
            .collect()
    });
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for (id, r) in ids.iter().zip(results) {
        match r {
            Ok(d) => times.push(ms(d)),
            Err(e) => failures.push(format!("{id}: {e:#}")),
        }
    }
    times.sort_by(f64::total_cmp);
    Ok((times, failures, ids))
}

fn remove_all(c: &Containerd, ids: &[String]) -> Result<()> {
    let mut errors = Vec::new();
    for id in ids {
        if let Err(e) = c.kill_and_remove(NS, id) {
            // A pod that never got created has nothing to remove.
            let text = format!("{e:#}");
            if !text.contains("not found") {
                errors.push(format!("{id}: {text}"));
            }
        }
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    c.wait_clean(&refs)?;
    if !errors.is_empty() {
        bail!("removing pods: {}", errors.join("; "));
    }
    Ok(())
}

fn sequential(c: &Containerd, rt: Option<&str>, tag: &str, n: usize) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for i in 0..n {
        let id = format!("seq-{tag}-{i:02}");
        v.push(ms(start(c, rt, &id)?));
        c.kill_and_remove(NS, &id)?;
    }
    v.sort_by(f64::total_cmp);
    Ok(v)
}

fn main() -> Result<()> {
    let (_a, c, _work, rt) = veil_benches::bench_containerd(NS)?;
    let batches: Vec<usize> = env_or("VEIL_BENCH_PARALLEL", "10,20")
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let n_seq: usize = env_or("VEIL_BENCH_SEQ", "50").parse().unwrap_or(50);
    let accel = veil_benches::accel_name();

    // Warm-up: the image unpacked and converted once.
    start(&c, Some(&rt), "warm")?;
    c.kill_and_remove(NS, "warm")?;

    let mut json_batches = Vec::new();
    let mut dists: Vec<(String, Vec<f64>)> = Vec::new();
    let mut fp = None;
    for (k, &n) in batches.iter().enumerate() {
        let (times, failures, ids) = parallel(&c, &rt, n)?;
        if k == 0 && failures.is_empty() {
            std::thread::sleep(Duration::from_secs(2));
            fp = Some(footprint(&ids)?);
        }
        let removed = remove_all(&c, &ids);
        println!(
            "{n} pods at once: {} ran, p50 {:.0} ms, p99 {:.0} ms, removed with nothing left: {}",
            times.len(),
            quantile(&times, 0.5),
            quantile(&times, 0.99),
            if removed.is_ok() { "yes" } else { "NO" }
        );
        for f in &failures {
            println!("  failed: {f}");
        }
        json_batches.push(serde_json::json!({
            "pods": n, "ran": times.len(), "p50": quantile(&times, 0.5),
            "p99": quantile(&times, 0.99), "samples": times, "failures": failures,
            "removed_clean": removed.is_ok(),
        }));
        dists.push((format!("{n} veil pods at once"), times));
        removed?;
        if !json_batches
            .last()
            .and_then(|b| b["failures"].as_array())
            .is_some_and(|f| f.is_empty())
        {
            println!("not every pod of {n} ran: larger batches skipped");
            break;
        }
    }

    let seq_veil = sequential(&c, Some(&rt), "veil", n_seq)?;
    let seq_runc = sequential(&c, None, "runc", n_seq)?;
    for (name, v) in [("veil", &seq_veil), ("runc", &seq_runc)] {
        println!(
            "{n_seq} sequential {name} starts (ctr run -d): p50 {:.0} ms, p99 {:.0} ms",
            quantile(v, 0.5),
            quantile(v, 0.99)
        );
    }
    dists.push((format!("veil, {n_seq} one after another"), seq_veil.clone()));
    dists.push((format!("runc, {n_seq} one after another"), seq_runc.clone()));

    let mut fp_json = serde_json::Map::new();
    let mut fp_bars = Vec::new();
    if let Some(fp) = &fp {
        println!(
            "host footprint per pod with {} running (KiB, medians over the pods):",
            batches[0]
        );
        for (name, v) in fp {
            let med = |f: &dyn Fn(&Part) -> u64| {
                plot::median_of(&v.iter().map(|p| f(p) as f64).collect::<Vec<_>>())
            };
            let pss = med(&|p| p.total.0);
            let rss = med(&|p| p.total.1);
            println!("  {name:<28} PSS {pss:>8.0}   RSS {rss:>8.0}");
            let mut by_class = serde_json::Map::new();
            let mut pss_segs = Vec::new();
            let mut rss_segs = Vec::new();
            let classes: std::collections::BTreeSet<&str> =
                v.iter().flat_map(|p| p.classes.keys().copied()).collect();
            for class in classes {
                let get = |p: &Part, i: usize| {
                    p.classes
                        .get(class)
                        .map_or(0, |c| if i == 0 { c.0 } else { c.1 })
                };
                let (cp, cr) = (med(&|p| get(p, 0)), med(&|p| get(p, 1)));
                println!("      {class:<24} PSS {cp:>8.0}   RSS {cr:>8.0}");
                by_class.insert(
                    class.to_string(),
                    serde_json::json!({"pss_kib": cp, "rss_kib": cr}),
                );
                pss_segs.push((class.to_string(), cp / 1024.0));
                rss_segs.push((class.to_string(), cr / 1024.0));
            }
            fp_json.insert(
                name.to_string(),
                serde_json::json!({"pss_kib": pss, "rss_kib": rss, "by_mapping": by_class}),
            );
            fp_bars.push((format!("{name}, PSS"), pss_segs));
            fp_bars.push((format!("{name}, RSS"), rss_segs));
        }
    }
    let json = serde_json::json!({
        "bench": "pods",
        "accel": accel,
        "parallel": json_batches,
        "sequential": {
            "n": n_seq,
            "veil": {"p50": quantile(&seq_veil, 0.5), "p99": quantile(&seq_veil, 0.99), "samples": seq_veil},
            "runc": {"p50": quantile(&seq_runc, 0.5), "p99": quantile(&seq_runc, 0.99), "samples": seq_runc},
        },
        "footprint_per_pod": fp_json,
    });
    let j = plot::write_json("pods", &json)?;
    let d = plot::distribution(
        "pods-start",
        &format!("pod start (ctr run -d until it returned), accel {accel}"),
        "ms",
        &dists,
    )?;
    println!("results: {} {}", j.display(), d.display());
    if !fp_bars.is_empty() {
        let f = plot::stacked(
            "pods-footprint",
            &format!(
                "host memory per pod outside guest RAM, {} pods running (medians per mapping class)",
                batches[0]
            ),
            "MiB",
            &fp_bars,
        )?;
        println!("         {}", f.display());
    }
    Ok(())
}
