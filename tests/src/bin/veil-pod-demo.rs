//! veil's first-run demo: containerd runs a container in a `veil-sim` microVM.
//!
//! Starts a private containerd (its own root, state and socket, the veil
//! runtime registered), imports a busybox image built offline, runs
//! `ctr run --runtime io.containerd.veil.v2` with the `veil-sim` handler and
//! prints what the container printed. Everything it started is stopped on
//! exit. Used by `ci/demo.sh` after set-up and the artefact build.

use std::time::Instant;

use anyhow::{bail, Result};
use veil_tests::{containerd::Containerd, oci, Artefacts};

fn main() -> Result<()> {
    let a = Artefacts::locate()?;
    println!("starting a private containerd with the veil runtime registered");
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import("demo", &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil-sim");
    let script = "echo \"hello from a container in a veil-sim microVM\"; \
                  echo \"guest kernel: $(uname -r), hostname: $(hostname), pid: $$\"";
    println!(
        "$ ctr run --rm --runtime io.containerd.veil.v2 --runtime-config-path {rt} {} demo sh -c '…'",
        oci::BUSYBOX_IMAGE
    );
    let t = Instant::now();
    let out = c
        .ctr("demo")
        .args([
            "run",
            "--rm",
            "--runtime",
            "io.containerd.veil.v2",
            "--runtime-config-path",
            &rt,
            oci::BUSYBOX_IMAGE,
            "demo",
            "sh",
            "-c",
            script,
        ])
        .output()?;
    let took = t.elapsed();
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        eprintln!("containerd log:\n{}", c.log_text());
        bail!("ctr run failed: {}", out.status);
    }
    println!(
        "(pod VM booted, container ran and VM stopped in {:.2} s; host kernel: {})",
        took.as_secs_f64(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    Ok(())
}
