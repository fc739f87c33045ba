//! Each pod's host processes are jailed: with two `veil` pods running under
//! a private containerd, QEMU and vhost-device-vsock of each pod run as a
//! non-root uid of that pod's own (the same for both processes of a pod,
//! another for the other pod), with no capabilities, `no_new_privs` and no
//! supplementary groups (TCG needs no device); one pod's uid cannot open the
//! other pod's scratch disk nor list its sockets, while it can open its own;
//! the pods work; and once they are removed nothing is left, their uid
//! leases included.

use std::{
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use veil_shim::jail::Credentials;
use veil_tests::{
    containerd::{jail_leases, output_text, processes, Containerd, VEIL_STATE_DIR},
    oci, Artefacts,
};

const NS: &str = "veil-test";
const PODS: [&str; 2] = ["jail-a", "jail-b"];

/// The `/proc/<pid>/status` fields the jail sets.
#[derive(Debug)]
struct Status {
    uids: Vec<u32>,
    gids: Vec<u32>,
    groups: String,
    cap_eff: String,
    cap_prm: String,
    no_new_privs: String,
    seccomp: String,
}

fn status(pid: u32) -> Result<Status> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let ids = |name: &str| -> Result<Vec<u32>> {
        field(name)
            .split_whitespace()
            .map(|v| v.parse().context("an id in /proc/PID/status"))
            .collect()
    };
    Ok(Status {
        uids: ids("Uid:")?,
        gids: ids("Gid:")?,
        groups: field("Groups:"),
        cap_eff: field("CapEff:"),
        cap_prm: field("CapPrm:"),
        no_new_privs: field("NoNewPrivs:"),
        seccomp: field("Seccomp:"),
    })
}

/// The PID of pod `id`'s host process whose command line contains `what`.
fn host_process(id: &str, what: &str) -> Result<u32> {
    let dir = format!("{VEIL_STATE_DIR}/{id}/");
    processes()
        .into_iter()
        .find(|(_, cmd)| cmd.contains(&dir) && cmd.contains(what))
        .map(|(pid, _)| pid)
        .with_context(|| format!("no {what} process for pod {id}"))
}

/// Checks that `pid` runs jailed and returns its uid.
fn jailed_uid(id: &str, what: &str, pid: u32) -> Result<u32> {
    let s = status(pid)?;
    eprintln!("{id}: {what} (pid {pid}): {s:?}");
    let uid = s.uids.first().copied().unwrap_or(0);
    if uid == 0 || s.uids.iter().any(|u| *u != uid) {
        bail!(
            "{id}: {what} runs with uids {:?}, not one non-root uid",
            s.uids
        );
    }
    if s.gids.iter().any(|g| *g != uid) {
        bail!(
            "{id}: {what} runs with gids {:?}, not its pod's gid {uid}",
            s.gids
        );
    }
    if !s.groups.is_empty() {
        bail!("{id}: {what} has supplementary groups {:?}", s.groups);
    }
    if s.cap_eff != "0000000000000000" || s.cap_prm != "0000000000000000" {
        bail!(
            "{id}: {what} has capabilities (CapEff {}, CapPrm {})",
            s.cap_eff,
            s.cap_prm
        );
    }
    if s.no_new_privs != "1" {
        bail!("{id}: {what} has NoNewPrivs {:?}", s.no_new_privs);
    }
    if what == "qemu-system" && s.seccomp != "2" {
        bail!("{id}: QEMU is not in seccomp filter mode: {:?}", s.seccomp);
    }
    Ok(uid)
}

