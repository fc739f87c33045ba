//! Leaks over many pods: `VEIL_BENCH_CYCLES` (default 200) create/delete
//! cycles through a private containerd (`ctr run --rm … echo`), one after
//! another, over three images in the order A, B, A, C (A: busybox; B and C:
//! busybox with 3 MiB of their own data) with an image cache bound
//! (`image_cache_mib`, `VEIL_BENCH_CACHE_MIB`, default 8) that holds A and
//! one of B and C: A is reused from the cache, B and C push each other out,
//! so every cycle exercises a hit, a build or a collection.
//!
//! Sampled before the first cycle, after the first round of four (the
//! baseline: containerd and the cache have warmed up), every 50 cycles and
//! after the last, with no pod running:
//! - processes: shims, QEMU, vhost-device-vsock, virtiofsd;
//! - mounts (`/proc/self/mountinfo` lines), loop devices with a backing file
//!   and device-mapper devices (`/sys/block`);
//! - files under the veil state dir and the scratch dir;
//! - containerd's open fds (`/proc/<pid>/fd`);
//! - the image cache: images, bytes, references, temporary files.
//!
//! Fails (non-zero exit) when any count at the end is above the baseline
//! (rechecked for 10 s: containerd closes connections lazily), when a
//! sample finds a reference or a temporary file, or the cache above its
//! bound. Results: `benches/results/cycles.json`, `cycles.png` (each
//! metric's samples along its row: a leak shows as a spread).
//!
//! Run: `flock /tmp/veil-vm.lock cargo bench -p veil-benches --bench cycles`
//! (needs root and `ci/build-artefacts.sh`; about 4 s a cycle under TCG).

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Result};
use veil_benches::plot;
use veil_test_support::{
    containerd::{output_text, processes, veil_config, Containerd},
    oci, Artefacts,
};

const NS: &str = "veil-bench";
const IMAGE_B: &str = "docker.io/veil-test/busybox-b:1";
const IMAGE_C: &str = "docker.io/veil-test/busybox-c:1";
/// Cycles between samples.
const EVERY: usize = 50;
/// Cycles in the warm-up round before the baseline.
const WARMUP: usize = 4;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One sample: metric name → value.
type Sample = BTreeMap<&'static str, u64>;

/// Metrics that must not grow past the baseline.
const COUNTS: &[&str] = &[
    "processes",
    "mounts",
    "loop_dm_devices",
    "state_files",
    "scratch_files",
    "containerd_fds",
];

fn count_files(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => 1 + count_files(&e.path()),
            _ => 1,
        })
        .sum()
}

fn devices() -> u64 {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return 0;
    };
    rd.flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("dm-")
                || (n.starts_with("loop") && e.path().join("loop/backing_file").exists())
        })
        .count() as u64
}

fn sample(c: &Containerd, state_dir: &Path) -> Sample {
    let procs = processes()
        .into_iter()
        .filter(|(_, cmd)| {
            let exe = cmd.split_whitespace().next().unwrap_or("");
            [
                "containerd-shim-veil-v2",
                "qemu-system",
                "vhost-device-vsock",
                "virtiofsd",
            ]
            .iter()
            .any(|n| exe.contains(n))
        })
        .count() as u64;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().count() as u64)
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{}/fd", c.pid()))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let (mut images, mut bytes, mut refs, mut temps) = (0, 0, 0, 0);
    for e in std::fs::read_dir(&c.image_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let blocks = e.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
        if name.ends_with(".tmp") {
            temps += 1;
        } else if name.ends_with(".refs") {
            refs += count_files(&e.path());
        } else if name.ends_with(".erofs") || name.ends_with(".ext4") {
            images += 1;
            bytes += blocks;
        } else if name.ends_with(".verity") {
            bytes += blocks;
        }
    }
    Sample::from([
        ("processes", procs),
        ("mounts", mounts),
        ("loop_dm_devices", devices()),
        ("state_files", count_files(state_dir)),
        ("scratch_files", count_files(&c.scratch_dir)),
        ("containerd_fds", fds),
        ("cache_images", images),
        ("cache_bytes", bytes),
        ("cache_refs", refs),
        ("cache_temps", temps),
    ])
}

fn run(c: &Containerd, rt: &str, image: &str, id: &str) -> Result<Output> {
    Ok(c.ctr(NS)
        .args(["run", "--rm", "--runtime", "io.containerd.veil.v2"])
        .args(["--runtime-config-path", rt, image, id, "echo", "hi"])
        .output()?)
}

/// Problems a sample shows by itself (nothing runs while it is taken).
fn check_cache(s: &Sample, bound: u64) -> Vec<String> {
    let mut bad = Vec::new();
    if s["cache_refs"] > 0 {
        bad.push(format!("{} image references with no pod", s["cache_refs"]));
    }
    if s["cache_temps"] > 0 {
        bad.push(format!("{} temporary image files", s["cache_temps"]));
    }
    if s["cache_bytes"] > bound {
        bad.push(format!(
            "cache holds {} bytes, above its bound of {bound}",
            s["cache_bytes"]
        ));
    }
    bad
}

