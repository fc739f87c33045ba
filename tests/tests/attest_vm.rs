//! End to end: a simulated-TEE pod VM attests to the real `veil-kbs` on
//! 127.0.0.1 and receives its disk key — through the shim's simulated
//! firmware (vsock host port 1027) and broker relay (port 1028), TLS from
//! the guest to the broker certificate pinned on its measured command line.
//!
//! - release: the measurement the guest presents is the one `veil measure
//!   --mode sim` computes for what was launched; the broker's audit log shows
//!   the release with it; the key stays in the guest (the RPC names it only);
//! - refusal: one kernel command-line word changed → another measurement →
//!   no key, and the audit line says why;
//! - refusal: simulated evidence under a resource's default policy.
//!
//! Needs the artefacts of `ci/build-artefacts.sh` (kernel, initrd, QEMU,
//! vhost-device-vsock, `veil-kbs`, `veil`); a missing one fails the test.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failure is the test failing"
)]

use std::time::{Duration, Instant};

use veil_protocol::{
    agent::{AttestRequest, AttestResponse, SetPolicyRequest},
    agent_ttrpc::{AttestationClient, SandboxClient},
};
use veil_tests::{
    kbs::{Broker, KbsSetup},
    vm::pid_alive,
    Artefacts, TestVm, VmOptions,
};

const DISK_KEY: &[u8] = b"attest_vm disk key: 0f1e2d3c4b5a69788796a5b4c3d2e1f0";
const PROD_KEY: &[u8] = b"attest_vm production key, never for simulated TEEs";

const POLICY: &str = r#"
[[resource]]
path = "default/key/disk"
tee = ["veil-sim"]
reference_values = ["attest-vm"]
allow_simulated = true

# The default policy: real TEEs only, simulated evidence refused.
[[resource]]
path = "default/key/production"
reference_values = ["attest-vm"]
"#;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

async fn attest(vm: &TestVm, refresh: bool) -> ttrpc::Result<AttestResponse> {
    let client = vm.agent_client(Duration::from_secs(90)).await.unwrap();
    let mut req = AttestRequest::new();
    req.refresh = refresh;
    AttestationClient::new(client).attest(ctx(), &req).await
}

/// Boots a VM whose command line carries `words` and `extra`.
fn boot(a: &Artefacts, words: &str, extra: &str) -> TestVm {
    let mut opts = VmOptions::agent(a);
    opts.extra_cmdline = format!("{words} {extra}").trim().to_string();
    TestVm::boot(a, &opts).unwrap()
}

