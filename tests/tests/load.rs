//! On a saturated node a pod is slow, not failed. The test measures an idle
//! start, fills both CPUs with busy loops, then starts a `veil` pod whose
//! boot deadline (twice the idle start) is shorter than the
//! boot takes under that load: the pod must start anyway (its deadline
//! stretches with the node's load, `shim/src/patience.rs`), and the test
//! checks that it took longer than the unstretched deadline — so a fixed
//! deadline would have failed it. A second pod, with a deadline no stretch
//! can meet, must fail with an error that says how long it waited and under
//! what load, and leave nothing.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use veil_tests::{
    containerd::{output_text, Containerd},
    oci, Artefacts,
};

const NS: &str = "veil-test";

/// Held by each test for its whole run: each one loads the node in its own
/// way, and the other's busy loops would change what it measures.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Busy loops, one process each, stopped by PID when dropped. (`setsid`
/// execs its command in place: the test is not a process group leader.)
struct Hogs(Vec<Child>);

impl Hogs {
    fn start(n: usize) -> Result<Self> {
        let mut hogs = Hogs(Vec::new());
        for _ in 0..n {
            hogs.0.push(
                // Each in a session of its own: where the kernel groups
                // tasks by session for scheduling (autogroup), a pod VM in
                // the shim's session would otherwise get half the CPUs
                // against all the loops together in the test's.
                Command::new("setsid")
                    .args(["sh", "-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .spawn()
                    .context("starting a busy loop")?,
            );
        }
        Ok(hogs)
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_pod(c: &Containerd, rt: &str, id: &str) -> Result<(std::process::Output, Duration)> {
    let t = Instant::now();
    let out = c
        .ctr_run(NS, rt)
        .args(["-d", oci::BUSYBOX_IMAGE, id, "sleep", "600"])
        .output()?;
    Ok((out, t.elapsed()))
}

/// Kills and removes `id`, saying how long the task took to stop.
fn remove(c: &Containerd, id: &str) -> Result<()> {
    if !c.task_status(NS, id)?.is_empty() {
        let t = Instant::now();
        c.ctr_ok(NS, &["task", "kill", "-s", "KILL", id])?;
        while c.task_status(NS, id)? != "STOPPED" {
            ensure!(
                t.elapsed() < Duration::from_secs(120),
                "{id} did not stop within 120 s of SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{id}: stopped {:?} after SIGKILL", t.elapsed());
        c.ctr_ok(NS, &["task", "delete", id])?;
    }
    c.ctr_ok(NS, &["container", "rm", id])?;
    c.wait_clean(&[id])
}

#[test]
fn a_pod_on_a_saturated_node_starts_late_instead_of_failing() -> Result<()> {
    let _alone = one_at_a_time();
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil");

    // The deadline is what an operator would set for this node: twice
    // an idle start, measured here, so that it holds on an idle node and
    // fails on a loaded one unless it stretches. (A fixed figure either
    // passes unstretched on a fast node or leaves no room on a slow one.)
    let (out, idle) = run_pod(&c, &rt, "load-idle")?;
    remove(&c, "load-idle")?;
    ensure!(
        out.status.success(),
        "a pod on the idle node failed: {}",
        output_text(&out)
    );
    let base_ms = (idle.as_millis() as u64 * 2).max(1000);
    eprintln!("idle start: {idle:?}; boot deadline {base_ms} ms");

    let cpus = std::thread::available_parallelism()?.get();
    // Four busy loops per CPU: the VM gets a fifth of a CPU or so, and its
    // boot takes several times its idle length. (Six made the boot slower
    // than even the stretched deadline in CI: the slowdown under TCG grows
    // faster than the runnable count.)
    let hogs = Hogs::start(4 * cpus)?;
    std::thread::sleep(Duration::from_secs(2));

    c.configure(&a, &[("veil", &format!("boot_timeout_ms = {base_ms}"))])?;
    let (out, took) = run_pod(&c, &rt, "load-slow")?;
    eprintln!("loaded start: {took:?}: {}", output_text(&out));
    if !out.status.success() {
        let _ = remove(&c, "load-slow");
        bail!(
            "a pod on a loaded node failed instead of starting late: {}",
            output_text(&out)
        );
    }
    let status = c.task_status(NS, "load-slow")?;
    remove(&c, "load-slow")?;
    ensure!(status == "RUNNING", "the pod is {status:?}, not RUNNING");
    ensure!(
        took > Duration::from_millis(base_ms),
        "the start took {took:?}, within the unstretched {base_ms} ms: the node was not loaded \
         enough to show anything"
    );

    // No stretch (at most ×10) makes 50 ms enough for a boot.
    c.configure(&a, &[("veil", "boot_timeout_ms = 50")])?;
    let (out, took) = run_pod(&c, &rt, "load-fail")?;
    drop(hogs);
    let text = output_text(&out);
    eprintln!("impossible deadline: {took:?}: {text}");
    remove(&c, "load-fail")?;
    ensure!(
        !out.status.success(),
        "a 50 ms boot deadline was met: {text}"
    );
    for want in [
        "the pod VM was not ready after",
        "deadline stretched",
        "runnable, on",
    ] {
        ensure!(
            text.contains(want),
            "the error does not say {want:?}: {text}"
        );
    }
    ensure!(
        !text.contains("Status {"),
        "a debug dump reached the user: {text}"
    );
    Ok(())
}

/// A pod saturated from inside — busy loops and a fork bomb — still answers
/// exec and control calls: the agent runs in a cgroup of its own with
/// priority over the containers', and the containers together may not take
/// the tasks the agent needs (guest-agent `cgroup::protect_agent`). Before,
/// the exec took 155 s and failed with EAGAIN from the agent's own fork.
#[test]
fn the_agent_answers_exec_while_its_pod_forks_and_spins() -> Result<()> {
    let _alone = one_at_a_time();
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil");
    let id = "load-fork";
    // A fork bomb with no PIDs limit of its own, plus busy loops: it grows
    // until the guest refuses more tasks, and keeps forking as its members
    // fail and exit.
    let script = "for i in $(seq 8); do (while :; do :; done) & done; \
                  f(){ f & f & sleep 600; }; f";
    let out = c
        .ctr_run(NS, &rt)
        .args(["-d", oci::BUSYBOX_IMAGE, id, "sh", "-c", script])
        .output()?;
    if !out.status.success() {
        let _ = remove(&c, id);
        bail!("ctr run {id}: {}", output_text(&out));
    }
    let result = (|| -> Result<()> {
        // Let the bomb fill the VM.
        std::thread::sleep(Duration::from_secs(10));
        for i in 0..3 {
            let t = Instant::now();
            let out = c
                .ctr(NS)
                .args(["task", "exec", "--exec-id", &format!("e{i}"), id])
                .args(["sh", "-c", "echo answered"])
                .output()?;
            let took = t.elapsed();
            let text = output_text(&out);
            eprintln!("exec {i} while saturated: {took:?}: {text}");
            // The exec runs, or — the bomb holding every task the pod may
            // have — is refused naming the limit, as runc's exec would fail
            // to fork; never a timeout, never an unnamed EAGAIN.
            if out.status.success() {
                ensure!(text.contains("answered"), "exec {i}: {text}");
            } else {
                ensure!(
                    text.contains("a task limit is reached (cgroup /sys/fs/cgroup/veil"),
                    "exec {i} in the saturated pod: {text}"
                );
                ensure!(!text.contains("Status {"), "a debug dump: {text}");
            }
            let t = Instant::now();
            let ps = c.ctr(NS).args(["task", "ps", id]).output()?;
            eprintln!("ps {i} while saturated: {:?}", t.elapsed());
            ensure!(ps.status.success(), "task ps: {}", output_text(&ps));
        }
        Ok(())
    })();
    let removed = remove(&c, id);
    if removed.is_err() {
        let log = c.log_text();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        eprintln!(
            "containerd log:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    result?;
    removed
}
