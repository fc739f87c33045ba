//! What the pod's request policy costs.
//!
//! Per request: the agent's check of a CreateContainer (an OCI spec as
//! containerd's CRI plugin writes it, taken into the policy's view and
//! matched against a policy with a pause rule and an app rule) and of an
//! exec, in µs — next to the same requests under the built-in allow-all
//! policy, in the same run.
//!
//! On pod start: `ctr run -d` of a `veil-sim` pod that attests to
//! `veil-kbs`, with a policy in the `io.veil.policy` annotation and without
//! one (the built-in confidential default), interleaved in the same run.
//!
//! Run: `cargo bench -p veil-benches --bench policy` (VEIL_BENCH_RUNS=N pod
//! starts per variant, default 5; needs root and `ci/build-artefacts.sh`).

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use veil_benches::{report, runs, summarize};
use veil_policy::{
    eval::{ContainerView, ExecView},
    Policy,
};
use veil_test_support::{
    oci,
    storage::{Confidential, NS},
};

const HASH: &str = "5f0c8a3e2b1d4c6f7a8e9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e";

fn policy_doc(root_hash: &str) -> String {
    format!(
        r#"version = 1
[[container]]
name = "pause"
root_hash = ["{HASH}"]
args = ["/pause"]
env_names = ["PATH"]

[[container]]
name = "app"
root_hash = ["{root_hash}"]
args = ["sleep", "1000"]
env = ["MODE=prod"]
env_names = ["HOSTNAME", "PATH", "TERM"]
mounts = ["/data", "/dev/termination-log", "/etc/hosts"]
stdin = true

[[container.exec]]
args = ["cat", "/proc/loadavg"]
stdin = true
"#
    )
}

/// A container spec shaped like one containerd's CRI plugin writes.
fn cri_spec() -> oci_spec::runtime::Spec {
    let caps: Vec<&str> = veil_policy::DEFAULT_CAPABILITIES.to_vec();
    let mount = |d: &str, t: &str, s: &str, o: &[&str]| serde_json::json!({"destination": d, "type": t, "source": s, "options": o});
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["sleep", "1000"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOSTNAME=policypod", "MODE=prod"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": false
        },
        "root": {"path": "rootfs"},
        "mounts": [
            mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
            mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755"]),
            mount("/dev/pts", "devpts", "devpts", &["nosuid", "noexec"]),
            mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
            mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
            mount("/sys/fs/cgroup", "cgroup", "cgroup", &["nosuid", "noexec", "nodev", "ro"]),
            mount("/etc/hosts", "bind", "sandbox:hosts", &["rbind", "rprivate", "rw"]),
            mount("/etc/hostname", "bind", "sandbox:hostname", &["rbind", "rprivate", "rw"]),
            mount("/etc/resolv.conf", "bind", "sandbox:resolv.conf", &["rbind", "rprivate", "rw"]),
            mount("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev"]),
            mount("/data", "bind", "volume:data", &["rbind", "rprivate", "rw"]),
            mount("/dev/termination-log", "bind", "volume:termination", &["rbind", "rw"]),
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                           {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys"]
        }
    });
    serde_json::from_value(spec).expect("the bench's spec is an OCI spec")
}

/// Median time of `f`, µs, over 21 batches of `n` calls.
fn per_call(n: u32, mut f: impl FnMut() -> bool) -> Result<f64> {
    let mut batches = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        for _ in 0..n {
            ensure!(f(), "a request the bench expects allowed was denied");
        }
        batches.push(t.elapsed() / n);
    }
    Ok(summarize(&batches).median.as_secs_f64() * 1e6)
}

fn requests() -> Result<()> {
    let spec = cri_spec();
    let policy = Policy::parse(policy_doc(HASH).as_bytes())?;
    let all = Policy::allow_all();
    let exec = ExecView {
        args: vec!["cat".into(), "/proc/loadavg".into()],
        stdin: true,
        ..ExecView::default()
    };
    let create = |p: &Policy| {
        let v = ContainerView::of(&spec, true, Some(HASH.into()));
        p.check_container(&v).is_ok()
    };
    let n = 2000;
    let c_policy = per_call(n, || create(&policy))?;
    let c_all = per_call(n, || create(&all))?;
    let e_policy = per_call(n, || policy.check_exec(Some(1), &exec).is_ok())?;
    let e_all = per_call(n, || all.check_exec(None, &exec).is_ok())?;
    let parse = per_call(200, || Policy::parse(policy_doc(HASH).as_bytes()).is_ok())?;
    println!("per request (median of 21 batches):");
    println!("  CreateContainer check, init-data policy   {c_policy:>8.2} µs");
    println!("  CreateContainer check, built-in allow-all {c_all:>8.2} µs");
    println!("  ExecProcess check, init-data policy       {e_policy:>8.2} µs");
    println!("  ExecProcess check, built-in allow-all     {e_all:>8.2} µs");
    println!("  parsing the policy (once per pod)         {parse:>8.2} µs");
    Ok(())
}

fn start(env: &Confidential, id: &str, doc: Option<&str>) -> Result<Duration> {
    let mut args = env.run_args("veil-sim", oci::BUSYBOX_IMAGE);
    args.push("-d".into());
    if let Some(d) = doc {
        args.extend(["--annotation".into(), format!("io.veil.policy={d}")]);
    }
    args.extend([
        oci::BUSYBOX_IMAGE.into(),
        id.into(),
        "sleep".into(),
        "1000".into(),
    ]);
    let t = Instant::now();
    let out = env.c.ctr(NS).args(&args).output()?;
    let took = t.elapsed();
    ensure!(
        out.status.success(),
        "ctr run {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.c.kill_and_remove(NS, id)?;
    Ok(took)
}

fn pod_start() -> Result<()> {
    let env = Confidential::new()?;
    let root_hash = env.busybox_root_hash()?;
    env.resources(&root_hash)?;
    env.register("policy-bench", |_| {})?;
    let _broker = env.start_broker("policy-bench")?;
    let doc = policy_doc(&root_hash);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for i in 0..runs(5) {
        with.push(start(&env, &format!("with-{i}"), Some(&doc))?);
        without.push(start(&env, &format!("without-{i}"), None)?);
    }
    println!("veil-sim pod start (ctr run -d, attesting):");
    report("  with an init-data policy", &summarize(&with));
    report("  built-in confidential default", &summarize(&without));
    env.c.wait_clean(&[])?;
    Ok(())
}

fn main() -> Result<()> {
    requests()?;
    pod_start()
}
