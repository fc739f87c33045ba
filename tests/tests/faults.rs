//! A pod is always removable: with a `veil` pod running under a private
//! containerd, the test kills one of its host processes — QEMU, the vsock
//! backend, or the shim itself — and then removes the task and the
//! container with plain `ctr` commands, as an operator (or kubelet) would.
//! Both must succeed, and no process, mount, pod directory, scratch disk or
//! image reference may be left.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use veil_tests::{
    containerd::{output_text, processes, Containerd, VEIL_STATE_DIR},
    oci, Artefacts,
};

const NS: &str = "veil-test";

fn task_status(c: &Containerd, id: &str) -> Result<String> {
    c.task_status(NS, id)
}

fn wait_status(c: &Containerd, id: &str, want: &[&str]) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = task_status(c, id)?;
        if want.contains(&s.as_str()) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("task {id} is {s:?}, not one of {want:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The PID of the pod's host process whose command line contains `what`.
fn host_process(c: &Containerd, id: &str, what: &str) -> Result<u32> {
    let found = if what == "containerd-shim" {
        c.shim_processes()
            .into_iter()
            .find(|(_, cmd)| cmd.split_whitespace().any(|w| w == id))
    } else {
        let dir = format!("{VEIL_STATE_DIR}/{id}/");
        processes()
            .into_iter()
            .find(|(_, cmd)| cmd.contains(&dir) && cmd.contains(what))
    };
    match found {
        Some((pid, _)) => Ok(pid),
        None => bail!("no {what} process for pod {id}"),
    }
}

fn kill_and_remove(c: &Containerd, rt: &str, id: &str, victim: &str) -> Result<()> {
    let out = c
        .ctr_run(NS, rt)
        .args(["-d", oci::BUSYBOX_IMAGE, id, "sleep", "600"])
        .output()?;
    if !out.status.success() {
        bail!("ctr run -d {id}: {}", output_text(&out));
    }
    wait_status(c, id, &["RUNNING"])?;
    let pid = host_process(c, id, victim)?;
    if victim == "qemu-system" {
        // QEMU runs under its seccomp sandbox (`-sandbox on`, filter mode 2).
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let seccomp = status.lines().find(|l| l.starts_with("Seccomp:"));
        if seccomp.map(|l| l.split_whitespace().nth(1)) != Some(Some("2")) {
            bail!("QEMU (pid {pid}) is not in seccomp filter mode: {seccomp:?}");
        }
    }
    eprintln!("{id}: killing {victim} (pid {pid})");
    kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGKILL)?;
    if victim == "containerd-shim" {
        // containerd notices its shim died and cleans the task up itself
        // (running the shim's `delete`), as it does for runc's shim.
        wait_status(c, id, &["", "STOPPED"])?;
    } else {
        // containerd learns of the exit: the VM took the process with it.
        wait_status(c, id, &["STOPPED"])?;
    }
    if !task_status(c, id)?.is_empty() {
        let del = c.ctr(NS).args(["task", "delete", id]).output()?;
        if !del.status.success() {
            bail!(
                "ctr task delete {id} after killing {victim}: {}",
                output_text(&del)
            );
        }
    }
    let rm = c.ctr(NS).args(["container", "rm", id]).output()?;
    if !rm.status.success() {
        bail!(
            "ctr container rm {id} after killing {victim}: {}",
            output_text(&rm)
        );
    }
    c.wait_clean(&[id])
}

#[test]
fn a_pod_whose_host_processes_die_can_still_be_removed() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil");
    kill_and_remove(&c, &rt, "fault-qemu", "qemu-system")?;
    kill_and_remove(&c, &rt, "fault-backend", "vhost-device-vsock")?;
    kill_and_remove(&c, &rt, "fault-shim", "containerd-shim")?;
    Ok(())
}

/// containerd killed with SIGKILL under a running pod: the restarted
/// containerd finds the pod running, exec works, the shim's new log lines
/// reach the new containerd's log, and the pod is removed with nothing left.
#[test]
fn a_pod_survives_a_containerd_kill_and_its_shim_logs_to_the_new_one() -> Result<()> {
    let a = Artefacts::locate()?;
    let mut c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil");
    let id = "fault-containerd";
    let out = c
        .ctr_run(NS, &rt)
        .args(["-d", oci::BUSYBOX_IMAGE, id, "sleep", "600"])
        .output()?;
    if !out.status.success() {
        bail!("ctr run -d {id}: {}", output_text(&out));
    }
    let result = (|| -> Result<()> {
        wait_status(&c, id, &["RUNNING"])?;
        let shim = host_process(&c, id, "containerd-shim")?;
        eprintln!("{id}: killing containerd (pid {})", c.pid());
        c.kill_and_restart()?;
        let logged_before = c.log_text().len();
        wait_status(&c, id, &["RUNNING"])?;
        if host_process(&c, id, "containerd-shim")? != shim {
            bail!("the pod's shim was replaced across the containerd kill");
        }
        let exec = c
            .ctr(NS)
            .args(["task", "exec", "--exec-id", "after", id, "echo", "alive"])
            .output()?;
        if !exec.status.success() || !String::from_utf8_lossy(&exec.stdout).contains("alive") {
            bail!("exec after the containerd kill: {}", output_text(&exec));
        }
        // A request that fails makes the shim log a warning.
        let bad = c
            .ctr(NS)
            .args(["task", "exec", "--exec-id", "bad", id, "/no/such/program"])
            .output()?;
        if bad.status.success() {
            bail!("an exec of a missing program succeeded");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = c.log_text();
            let new = log.get(logged_before..).unwrap_or_default();
            if new.contains("task request failed") && new.contains("/no/such/program") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no new shim log line in containerd's log after its restart:\n{new}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })();
    let removed = c.kill_and_remove(NS, id).and_then(|()| c.wait_clean(&[id]));
    result?;
    removed
}
