//! stdio of veil containers through containerd's FIFOs, with `ctr` as the
//! client, on a private containerd the test starts:
//!
//! - 100 MiB into a container's stdin and 100 MiB out of its stdout arrive
//!   intact (SHA-256);
//! - an exec writing 1 MiB returns it whole; an exec whose shell leaves a
//!   background child holding stdout returns when the shell exits;
//! - a container running `yes` is killed promptly with `ctr` reading its
//!   output, and detached with nobody reading;
//! - afterwards nothing is left behind.
//!
//! The times printed are for the record; the throughput comparison with runc
//! is `cargo bench -p veil-benches --bench stdio`.

use std::{
    io::{Read, Write},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use veil_tests::{
    containerd::{output_text, Containerd},
    oci, Artefacts,
};

const NS: &str = "veil-stdio";
const RUNTIME: &str = "io.containerd.veil.v2";
const MIB: usize = 1024 * 1024;
/// Beyond this a kill or an exec counts as hung (they take well under a
/// second here when they work).
const HUNG: Duration = Duration::from_secs(10);

fn run(c: &Containerd, rt: &str, extra: &[&str], id: &str, cmd: &[&str]) -> std::process::Command {
    let mut ctr = c.ctr(NS);
    ctr.args(["run", "--runtime", RUNTIME, "--runtime-config-path", rt]);
    ctr.args(extra);
    ctr.args([oci::BUSYBOX_IMAGE, id]);
    ctr.args(cmd);
    ctr
}

/// Reads `from` to EOF: (bytes, SHA-256).
fn digest_of(mut from: impl Read) -> Result<(usize, [u8; 32])> {
    let mut buf = vec![0u8; MIB];
    let mut h = Sha256::new();
    let mut n = 0;
    loop {
        let k = from.read(&mut buf)?;
        if k == 0 {
            return Ok((n, h.finalize().into()));
        }
        h.update(&buf[..k]);
        n += k;
    }
}

/// Waits for `child` to exit within `limit`, killing it if it does not.
fn wait_within(child: &mut Child, limit: Duration, what: &str) -> Result<Duration> {
    let t = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_stopped(c: &Containerd, id: &str, limit: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let s = c.task_status(NS, id)?;
        if s == "STOPPED" || s.is_empty() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            bail!("task {id} is still {s} {limit:?} after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stdout_100m(c: &Containerd, rt: &str) -> Result<()> {
    let line = "veil-stdio-test-0123456789\n";
    let n = 100 * MIB;
    let mut child = run(
        c,
        rt,
        &["--rm"],
        "out-100m",
        &[
            "sh",
            "-c",
            &format!("yes {} | head -c {n}", line.trim_end()),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    let t = Instant::now();
    let (got, digest) = digest_of(child.stdout.take().context("ctr stdout")?)?;
    let took = t.elapsed();
    let out = child.wait_with_output()?;
    let mut want = Sha256::new();
    let whole = line.repeat(n / line.len() + 1);
    want.update(&whole.as_bytes()[..n]);
    let want: [u8; 32] = want.finalize().into();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(got, n, "stdout bytes");
    assert_eq!(digest, want, "stdout content");
    eprintln!(
        "100 MiB through stdout in {took:.2?} ({:.1} MiB/s)",
        100.0 / took.as_secs_f64()
    );
    Ok(())
}

fn stdin_100m(c: &Containerd, rt: &str) -> Result<()> {
    let n = 100 * MIB;
    let mut child = run(
        c,
        rt,
        &["--rm"],
        "in-100m",
        &["sh", "-c", "dd bs=65536 2>/tmp/e | sha256sum; cat /tmp/e"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    let mut input = child.stdin.take().context("ctr stdin")?;
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    let mut want = Sha256::new();
    let t = Instant::now();
    for i in 0..n / MIB {
        if let Err(e) = input.write_all(&chunk) {
            drop(input);
            let out = child.wait_with_output()?;
            bail!(
                "writing MiB {i} of stdin after {:?}: {e}; ctr: {}",
                t.elapsed(),
                output_text(&out)
            );
        }
        want.update(&chunk);
    }
    drop(input);
    let out = child.wait_with_output()?;
    let took = t.elapsed();
    let want = hex::encode(want.finalize());
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&want),
        "sha256sum of stdin: {}, want {want}",
        output_text(&out)
    );
    eprintln!(
        "100 MiB through stdin in {took:.2?} ({:.1} MiB/s)",
        100.0 / took.as_secs_f64()
    );
    Ok(())
}

fn execs(c: &Containerd, rt: &str) -> Result<()> {
    let id = "exec-host";
    c.ctr_ok(
        NS,
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            rt,
            oci::BUSYBOX_IMAGE,
            id,
            "sleep",
            "3600",
        ],
    )?;
    let result = (|| -> Result<()> {
        // 1 MiB through an exec's stdout.
        let mut child = c
            .ctr(NS)
            .args(["task", "exec", "--exec-id", "big", id])
            .args(["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' x"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut out = child.stdout.take().context("exec stdout")?;
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            out.read_to_end(&mut v).map(|_| v)
        });
        let took = wait_within(&mut child, HUNG, "an exec writing 1 MiB")?;
        let got = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        assert_eq!(got.len(), MIB, "exec stdout bytes");
        assert!(got.iter().all(|b| *b == b'x'), "exec stdout content");
        eprintln!("1 MiB through an exec in {took:.2?}");

        // A background child keeps stdout open: the exec still returns.
        let mut child = c
            .ctr(NS)
            .args(["task", "exec", "--exec-id", "bg", id])
            .args(["sh", "-c", "sleep 600 & echo started"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let took = wait_within(&mut child, HUNG, "an exec leaving `sleep 600 &`")?;
        let out = child.wait_with_output()?;
        assert!(out.status.success(), "{}", output_text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
        eprintln!("exec leaving a background child returned in {took:.2?}");
        Ok(())
    })();
    c.kill_and_remove(NS, id)?;
    result
}

/// `yes` with ctr attached and a reader draining it, then SIGKILL.
fn yes_attached(c: &Containerd, rt: &str) -> Result<()> {
    let id = "yes-attached";
    let mut child = run(c, rt, &[], id, &["yes"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().context("ctr stdout")?;
    let reader = std::thread::spawn(move || digest_of(out).map(|(n, _)| n));
    let result = (|| -> Result<()> {
        // Until output flows and the task runs.
        let t = Instant::now();
        while c.task_status(NS, id)? != "RUNNING" {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("yes never ran");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(2));
        c.ctr_ok(NS, &["task", "kill", "-s", "KILL", id])?;
        let took = wait_within(&mut child, HUNG, "ctr run of a killed `yes`")?;
        eprintln!("`yes` with a reader: ctr returned {took:.2?} after SIGKILL");
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    let moved = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    c.kill_and_remove(NS, id)?;
    result?;
    let moved = moved?;
    assert!(moved > MIB, "only {moved} bytes of `yes` arrived in 2 s");
    eprintln!(
        "`yes` moved {:.1} MiB before the kill",
        moved as f64 / MIB as f64
    );
    Ok(())
}

/// `yes` detached: ctr exits at once and nobody reads the FIFOs.
fn yes_detached(c: &Containerd, rt: &str) -> Result<()> {
    let id = "yes-detached";
    let out = run(c, rt, &["-d"], id, &["yes"]).output()?;
    if !out.status.success() {
        bail!("ctr run -d yes: {}", output_text(&out));
    }
    let result = (|| -> Result<()> {
        std::thread::sleep(Duration::from_secs(2));
        c.ctr_ok(NS, &["task", "kill", "-s", "KILL", id])?;
        let took = wait_stopped(c, id, HUNG)?;
        eprintln!("detached `yes`: STOPPED {took:.2?} after SIGKILL");
        Ok(())
    })();
    c.kill_and_remove(NS, id)?;
    result
}

#[test]
fn stdio_through_ctr_is_complete_and_never_holds_an_exit() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil");
    let pods = [
        "out-100m",
        "in-100m",
        "exec-host",
        "yes-attached",
        "yes-detached",
    ];
    let result = stdin_100m(&c, &rt)
        .and_then(|_| stdout_100m(&c, &rt))
        .and_then(|_| execs(&c, &rt))
        .and_then(|_| yes_attached(&c, &rt))
        .and_then(|_| yes_detached(&c, &rt));
    if result.is_err() {
        for p in pods {
            let _ = c.kill_and_remove(NS, p);
        }
        eprintln!("containerd log:\n{}", c.log_text());
    }
    result?;
    c.wait_clean(&pods)
}