fn main() -> Result<()> {
    let cycles = env_usize("VEIL_BENCH_CYCLES", 200).max(WARMUP);
    let bound_mib = env_usize("VEIL_BENCH_CACHE_MIB", 8) as u64;
    let bound = bound_mib << 20;
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    for (name, seed) in [(IMAGE_B, 1u32), (IMAGE_C, 2)] {
        let data: Vec<u8> = (0..3u32 << 20)
            .map(|i| (i.wrapping_add(seed << 24).wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (archive, _) = oci::busybox_archive_with(work.path(), name, &[("/data", &data)])?;
        c.import(NS, &archive)?;
    }
    std::fs::write(
        &c.veil_config,
        format!(
            "image_cache_mib = {bound_mib}\n{}",
            veil_config(&a, &c.image_dir)
        ),
    )?;
    let state_dir = c.veil_settings()?.state_dir;
    let rt = c.runtime_config("veil");
    let order = [oci::BUSYBOX_IMAGE, IMAGE_B, oci::BUSYBOX_IMAGE, IMAGE_C];

    let mut samples: Vec<(usize, Sample)> = vec![(0, sample(&c, &state_dir))];
    let mut problems = Vec::new();
    let mut cycle_ms = Vec::new();
    let started = Instant::now();
    for i in 1..=cycles {
        let id = format!("cycle-{i}");
        let t = Instant::now();
        let out = run(&c, &rt, order[(i - 1) % order.len()], &id)?;
        if !out.status.success() || String::from_utf8_lossy(&out.stdout) != "hi\n" {
            bail!("cycle {i}: ctr run failed: {}", output_text(&out));
        }
        c.wait_clean(&[id.as_str()])?;
        cycle_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if i == WARMUP || i % EVERY == 0 || i == cycles {
            let s = sample(&c, &state_dir);
            for p in check_cache(&s, bound) {
                problems.push(format!("after cycle {i}: {p}"));
            }
            println!("after cycle {i:>4}: {s:?}");
            samples.push((i, s));
        }
    }
    let elapsed = started.elapsed();

    let baseline = samples
        .iter()
        .find(|(i, _)| *i == WARMUP)
        .map(|(_, s)| s.clone())
        .unwrap_or_default();
    let grown = |s: &Sample| -> Vec<String> {
        COUNTS
            .iter()
            .filter(|m| s[**m] > baseline[**m])
            .map(|m| format!("{m}: {} → {}", baseline[*m], s[*m]))
            .collect()
    };
    let mut last = samples.last().map(|(_, s)| s.clone()).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !grown(&last).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        last = sample(&c, &state_dir);
    }
    let growth = grown(&last);
    problems.extend(
        growth
            .iter()
            .map(|g| format!("grew over {cycles} cycles: {g}")),
    );

    let json = serde_json::json!({
        "bench": "cycles",
        "cycles": cycles,
        "accel": veil_benches::accel_name(),
        "images": order,
        "cache_bound_bytes": bound,
        "elapsed_s": elapsed.as_secs_f64(),
        "cycle_ms_median": plot::median_of(&cycle_ms),
        "baseline_after_cycle": WARMUP,
        "samples": samples.iter().map(|(i, s)| serde_json::json!({"after_cycle": i, "values": s})).collect::<Vec<_>>(),
        "final": last,
        "problems": problems,
    });
    let j = plot::write_json("cycles", &json)?;
    let mut series: Vec<(String, Vec<f64>)> = COUNTS
        .iter()
        .chain(&["cache_images", "cache_refs", "cache_temps"])
        .map(|m| {
            (
                format!("{m} (baseline {})", baseline[*m]),
                samples.iter().map(|(_, s)| s[*m] as f64).collect(),
            )
        })
        .collect();
    series.push((
        format!("cache MiB (bound {bound_mib})"),
        samples
            .iter()
            .map(|(_, s)| s["cache_bytes"] as f64 / (1 << 20) as f64)
            .collect(),
    ));
    let png = plot::distribution(
        "cycles",
        &format!(
            "{cycles} create/delete cycles: each metric sampled before, after {WARMUP}, every {EVERY} and at the end"
        ),
        "",
        &series,
    )?;
    println!(
        "{cycles} cycles in {:.0} s (median {:.0} ms a cycle); results: {}, {}",
        elapsed.as_secs_f64(),
        plot::median_of(&cycle_ms),
        j.display(),
        png.display()
    );
    ensure!(
        problems.is_empty(),
        "leaks over {cycles} cycles:\n{}",
        problems.join("\n")
    );
    println!("no growth: every count at or below its value after cycle {WARMUP}");
    Ok(())
}
