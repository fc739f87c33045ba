//! containerd runs containers in veil microVMs through `ctr`: a private
//! containerd (started by the test), busybox from an OCI archive the test
//! builds, the `io.containerd.veil.v2` runtime. After each step no shim, QEMU
//! or vsock backend is left, nothing is mounted and nothing remains under
//! /run/veil for the pods the step ran.

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use veil_tests::{containerd::Containerd, oci, Artefacts};

const NS: &str = "veil-test";
const RUNTIME: &str = "io.containerd.veil.v2";

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits until the pods left nothing behind, or fails listing what is left.
fn assert_clean(c: &Containerd, pods: &[&str]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = c.leftovers(pods);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("left behind after {pods:?}:\n{}", left.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_args(rt: &str) -> Vec<String> {
    vec![
        "run".into(),
        "--runtime".into(),
        RUNTIME.into(),
        "--runtime-config-path".into(),
        rt.into(),
    ]
}

fn ctr_run(c: &Containerd, rt: &str, extra: &[&str], id: &str, cmd: &[&str]) -> Result<Output> {
    let mut args = run_args(rt);
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(oci::BUSYBOX_IMAGE.into());
    args.push(id.into());
    args.extend(cmd.iter().map(|s| s.to_string()));
    Ok(c.ctr(NS).args(&args).output()?)
}

fn task_status(c: &Containerd, id: &str) -> Result<String> {
    c.task_status(NS, id)
}

fn wait_status(c: &Containerd, id: &str, want: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = task_status(c, id)?;
        if s == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("task {id} is {s:?}, not {want}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ctr_runs_containers_in_veil_microvms() -> Result<()> {
    let a = Artefacts::locate()?;
    let c = Containerd::start(&a)?;
    let result = scenario(&c);
    if result.is_err() {
        eprintln!("containerd log:\n{}", c.log_text());
    }
    result
}

fn scenario(c: &Containerd) -> Result<()> {
    let work = tempfile::tempdir()?;
    c.import(NS, &oci::busybox_archive(work.path())?)?;
    let rt = c.runtime_config("veil");

    // echo hi
    let out = ctr_run(c, &rt, &["--rm"], "echo-hi", &["echo", "hi"])?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n",
        "{}",
        text(&out)
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_clean(c, &["echo-hi"])?;

    // exit status
    let out = ctr_run(c, &rt, &["--rm"], "exit-3", &["sh", "-c", "exit 3"])?;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_clean(c, &["exit-3"])?;

    // a terminal: ctr -t needs one on its own stdin, which script(1) provides.
    let ctr = Command::new("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args(["--namespace", NS])
        .args(run_args(&rt))
        .args(["--rm", "-t", oci::BUSYBOX_IMAGE, "tty-1", "sh"])
        .get_args()
        .map(|s| format!("'{}'", s.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = Command::new("timeout")
        .args([
            "60",
            "script",
            "-qec",
            &format!("stty rows 30 cols 100; ctr {ctr}"),
            "/dev/null",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running script(1)")?;
    {
        use std::io::Write;
        let mut stdin = script.stdin.take().context("script stdin")?;
        std::thread::sleep(Duration::from_secs(5));
        stdin.write_all(b"tty; echo answer=$((6*7)); stty size; exit 7\n")?;
        std::thread::sleep(Duration::from_secs(2));
    }
    let out = script.wait_with_output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("answer=42"), "{}", text(&out));
    assert!(
        s.contains("30 100"),
        "the terminal has ctr's size: {}",
        text(&out)
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert_clean(c, &["tty-1"])?;

    // A long-running container: exec, ps, metrics, pause/resume, kill.
    let out = ctr_run(
        c,
        &rt,
        &["-d"],
        "svc",
        &[
            "sh",
            "-c",
            "trap 'exit 143' TERM; while true; do sleep 0.2; done",
        ],
    )?;
    assert!(out.status.success(), "{}", text(&out));
    wait_status(c, "svc", "RUNNING")?;
    let out = c.ctr_ok(
        NS,
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "svc",
            "sh",
            "-c",
            "echo exec-ok; exit 5",
        ],
    );
    match out {
        Ok(o) => bail!("exec exiting 5 succeeded: {}", text(&o)),
        Err(e) => assert!(e.to_string().contains("exec-ok"), "{e}"),
    }
    let out = c.ctr_ok(
        NS,
        &[
            "task",
            "exec",
            "--exec-id",
            "e2",
            "svc",
            "cat",
            "/proc/1/cmdline",
        ],
    )?;
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("sh"),
        "{}",
        text(&out)
    );
    let ps = c.ctr_ok(NS, &["task", "ps", "svc"])?;
    assert!(
        String::from_utf8_lossy(&ps.stdout).lines().count() >= 2,
        "{}",
        text(&ps)
    );
    let m = c.ctr_ok(NS, &["task", "metrics", "svc"])?;
    let ms = String::from_utf8_lossy(&m.stdout);
    assert!(ms.contains("memory.usage_in_bytes"), "{ms}");
    c.ctr_ok(NS, &["task", "pause", "svc"])?;
    wait_status(c, "svc", "PAUSED")?;
    c.ctr_ok(NS, &["task", "resume", "svc"])?;
    wait_status(c, "svc", "RUNNING")?;
    c.ctr_ok(NS, &["task", "kill", "-s", "TERM", "svc"])?;
    wait_status(c, "svc", "STOPPED")?;
    // ctr task delete reports the exit status on stderr.
    let del = c.ctr(NS).args(["task", "delete", "svc"]).output()?;
    assert!(
        String::from_utf8_lossy(&del.stderr).contains("exit code 143"),
        "TERM trapped: {}",
        text(&del)
    );
    c.ctr_ok(NS, &["containers", "delete", "svc"])?;
    assert_clean(c, &["svc"])?;

    // SIGKILL
    let out = ctr_run(c, &rt, &["-d"], "victim", &["sleep", "1000"])?;
    assert!(out.status.success(), "{}", text(&out));
    wait_status(c, "victim", "RUNNING")?;
    c.ctr_ok(NS, &["task", "kill", "-s", "KILL", "victim"])?;
    wait_status(c, "victim", "STOPPED")?;
    let del = c.ctr(NS).args(["task", "delete", "victim"]).output()?;
    assert!(
        String::from_utf8_lossy(&del.stderr).contains("exit code 137"),
        "SIGKILL: {}",
        text(&del)
    );
    c.ctr_ok(NS, &["containers", "delete", "victim"])?;
    assert_clean(c, &["victim"])?;

    // The simulated-TEE handler runs the same way.
    let sim = c.runtime_config("veil-sim");
    let out = ctr_run(c, &sim, &["--rm"], "sim-1", &["echo", "from veil-sim"])?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from veil-sim\n",
        "{}",
        text(&out)
    );
    assert_clean(c, &["sim-1"])?;
    Ok(())
}