fn events(b: &Broker, outcome: &str) -> Vec<serde_json::Value> {
    b.audit_events()
        .into_iter()
        .filter(|e| e["outcome"] == outcome)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_tee_vm_attests_and_receives_its_key_which_stays_in_the_guest() {
    let a = Artefacts::locate().unwrap();
    let setup = KbsSetup::new(&a).unwrap();
    let h = setup.handler(&[("disk-key", "default/key/disk")]);
    let words = setup.words(&h).unwrap();
    assert!(words.starts_with("veil.tee=sim veil.kbs.pin="), "{words}");

    let vm = boot(&a, &words, "veil.log=veil_agent=debug");
    let reference = setup
        .add_reference(
            "attest-vm",
            &vm.launch_info(veil_shim::config::TeeKind::Sim),
        )
        .unwrap();
    setup.add_resource("default/key/disk", DISK_KEY).unwrap();
    setup.set_policy(POLICY).unwrap();
    let broker = setup.start().unwrap();
    let _services = setup.serve_vm(&vm, &broker).unwrap();

    let started = Instant::now();
    let r = attest(&vm, false).await.unwrap_or_else(|e| {
        panic!(
            "attest: {e}\naudit:\n{}\nconsole:\n{}",
            broker.audit_text(),
            vm.console()
        )
    });
    let first = started.elapsed();
    assert_eq!(r.tee, "veil-sim");
    assert_eq!(r.measurement, reference, "guest measurement = veil measure");
    assert_eq!(r.resources, ["disk-key"]);

    let releases = events(&broker, "release");
    assert_eq!(releases.len(), 1, "{}", broker.audit_text());
    assert_eq!(releases[0]["resource"], "default/key/disk");
    assert_eq!(releases[0]["measurement"], reference);
    assert_eq!(releases[0]["tee"], "veil-sim");

    // The key never left the guest: not in the reply, the audit or the console.
    let key = String::from_utf8_lossy(DISK_KEY).into_owned();
    assert!(!format!("{r:?}").contains(&key));
    assert!(!broker.audit_text().contains(&key));
    assert!(!vm.console().contains(&key));

    // Cached: a second call does not attest again.
    assert_eq!(attest(&vm, false).await.unwrap().measurement, reference);
    assert_eq!(events(&broker, "release").len(), 1);

    // The in-guest round trip (auth, evidence from the simulated firmware,
    // attest, resource, JWE), again and again.
    let (mut guest_ms, mut host_ms) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let t = Instant::now();
        let r = attest(&vm, true).await.unwrap();
        host_ms.push(t.elapsed().as_secs_f64() * 1e3);
        guest_ms.push(r.duration_us as f64 / 1e3);
    }
    assert_eq!(events(&broker, "release").len(), 11);
    eprintln!(
        "attestation round trip: first {:.1} ms (host); median of 10: {:.1} ms in the guest, {:.1} ms from the host",
        first.as_secs_f64() * 1e3,
        median(guest_ms),
        median(host_ms)
    );

    let pids: Vec<u32> = vm.pids().into_iter().chain(broker.pid()).collect();
    drop(vm);
    drop(broker);
    std::thread::sleep(Duration::from_millis(200));
    for p in pids {
        assert!(!pid_alive(p), "process {p} still running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_command_line_word_and_default_policy_get_no_key_and_the_audit_says_why() {
    let a = Artefacts::locate().unwrap();
    let setup = KbsSetup::new(&a).unwrap();
    let disk = setup.handler(&[("disk-key", "default/key/disk")]);
    let prod = setup.handler(&[("disk-key", "default/key/production")]);
    let (disk_words, prod_words) = (setup.words(&disk).unwrap(), setup.words(&prod).unwrap());

    // The operator measured the pod with `veil.log=info`; the host boots it
    // with `veil.log=debug`: one word changed.
    let changed = boot(&a, &disk_words, "veil.log=debug");
    let mut approved = changed.launch_info(veil_shim::config::TeeKind::Sim);
    approved.cmdline = approved.cmdline.replace("veil.log=debug", "veil.log=info");
    let reference = setup.add_reference("attest-vm", &approved).unwrap();
    // A pod fetching the production key, measured as booted.
    let production = boot(&a, &prod_words, "");
    let prod_reference = setup
        .add_reference(
            "attest-vm-prod",
            &production.launch_info(veil_shim::config::TeeKind::Sim),
        )
        .unwrap();
    setup.add_resource("default/key/disk", DISK_KEY).unwrap();
    setup
        .add_resource("default/key/production", PROD_KEY)
        .unwrap();
    setup
        .set_policy(&POLICY.replace(
            "path = \"default/key/production\"\nreference_values = [\"attest-vm\"]",
            "path = \"default/key/production\"\nreference_values = [\"attest-vm-prod\"]",
        ))
        .unwrap();
    let broker = setup.start().unwrap();

    // One changed word: another measurement, not among the reference values.
    let _s1 = setup.serve_vm(&changed, &broker).unwrap();
    let e = attest(&changed, false).await.unwrap_err();
    let status = match &e {
        ttrpc::Error::RpcStatus(s) => s.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(status.code(), ttrpc::Code::FAILED_PRECONDITION, "{e:?}");
    assert!(
        status.message.contains("not among the reference values"),
        "{}",
        status.message
    );
    let refusals = events(&broker, "refusal");
    assert_eq!(refusals.len(), 1, "{}", broker.audit_text());
    let measured = refusals[0]["measurement"].as_str().unwrap().to_string();
    assert_ne!(measured, reference);
    assert!(refusals[0]["reason"].as_str().unwrap().contains(&format!(
        "measurement {measured} is not among the reference values"
    )));
    // Failures are not cached: asking again is refused again.
    assert!(attest(&changed, false).await.is_err());
    assert_eq!(events(&broker, "refusal").len(), 2);

    // Simulated evidence under the default policy: refused whatever the measurement.
    let _s2 = setup.serve_vm(&production, &broker).unwrap();
    let e = attest(&production, false).await.unwrap_err();
    assert!(
        format!("{e:?}").contains("simulated evidence is not allowed"),
        "{e:?}"
    );
    let last = events(&broker, "refusal").pop().unwrap();
    assert_eq!(last["resource"], "default/key/production");
    assert_eq!(last["measurement"], prod_reference);
    assert!(last["reason"]
        .as_str()
        .unwrap()
        .contains("simulated evidence is not allowed"));

    assert!(
        events(&broker, "release").is_empty(),
        "{}",
        broker.audit_text()
    );
    let text = broker.audit_text();
    for k in [DISK_KEY, PROD_KEY] {
        assert!(!text.contains(&*String::from_utf8_lossy(k)));
    }
}

/// A host that launched the pod for one policy and delivers another (one
/// byte changed): the real agent in the VM compares the document with the
/// host data in a fresh simulated report, refuses it and everything after,
/// and fetches no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_swapped_after_launch_is_refused_and_gets_no_key() {
    use sha2::Digest;
    let a = Artefacts::locate().unwrap();
    let setup = KbsSetup::new(&a).unwrap();
    let h = setup.handler(&[("disk-key", "default/key/disk")]);
    let words = setup.words(&h).unwrap();
    let vm = boot(&a, &words, "");
    setup
        .add_reference(
            "attest-vm",
            &vm.launch_info(veil_shim::config::TeeKind::Sim),
        )
        .unwrap();
    setup.add_resource("default/key/disk", DISK_KEY).unwrap();
    setup.set_policy(POLICY).unwrap();
    let broker = setup.start().unwrap();
    let launched = "version = 1\n[[container]]\nname = \"app\"\nargs = [\"sleep\", \"1000\"]\n";
    let digest = sha2::Sha256::digest(launched.as_bytes()).to_vec();
    let _services = setup.serve_vm_bound(&vm, &broker, Some(digest)).unwrap();

    let client = vm.agent_client(Duration::from_secs(30)).await.unwrap();
    let sandbox = SandboxClient::new(client);
    let mut req = SetPolicyRequest::new();
    req.policy = launched.replace("1000", "1001").into_bytes();
    let e = sandbox.set_policy(ctx(), &req).await.unwrap_err();
    let text = format!("{e:?}");
    assert!(
        text.contains("PERMISSION_DENIED") && text.contains("differs from the host data"),
        "{text}"
    );
    // Everything after is refused, the launched policy too.
    req.policy = launched.as_bytes().to_vec();
    assert!(sandbox.set_policy(ctx(), &req).await.is_err());
    let e = sandbox
        .create_sandbox(ctx(), &veil_protocol::agent::CreateSandboxRequest::new())
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("is refused"), "{e:?}");
    // No secret: the evidence does not bind the (default) policy in force.
    let e = attest(&vm, false).await.unwrap_err();
    assert!(
        format!("{e:?}").contains("does not bind the pod's policy"),
        "{e:?}"
    );
    assert!(
        events(&broker, "release").is_empty(),
        "{}",
        broker.audit_text()
    );
}
