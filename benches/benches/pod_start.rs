//! Pod start latency through containerd: `ctr run --rm IMAGE ID echo hi` with
//! the veil runtime, next to runc on the same (private) containerd and to the
//! bare-boot floor (QEMU spawn → a trivial `/init` printing, same kernel and
//! VM shape), all measured in the same run, interleaved. The veil runs are
//! split into phases from the shim's `veil-phases` log line (see
//! `veil_shim::phases`). Also reports the host memory of one running pod
//! outside guest RAM: the shim, QEMU (without its guest-RAM memfd) and the
//! vsock backend.
//!
//! Run: `cargo bench -p veil-benches --bench pod_start` (VEIL_BENCH_RUNS=N,
//! default 10; needs root and `ci/build-artefacts.sh`).

use std::{
    collections::HashMap,
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use veil_benches::{floor_once, ms, report, runs, summarize, Summary};
use veil_shim::phases::parse_line;
use veil_test_support::{containerd::Containerd, oci, Artefacts};

const NS: &str = "veil-bench";
fn check(out: &Output, what: &str) -> Result<()> {
    if !out.status.success() || String::from_utf8_lossy(&out.stdout) != "hi\n" {
        bail!(
            "{what}: {} {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn ctr_run(c: &Containerd, veil: Option<&str>, id: &str) -> Result<Duration> {
    let mut cmd = c.ctr(NS);
    cmd.args(["run", "--rm"]);
    if let Some(rt) = veil {
        cmd.args([
            "--runtime",
            "io.containerd.veil.v2",
            "--runtime-config-path",
            rt,
        ]);
    }
    cmd.args([oci::BUSYBOX_IMAGE, id, "echo", "hi"]);
    let t = Instant::now();
    let out = cmd.output()?;
    let took = t.elapsed();
    check(&out, id)?;
    Ok(took)
}

/// The phase marks the shim logged for container `id`.
fn phases_of(c: &Containerd, id: &str) -> Option<HashMap<String, u128>> {
    let log = c.log_text();
    let needle = format!("container={id} ");
    log.lines()
        .rfind(|l| {
            l.contains("veil-phases") && l.contains(&needle) && l.contains("container_started=")
        })
        .and_then(parse_line)
        .map(|v| v.into_iter().collect())
}

/// Phases as (name, from mark — the first of these present —, to mark).
const PHASES: &[(&str, &[&str], &str)] = &[
    (
        "shim start (start cmd → serving)",
        &["start_cmd"],
        "serving",
    ),
    (
        "VMM spawn (Create → QEMU running)",
        &["create"],
        "vmm_spawned",
    ),
    (
        "kernel boot (QEMU → agent on console)",
        &["vmm_spawned"],
        "kernel_booted",
    ),
    (
        "agent ready (→ health answer)",
        &["kernel_booted"],
        "agent_ready",
    ),
    (
        "scratch disk (→ LUKS2 formatted, ext4 mounted)",
        &["attested", "agent_ready"],
        "scratch_ready",
    ),
    (
        "rootfs attach (→ image in guest)",
        &["scratch_ready", "attested", "agent_ready"],
        "rootfs_attached",
    ),
    (
        "container start (→ process started)",
        &["rootfs_attached"],
        "container_started",
    ),
    (
        "pod start (Create → process started)",
        &["create"],
        "container_started",
    ),
];

fn kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Host memory of one running pod, outside guest RAM.
fn footprint(c: &Containerd, rt: &str) -> Result<()> {
    let out = c
        .ctr(NS)
        .args([
            "run",
            "-d",
            "--runtime",
            "io.containerd.veil.v2",
            "--runtime-config-path",
            rt,
            oci::BUSYBOX_IMAGE,
            "mem-pod",
            "sleep",
            "1000",
        ])
        .output()?;
    if !out.status.success() {
        bail!("ctr run -d: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::thread::sleep(Duration::from_secs(2));
    let procs = veil_test_support::containerd::processes();
    let find = |pat: &str| -> Option<u32> {
        procs
            .iter()
            .find(|(_, cmd)| cmd.contains(pat) && cmd.contains("mem-pod"))
            .map(|(p, _)| *p)
    };
    let shim = find("containerd-shim-veil-v2").context("shim process")?;
    let qemu = find("qemu-system").context("QEMU process")?;
    let vsock = find("vhost-device-vsock").context("vsock backend")?;
    let shim_rss = kib(shim, "VmRSS:");
    let qemu_rss = kib(qemu, "VmRSS:");
    let qemu_shmem = kib(qemu, "RssShmem:");
    let vsock_rss = kib(vsock, "VmRSS:");
    println!("host memory of one pod (KiB, RSS; QEMU without its guest-RAM memfd):");
    println!("  shim                {shim_rss:>8}");
    println!(
        "  QEMU                {:>8}   (RSS {qemu_rss}, of which guest RAM {qemu_shmem})",
        qemu_rss.saturating_sub(qemu_shmem)
    );
    println!("  vhost-device-vsock  {vsock_rss:>8}");
    println!(
        "  total               {:>8}",
        shim_rss + qemu_rss.saturating_sub(qemu_shmem) + vsock_rss
    );
    let _ = c
        .ctr(NS)
        .args(["task", "kill", "-s", "KILL", "mem-pod"])
        .output();
    std::thread::sleep(Duration::from_secs(1));
    let _ = c.ctr(NS).args(["task", "delete", "mem-pod"]).output();
    let _ = c.ctr(NS).args(["containers", "delete", "mem-pod"]).output();
    Ok(())
}

fn main() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil");
    let n = runs(10);

    // Warm-up: page cache, image unpacked, first-use costs.
    ctr_run(&c, None, "warm-runc")?;
    ctr_run(&c, Some(&rt), "warm-veil")?;

    let (mut floor, mut runc, mut veil) = (Vec::new(), Vec::new(), Vec::new());
    let mut phase_samples: HashMap<&str, Vec<Duration>> = HashMap::new();
    for i in 0..n {
        floor.push(floor_once(&a)?);
        runc.push(ctr_run(&c, None, &format!("runc-{i}"))?);
        let id = format!("veil-{i}");
        veil.push(ctr_run(&c, Some(&rt), &id)?);
        // The shim's log reaches containerd's log asynchronously.
        let deadline = Instant::now() + Duration::from_secs(5);
        let marks = loop {
            if let Some(m) = phases_of(&c, &id) {
                break m;
            }
            if Instant::now() > deadline {
                bail!("no veil-phases line for {id}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for (name, from, to) in PHASES {
            let a = from.iter().find_map(|m| marks.get(*m));
            if let (Some(a), Some(b)) = (a, marks.get(*to)) {
                let d = Duration::from_nanos(u64::try_from(b.saturating_sub(*a)).unwrap_or(0));
                phase_samples.entry(name).or_default().push(d);
            }
        }
        eprintln!(
            "run {}/{n}: floor {}, runc {}, veil {}",
            i + 1,
            ms(floor[i]),
            ms(runc[i]),
            ms(veil[i])
        );
    }
    let (f, r, v) = (summarize(&floor), summarize(&runc), summarize(&veil));
    println!("pod start latency, {n} runs each, interleaved, one machine, one containerd");
    report("floor: QEMU spawn → trivial /init prints", &f);
    report("runc: ctr run --rm … echo hi", &r);
    report("veil: ctr run --rm … echo hi", &v);
    println!("veil phases (medians of the shim's marks):");
    let mut pod_start: Option<Summary> = None;
    for (name, _, _) in PHASES {
        if let Some(s) = phase_samples.get(name).filter(|s| !s.is_empty()) {
            let sum = summarize(s);
            report(&format!("  {name}"), &sum);
            if name.starts_with("pod start") {
                pod_start = Some(sum);
            }
        }
    }
    if let Some(p) = pod_start {
        println!(
            "pod start over the floor (medians): +{}",
            ms(p.median.saturating_sub(f.median))
        );
    }
    println!(
        "veil over runc, whole ctr run (medians): +{}",
        ms(v.median.saturating_sub(r.median))
    );
    footprint(&c, &rt)?;
    Ok(())
}