/// Runs `script` (with `path` as `$1`) in a forked child that has dropped
/// to `uid`/`gid` like a jailed process; its output.
fn as_uid(uid: u32, script: &str, path: &Path) -> Result<String> {
    let creds = Credentials::new(uid, uid);
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script).arg("sh").arg(path);
    // SAFETY: the closure only makes async-signal-safe calls on the copied
    // credentials.
    unsafe {
        cmd.pre_exec(move || creds.apply_in_child());
    }
    let out = cmd.output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn can_open_rw(uid: u32, path: &Path) -> Result<bool> {
    let out = as_uid(uid, r#"exec 3<>"$1" && echo OPENED"#, path)?;
    Ok(out.contains("OPENED"))
}

fn can_list(uid: u32, path: &Path) -> Result<bool> {
    let out = as_uid(uid, r#"ls "$1" >/dev/null && echo LISTED"#, path)?;
    Ok(out.contains("LISTED"))
}

fn wait_running(c: &Containerd, id: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = c.task_status(NS, id)?;
        if s == "RUNNING" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("task {id} is {s:?}, not RUNNING");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scenario(c: &Containerd) -> Result<()> {
    for id in PODS {
        let out = c
            .ctr_run(NS, &c.runtime_config("veil"))
            .args(["-d", oci::BUSYBOX_IMAGE, id, "sleep", "600"])
            .output()?;
        if !out.status.success() {
            bail!("ctr run -d {id}: {}", output_text(&out));
        }
    }
    let mut uids = Vec::new();
    for id in PODS {
        wait_running(c, id)?;
        let qemu = jailed_uid(id, "qemu-system", host_process(id, "qemu-system")?)?;
        let backend = jailed_uid(
            id,
            "vhost-device-vsock",
            host_process(id, "vhost-device-vsock")?,
        )?;
        if qemu != backend {
            bail!("{id}: QEMU runs as {qemu}, its vsock backend as {backend}");
        }
        let leases: Vec<(u32, String)> =
            jail_leases().into_iter().filter(|(_, p)| p == id).collect();
        if leases != [(qemu, id.to_string())] {
            bail!("{id}: uid {qemu}, but its leases are {leases:?}");
        }
        let exec = c
            .ctr(NS)
            .args(["task", "exec", "--exec-id", "alive", id, "echo", "alive"])
            .output()?;
        if !exec.status.success() || !String::from_utf8_lossy(&exec.stdout).contains("alive") {
            bail!("{id}: exec: {}", output_text(&exec));
        }
        uids.push(qemu);
    }
    if uids[0] == uids[1] {
        bail!("both pods run as uid {}", uids[0]);
    }
    let scratch: Vec<PathBuf> = PODS
        .iter()
        .map(|id| c.scratch_dir.join(format!("{id}.img")))
        .collect();
    let vm_dirs: Vec<PathBuf> = PODS
        .iter()
        .map(|id| Path::new(VEIL_STATE_DIR).join(id).join("vm"))
        .collect();
    for (i, id) in PODS.iter().enumerate() {
        let m = std::fs::metadata(&scratch[i])?;
        if m.uid() != uids[i] || m.mode() & 0o777 != 0o600 {
            bail!(
                "{id}: scratch disk is {}:{} mode {:o}, not its uid's alone",
                m.uid(),
                m.gid(),
                m.mode() & 0o777
            );
        }
        let (own, other) = (uids[i], uids[1 - i]);
        // The check can fail: the pod's own uid opens its own disk.
        if !can_open_rw(own, &scratch[i])? {
            bail!("{id}: its own uid {own} cannot open its scratch disk");
        }
        if can_open_rw(other, &scratch[i])? {
            bail!("{id}: the other pod's uid {other} opened its scratch disk");
        }
        if !can_list(own, &vm_dirs[i])? {
            bail!("{id}: its own uid cannot list {}", vm_dirs[i].display());
        }
        if can_list(other, &vm_dirs[i])? {
            bail!(
                "{id}: the other pod's uid {other} lists its sockets in {}",
                vm_dirs[i].display()
            );
        }
        if can_open_rw(other, &vm_dirs[i].join("console.log"))? {
            bail!("{id}: the other pod's uid opened its console log");
        }
    }
    Ok(())
}

#[test]
fn each_pods_qemu_and_backend_run_as_its_own_unprivileged_uid() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let started = Instant::now();
    let result = scenario(&c);
    eprintln!("two jailed pods checked in {:?}", started.elapsed());
    let mut removed = Ok(());
    for id in PODS {
        if let Err(e) = c.kill_and_remove(NS, id) {
            removed = Err(e);
        }
    }
    let clean = c.wait_clean(&PODS);
    result?;
    removed?;
    clean?;
    let left: Vec<(u32, String)> = jail_leases()
        .into_iter()
        .filter(|(_, p)| PODS.contains(&p.as_str()))
        .collect();
    if !left.is_empty() {
        bail!("uid leases left: {left:?}");
    }
    Ok(())
}
