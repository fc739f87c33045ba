//! stdio throughput through containerd's FIFOs: 100 MiB out of a
//! container's stdout and 100 MiB into its stdin, through `ctr run`, with
//! the veil runtime and with runc on the same private containerd, in the same
//! run, interleaved. Every transfer is checked byte for byte (SHA-256).
//!
//! - stdout: the container runs `yes <line> | head -c 100M`; the bench reads
//!   `ctr`'s stdout, from the first byte to EOF.
//! - stdin: `ctr run` (stdin attached: containerd 1.6's ctr has no `-i`) with `sha256sum`; the bench writes 100 MiB, closes,
//!   and times from the first byte written to the digest line.
//!
//! - floor: the same producer and consumer inside one running veil
//!   container (`ctr task exec`, nothing through stdio): what the guest's
//!   CPU allows under this accelerator, so that the transport's share of
//!   the cost can be told from the emulated CPU's.
//!
//! Results: `benches/results/stdio.{json,png}`.
//!
//! Run: `cargo bench -p veil-benches --bench stdio` (VEIL_BENCH_RUNS=N,
//! default 5; VEIL_BENCH_MIB=N, default 100; needs root and
//! `ci/build-artefacts.sh`).

use std::{
    io::{Read, Write},
    process::Stdio,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use veil_benches::{plot::median_of, runs};
use veil_test_support::containerd::Containerd;

const NS: &str = "veil-bench";
const MIB: usize = 1024 * 1024;
const LINE: &str = "veil-stdio-bench-0123456789";

fn mib() -> usize {
    std::env::var("VEIL_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// `ctr run --rm … ID` (runc when `veil` is `None`); the caller adds the
/// command.
fn run_cmd(c: &Containerd, veil: Option<&str>, id: &str) -> std::process::Command {
    veil_benches::ctr_run(c, NS, veil, &["--rm"], id)
}

/// What `yes LINE | head -c N` prints.
fn expected_stdout(n: usize) -> [u8; 32] {
    let line = format!("{LINE}\n");
    let mut h = Sha256::new();
    let mut left = n;
    while left > 0 {
        let take = left.min(line.len());
        h.update(&line.as_bytes()[..take]);
        left -= take;
    }
    h.finalize().into()
}

/// MiB/s out of the container's stdout.
fn stdout_once(c: &Containerd, veil: Option<&str>, id: &str, n: usize) -> Result<f64> {
    let mut child = run_cmd(c, veil, id)
        .args(["sh", "-c", &format!("yes {LINE} | head -c {n}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = child.stdout.take().context("ctr stdout")?;
    let mut buf = vec![0u8; MIB];
    let mut h = Sha256::new();
    let (mut total, mut first) = (0usize, None);
    loop {
        let k = out.read(&mut buf)?;
        if k == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        h.update(&buf[..k]);
        total += k;
    }
    let took = first.map(|f| f.elapsed()).unwrap_or_default();
    let status = child.wait()?;
    let digest: [u8; 32] = h.finalize().into();
    if !status.success() || total != n || digest != expected_stdout(n) {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        bail!(
            "{id}: {status}, {total} of {n} bytes, digest ok: {}; {err}",
            digest == expected_stdout(n)
        );
    }
    Ok(n as f64 / MIB as f64 / took.as_secs_f64().max(1e-9))
}

/// MiB/s into the container's stdin.
fn stdin_once(c: &Containerd, veil: Option<&str>, id: &str, n: usize) -> Result<f64> {
    let mut child = run_cmd(c, veil, id)
        .args(["sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().context("ctr stdin")?;
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    let mut h = Sha256::new();
    let start = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len());
        input.write_all(&chunk[..k])?;
        h.update(&chunk[..k]);
        left -= k;
    }
    drop(input);
    let out = child.wait_with_output()?;
    let took = start.elapsed();
    let want = hex::encode(h.finalize());
    let got = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !got.starts_with(&want) {
        bail!(
            "{id}: {} digest {got:?}, want {want}; {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(n as f64 / MIB as f64 / took.as_secs_f64().max(1e-9))
}

/// MiB/s of `pipeline` (which moves `n` bytes) run entirely inside the
/// running container `id`, timed around the exec.
fn floor_once(c: &Containerd, id: &str, exec: &str, pipeline: &str, n: usize) -> Result<f64> {
    let start = Instant::now();
    c.ctr_ok(
        NS,
        &["task", "exec", "--exec-id", exec, id, "sh", "-c", pipeline],
    )?;
    Ok(n as f64 / MIB as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

fn main() -> Result<()> {
    let (_a, c, _work, rt) = veil_benches::bench_containerd(NS)?;
    let (n_runs, n) = (runs(5), mib() * MIB);
    // The floor's container, started once and removed at the end.
    let floor_id = "veil-floor";
    let started = veil_benches::ctr_run(&c, NS, Some(&rt), &["-d"], floor_id)
        .args(["sleep", "100000"])
        .output()?;
    if !started.status.success() {
        bail!(
            "starting the floor container: {}",
            String::from_utf8_lossy(&started.stderr)
        );
    }
    let result = measure(&c, &rt, floor_id, n_runs, n);
    let removed = c.kill_and_remove(NS, floor_id);
    let rows = result?;
    removed?;
    println!(
        "stdio through containerd's FIFOs, {} MiB each way, {n_runs} runs, medians, byte-exact:",
        n / MIB
    );
    for (name, v) in &rows {
        println!("  {name:<30} {:>8.1} MiB/s", median_of(v));
    }
    let m = |i: usize| median_of(&rows[i].1);
    println!(
        "  veil/runc: stdout {:.1} %, stdin {:.1} %; veil/in-guest floor: stdout {:.0} %, stdin {:.0} %",
        100.0 * m(1) / m(0),
        100.0 * m(4) / m(3),
        100.0 * m(1) / m(2),
        100.0 * m(4) / m(5),
    );
    let json = serde_json::json!({
        "bench": "stdio",
        "mib": n / MIB,
        "runs": n_runs,
        "unit": "MiB/s",
        "accel": veil_benches::accel_name(),
        "series": rows.iter().map(|(name, v)| serde_json::json!({
            "name": name, "median": median_of(v), "samples": v,
        })).collect::<Vec<_>>(),
    });
    let j = veil_benches::plot::write_json("stdio", &json)?;
    let bars: Vec<(String, f64)> = rows
        .iter()
        .map(|(name, v)| (name.to_string(), median_of(v)))
        .collect();
    let png = veil_benches::plot::bars(
        "stdio",
        &format!(
            "stdio through containerd's FIFOs, {} MiB, medians of {n_runs}",
            n / MIB
        ),
        "MiB/s",
        &bars,
    )?;
    println!("results: {} {}", j.display(), png.display());
    Ok(())
}

type Rows = Vec<(&'static str, Vec<f64>)>;

fn measure(c: &Containerd, rt: &str, floor_id: &str, n_runs: usize, n: usize) -> Result<Rows> {
    let mut rows: Rows = vec![
        ("runc stdout", Vec::new()),
        ("veil stdout", Vec::new()),
        ("veil stdout floor (in guest)", Vec::new()),
        ("runc stdin", Vec::new()),
        ("veil stdin", Vec::new()),
        ("veil stdin floor (in guest)", Vec::new()),
    ];
    let out_pipeline = format!("yes {LINE} | head -c {n} > /dev/null");
    let in_pipeline = format!("head -c {n} /dev/zero | sha256sum > /dev/null");
    for i in 0..n_runs {
        rows[0]
            .1
            .push(stdout_once(c, None, &format!("runc-out-{i}"), n)?);
        rows[1]
            .1
            .push(stdout_once(c, Some(rt), &format!("veil-out-{i}"), n)?);
        rows[2].1.push(floor_once(
            c,
            floor_id,
            &format!("fo-{i}"),
            &out_pipeline,
            n,
        )?);
        rows[3]
            .1
            .push(stdin_once(c, None, &format!("runc-in-{i}"), n)?);
        rows[4]
            .1
            .push(stdin_once(c, Some(rt), &format!("veil-in-{i}"), n)?);
        rows[5].1.push(floor_once(
            c,
            floor_id,
            &format!("fi-{i}"),
            &in_pipeline,
            n,
        )?);
        eprintln!(
            "run {}/{n_runs}: {}",
            i + 1,
            rows.iter()
                .map(|(name, v)| format!("{name} {:.1} MiB/s", v[i]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(rows)
}
