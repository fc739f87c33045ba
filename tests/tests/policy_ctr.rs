//! The pod's request policy end to end through `ctr` and the real shim, a
//! `veil-sim` VM attesting to `veil-kbs`: the policy rides in the
//! `io.veil.policy` annotation, its digest is the simulated TEE's HOST_DATA,
//! the agent verifies it and enforces it — an allowlisted exec works, any
//! other is refused with the rule named, and a container whose command the
//! policy does not list is refused at create.

use anyhow::Result;
use veil_tests::{
    oci,
    storage::{Confidential, NS},
};

/// The policy: busybox `sleep 1000` (by root hash), `cat /proc/loadavg` as
/// its only exec; stdin allowed, as `ctr` always attaches it.
fn policy(root_hash: &str) -> String {
    format!(
        r#"version = 1
[[container]]
name = "sleeper"
root_hash = ["{root_hash}"]
args = ["sleep", "1000"]
env_names = ["PATH", "HOSTNAME", "TERM"]
stdin = true
[[container.exec]]
args = ["cat", "/proc/loadavg"]
stdin = true
"#
    )
}

fn run(env: &Confidential, id: &str, doc: &str, cmd: &[&str]) -> Result<std::process::Output> {
    let mut args = env.run_args("veil-sim", oci::BUSYBOX_IMAGE);
    args.extend([
        "-d".into(),
        "--annotation".into(),
        format!("io.veil.policy={doc}"),
        oci::BUSYBOX_IMAGE.into(),
        id.into(),
    ]);
    args.extend(cmd.iter().map(|s| s.to_string()));
    Ok(env.c.ctr(NS).args(&args).output()?)
}

fn remove(env: &Confidential, id: &str) {
    let _ = env.c.kill_and_remove(NS, id);
}

#[test]
fn a_veil_sim_pod_runs_only_what_its_measured_policy_allows() {
    let env = Confidential::new().unwrap();
    let root_hash = env.busybox_root_hash().unwrap();
    env.resources(&root_hash).unwrap();
    env.register("policy-pod", |_| {}).unwrap();
    let broker = env.start_broker("policy-pod").unwrap();
    let doc = policy(&root_hash);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let out = run(&env, "allowed", &doc, &["sleep", "1000"]).unwrap();
        assert!(
            out.status.success(),
            "ctr run: {}\naudit:\n{}",
            String::from_utf8_lossy(&out.stderr),
            broker.audit_text()
        );
        // The broker saw the policy as init-data and released the keys.
        assert!(
            broker
                .audit_events()
                .iter()
                .any(|e| e["outcome"] == "release"),
            "{}",
            broker.audit_text()
        );

        let t = std::time::Instant::now();
        let ok = env
            .c
            .ctr_ok(
                NS,
                &[
                    "task",
                    "exec",
                    "--exec-id",
                    "l",
                    "allowed",
                    "cat",
                    "/proc/loadavg",
                ],
            )
            .unwrap();
        eprintln!(
            "allowlisted exec took {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        let text = String::from_utf8_lossy(&ok.stdout);
        assert_eq!(text.split_whitespace().count(), 5, "loadavg: {text:?}");

        let out = env
            .c
            .ctr(NS)
            .args([
                "task",
                "exec",
                "--exec-id",
                "s",
                "allowed",
                "cat",
                "/etc/passwd",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "exec outside the allowlist ran");
        assert!(
            err.contains("ExecProcess denied by the init-data policy")
                && err.contains("exec allowlist")
                && err.contains("rule 'sleeper'"),
            "denial: {err}"
        );
        eprintln!("denied exec, as ctr shows it: {}", err.trim());
        // The host side logs and counts it (the shim's log is in containerd's).
        let log = env.c.log_text();
        assert!(
            log.contains("request denied by the pod's policy") && log.contains("denials=1"),
            "no counted denial in the shim's log"
        );
        remove(&env, "allowed");

        let out = run(&env, "refused", &doc, &["sleep", "999"]).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "a container the policy does not list ran"
        );
        assert!(
            err.contains("CreateContainer denied") && err.contains("process.args"),
            "denial: {err}"
        );
        remove(&env, "refused");
    }));
    if result.is_err() {
        eprintln!("containerd log:\n{}", env.c.log_text());
    }
    env.c.wait_clean(&["allowed", "refused"]).unwrap();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
