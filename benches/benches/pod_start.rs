//! Pod start latency through containerd: `ctr run --rm IMAGE ID echo hi` with
//! the veil runtime, next to runc on the same (private) containerd and to the
//! bare-boot floor (QEMU spawn → a trivial `/init` printing, same kernel and
//! VM shape), all measured in the same run, interleaved. The veil runs are
//! split into phases from the shim's `veil-phases` log line (see
//! `veil_shim::phases`). Also reports the host memory of one running pod
//! outside guest RAM: the shim, QEMU (without its guest-RAM memfd) and the
//! vsock backend.
//!
//! Teardown is split the same way, from the shim's `veil-teardown` line:
//! the container's exit → TaskExit published → containerd's Delete →
//! container removed in the guest → image detached → Delete answered →
//! `ctr run --rm` returned (the bench's own clock), and after that the
//! shim's Shutdown → agent stopped → VM stopped → backend stopped → state
//! removed.
//!
//! A second leg starts `veil-sim` pods the same way, interleaved with floor
//! boots of its own: a private containerd and `veil-kbs` as in the storage
//! tests, so each pod attests, is released its disk key and formats its
//! encrypted scratch disk under it (`VEIL_BENCH_SIM=0` skips the leg).
//!
//! Results: `benches/results/pod_start.{json,png}` (the PNG stacks the
//! phases next to the floor and runc).
//!
//! Run: `cargo bench -p veil-benches --bench pod_start` (VEIL_BENCH_RUNS=N,
//! default 10; needs root and `ci/build-artefacts.sh`).

use std::{
    collections::HashMap,
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use veil_benches::plot;
use veil_benches::ShimReports;
use veil_benches::{floor_once, ms, report, runs, summarize, Summary};
use veil_shim::phases::{now_ns, parse_line};
use veil_test_support::{
    containerd::Containerd,
    oci,
    storage::{Confidential, NS as SIM_NS},
};

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

/// Runs `ctr run --rm … echo hi`; its duration and when it returned (ns
/// since the epoch, the clock of the shim's marks).
fn ctr_run(c: &Containerd, veil: Option<&str>, id: &str) -> Result<(Duration, u128)> {
    let mut cmd = veil_benches::ctr_run(c, NS, veil, &["--rm"], id);
    cmd.args(["echo", "hi"]);
    let t = Instant::now();
    let out = cmd.output()?;
    let took = t.elapsed();
    let returned = now_ns();
    check(&out, id)?;
    Ok((took, returned))
}

/// The shim's teardown marks for pod `id` (its `teardown` report, written
/// once the shim stopped the pod, which is after `ctr` returned).
fn teardown_of(reports: &ShimReports, id: &str) -> Result<HashMap<String, u128>> {
    let v = reports.take(id, "teardown", Duration::from_secs(15))?;
    reports.discard(id);
    let marks = v["phases"]
        .as_object()
        .with_context(|| format!("teardown report of {id} has no phases: {v}"))?;
    Ok(marks
        .iter()
        .filter_map(|(k, t)| t.as_u64().map(|t| (k.clone(), u128::from(t))))
        .collect())
}

/// Teardown phases as (name, from mark, to mark); `returned` is when `ctr`
/// returned. Consecutive, so they stack.
const TEARDOWN: &[(&str, &str, &str)] = &[
    ("exit → TaskExit published", "exited", "exit_published"),
    ("→ containerd's Delete", "exit_published", "delete"),
    (
        "Delete: container removed in the guest",
        "delete",
        "removed",
    ),
    ("Delete: image detached", "removed", "image_detached"),
    ("Delete answered", "image_detached", "deleted"),
    ("→ ctr run --rm returned", "deleted", "returned"),
];

/// After `ctr` returned: the shim stopping the pod.
const AFTER: &[(&str, &str, &str)] = &[
    ("Delete answered → Shutdown", "deleted", "shutdown"),
    ("Shutdown → agent stopped", "shutdown", "agent_stopped"),
    ("→ VM stopped", "agent_stopped", "vm_stopped"),
    ("→ backend stopped", "vm_stopped", "backend_stopped"),
    ("→ state removed", "backend_stopped", "state_removed"),
    ("exit → ctr run --rm returned", "exited", "returned"),
    ("exit → state removed", "exited", "state_removed"),
];

/// The start marks stacked in the plot: the shim's marks from Create on
/// (without `container_created`, which the container start phase spans).
fn start_segments() -> Vec<&'static str> {
    veil_shim::phases::MARKS
        .iter()
        .copied()
        .skip_while(|m| *m != "create")
        .filter(|m| *m != "container_created")
        .collect()
}

