//! A container killed for lack of memory in a `veil` pod reaches containerd
//! as an OOM event (`/tasks/oom`, what CRI turns into the `OOMKilled`
//! reason), not only as a plain exit 137.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use veil_tests::{
    containerd::{output_text, Containerd},
    oci, Artefacts,
};

const NS: &str = "veil-test";

#[test]
fn an_oom_killed_container_produces_containerds_oom_event() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil");

    let mut events = c
        .ctr(NS)
        .arg("events")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("ctr events")?;
    let stdout = events.stdout.take().context("ctr events stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // 32 MiB limit; the shell builds a 200 MiB string.
    let run = c
        .ctr(NS)
        .args(["run", "--rm", "--runtime", "io.containerd.veil.v2"])
        .args(["--runtime-config-path", &rt, "--memory-limit", "33554432"])
        .args([oci::BUSYBOX_IMAGE, "oom-1", "sh", "-c"])
        .arg("x=$(head -c 209715200 /dev/zero | tr '\\0' a); echo survived ${#x}")
        .output()?;
    let mut seen = Vec::new();
    let mut oom = false;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        if line.contains("/tasks/oom") && line.contains("oom-1") {
            eprintln!("event: {line}");
            oom = true;
        }
        seen.push(line);
        if oom {
            break;
        }
    }
    let _ = events.kill();
    let _ = events.wait();
    let _ = reader.join();
    let result = (|| {
        if String::from_utf8_lossy(&run.stdout).contains("survived") {
            bail!(
                "the container was not OOM-killed (limit not applied?): {}",
                output_text(&run)
            );
        }
        if !oom {
            bail!(
                "no /tasks/oom event for oom-1; run: {}\nevents:\n{}",
                output_text(&run),
                seen.join("\n")
            );
        }
        c.wait_clean(&["oom-1"])
    })();
    result
}