fn span(marks: &HashMap<String, u128>, from: &str, to: &str) -> Option<Duration> {
    let (a, b) = (marks.get(from)?, marks.get(to)?);
    Some(Duration::from_nanos(
        u64::try_from(b.saturating_sub(*a)).unwrap_or(0),
    ))
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
        "attestation (→ keys released)",
        &["agent_ready"],
        "attested",
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

/// The phase marks of container `id`, waiting for them: the shim's log
/// reaches containerd's log asynchronously.
fn wait_phases(c: &Containerd, id: &str) -> Result<HashMap<String, u128>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(m) = phases_of(c, id) {
            return Ok(m);
        }
        if Instant::now() > deadline {
            bail!("no veil-phases line for {id}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Adds one start's phases ([`PHASES`]) and plot segments.
fn collect_start(
    marks: &HashMap<String, u128>,
    phases: &mut HashMap<&'static str, Vec<Duration>>,
    segments: &mut HashMap<String, Vec<Duration>>,
) {
    for (name, from, to) in PHASES {
        let a = from.iter().find_map(|m| marks.get(*m));
        if let (Some(a), Some(b)) = (a, marks.get(*to)) {
            let d = Duration::from_nanos(u64::try_from(b.saturating_sub(*a)).unwrap_or(0));
            phases.entry(name).or_default().push(d);
        }
    }
    let present: Vec<&str> = start_segments()
        .into_iter()
        .filter(|m| marks.contains_key(*m))
        .collect();
    for w in present.windows(2) {
        if let Some(d) = span(marks, w[0], w[1]) {
            segments.entry(w[1].to_string()).or_default().push(d);
        }
    }
}

/// The `veil-sim` leg's results.
struct Sim {
    floor: Summary,
    start: Summary,
    phases: HashMap<&'static str, Vec<Duration>>,
    segments: HashMap<String, Vec<Duration>>,
}

/// `veil-sim` pods, attesting to a broker, each start next to a floor boot.
fn sim_leg(n: usize) -> Result<Sim> {
    let env = Confidential::new()?;
    let root_hash = env.busybox_root_hash()?;
    env.resources(&root_hash)?;
    env.register("pod-start-bench", |_| {})?;
    let _broker = env.start_broker("pod-start-bench")?;
    let (mut floor, mut starts) = (Vec::new(), Vec::new());
    let (mut phases, mut segments) = (HashMap::new(), HashMap::new());
    let one = |id: &str| -> Result<()> {
        let mut args = env.run_args("veil-sim", oci::BUSYBOX_IMAGE);
        args.extend(["--rm", oci::BUSYBOX_IMAGE, id, "echo", "hi"].map(String::from));
        let out = env.c.ctr(SIM_NS).args(&args).output()?;
        check(&out, id)
    };
    one("sim-warm")?;
    for i in 0..n {
        floor.push(floor_once(&env.a)?);
        let id = format!("sim-{i}");
        one(&id)?;
        let marks = wait_phases(&env.c, &id)?;
        let start = span(&marks, "create", "container_started")
            .with_context(|| format!("{id}: no create/container_started marks"))?;
        if !marks.contains_key("attested") {
            bail!("{id} did not attest (no `attested` mark): {marks:?}");
        }
        starts.push(start);
        collect_start(&marks, &mut phases, &mut segments);
        eprintln!(
            "veil-sim run {}/{n}: floor {}, Create → started {}",
            i + 1,
            ms(floor[i]),
            ms(start)
        );
    }
    env.c.wait_clean(&[])?;
    Ok(Sim {
        floor: summarize(&floor),
        start: summarize(&starts),
        phases,
        segments,
    })
}

/// Prints the `veil-sim` leg next to its floor.
fn report_sim(s: &Sim) {
    println!("veil-sim (attesting to veil-kbs, encrypted scratch disk under the released key):");
    report("  floor, booted beside these starts", &s.floor);
    for (name, _, _) in PHASES {
        if let Some(v) = s.phases.get(name).filter(|v| !v.is_empty()) {
            report(&format!("  {name}"), &summarize(v));
        }
    }
    println!(
        "veil-sim against its floor (medians): pod start {:.2}x",
        s.start.median.as_secs_f64() / s.floor.median.as_secs_f64().max(1e-9)
    );
}

fn main() -> Result<()> {
    let (a, c, _work, rt) = veil_benches::bench_containerd(NS)?;
    let reports = ShimReports::open(&c)?;
    let n = runs(10);

    // Warm-up: page cache, image unpacked, first-use costs.
    ctr_run(&c, None, "warm-runc")?;
    ctr_run(&c, Some(&rt), "warm-veil")?;
    reports.discard("warm-veil");

    let (mut floor, mut runc, mut veil) = (Vec::new(), Vec::new(), Vec::new());
    let mut phase_samples: HashMap<&str, Vec<Duration>> = HashMap::new();
    let mut segment_samples: HashMap<String, Vec<Duration>> = HashMap::new();
    for i in 0..n {
        floor.push(floor_once(&a)?);
        runc.push(ctr_run(&c, None, &format!("runc-{i}"))?.0);
        let id = format!("veil-{i}");
        let (took, returned) = ctr_run(&c, Some(&rt), &id)?;
        veil.push(took);
        let marks = wait_phases(&c, &id)?;
        collect_start(&marks, &mut phase_samples, &mut segment_samples);
        let mut down = teardown_of(&reports, &id)?;
        down.insert("returned".into(), returned);
        for (name, from, to) in TEARDOWN.iter().chain(AFTER) {
            if let Some(d) = span(&down, from, to) {
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
    println!("veil teardown (medians of the shim's marks; `returned` is ctr's return):");
    let med = |name: &str| {
        phase_samples
            .get(name)
            .filter(|s| !s.is_empty())
            .map(|s| summarize(s))
    };
    for (name, _, _) in TEARDOWN.iter().chain(AFTER) {
        if let Some(sum) = med(name) {
            report(&format!("  {name}"), &sum);
        }
    }
    let ratio = |d: Duration| d.as_secs_f64() / f.median.as_secs_f64().max(1e-9);
    if let (Some(p), Some(t)) = (pod_start, med("exit → ctr run --rm returned")) {
        println!(
            "against the floor (medians): pod start {:.2}x, teardown (exit → ctr returned) {:.2}x",
            ratio(p.median),
            ratio(t.median)
        );
    }
    footprint(&c, &rt)?;
    let sim = if std::env::var("VEIL_BENCH_SIM").as_deref() == Ok("0") {
        println!("veil-sim leg skipped (VEIL_BENCH_SIM=0)");
        None
    } else {
        let s = sim_leg(n)?;
        report_sim(&s);
        Some(s)
    };
    write_results(
        &f,
        &r,
        &v,
        &phase_samples,
        &segment_samples,
        sim.as_ref(),
        n,
    )?;
    Ok(())
}

fn msf(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The start segments' medians from Create on, in mark order, for a
/// stacked bar.
fn stacked_start(segments: &HashMap<String, Vec<Duration>>) -> Vec<(String, f64)> {
    start_segments()
        .iter()
        .skip(1)
        .filter_map(|m| {
            let s = segments.get(*m).filter(|s| !s.is_empty())?;
            Some((format!("→ {m}"), msf(summarize(s).median)))
        })
        .collect()
}

/// `benches/results/pod_start.json` and the stacked-phases PNG.
fn write_results(
    f: &Summary,
    r: &Summary,
    v: &Summary,
    phases: &HashMap<&str, Vec<Duration>>,
    segments: &HashMap<String, Vec<Duration>>,
    sim: Option<&Sim>,
    n: usize,
) -> Result<()> {
    let medians = |m: &HashMap<&str, Vec<Duration>>| -> serde_json::Map<String, serde_json::Value> {
        m.iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(k, s)| (k.to_string(), msf(summarize(s).median).into()))
            .collect()
    };
    let start = stacked_start(segments);
    let mut whole = start.clone();
    for (name, _, _) in TEARDOWN {
        if let Some(s) = phases.get(name).filter(|s| !s.is_empty()) {
            whole.push((name.to_string(), msf(summarize(s).median)));
        }
    }
    let json = serde_json::json!({
        "bench": "pod_start",
        "runs": n,
        "unit": "ms",
        "accel": veil_benches::accel_name(),
        "floor_median": msf(f.median),
        "runc_ctr_run_median": msf(r.median),
        "veil_ctr_run_median": msf(v.median),
        "phase_medians": medians(phases),
        "start_segments": start.iter().map(|(k, v)| serde_json::json!({"name": k, "median": v})).collect::<Vec<_>>(),
        "veil_sim": sim.map(|s| serde_json::json!({
            "floor_median": msf(s.floor.median),
            "start_median": msf(s.start.median),
            "phase_medians": medians(&s.phases),
            "start_segments": stacked_start(&s.segments).iter().map(|(k, v)| serde_json::json!({"name": k, "median": v})).collect::<Vec<_>>(),
        })),
    });
    let j = plot::write_json("pod_start", &json)?;
    let mut rows = vec![
        (
            "floor: QEMU spawn → /init prints".to_string(),
            vec![("floor boot".to_string(), msf(f.median))],
        ),
        ("veil: task Create → container started".to_string(), start),
        (
            "runc: ctr run --rm … echo hi".to_string(),
            vec![("runc ctr run".to_string(), msf(r.median))],
        ),
        ("veil: ctr run --rm (phases from Create)".to_string(), whole),
        (
            "veil: ctr run --rm … echo hi".to_string(),
            vec![("veil ctr run".to_string(), msf(v.median))],
        ),
    ];
    if let Some(s) = sim {
        rows.push((
            "floor, beside the veil-sim starts".to_string(),
            vec![("floor boot".to_string(), msf(s.floor.median))],
        ));
        rows.push((
            "veil-sim: task Create → container started".to_string(),
            stacked_start(&s.segments),
        ));
    }
    let png = plot::stacked(
        "pod_start",
        &format!(
            "pod start and teardown, medians of {n} (accel {})",
            veil_benches::accel_name()
        ),
        "ms",
        &rows,
    )?;
    println!("results: {} {}", j.display(), png.display());
    Ok(())
}
