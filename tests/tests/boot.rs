//! The guest image boots under QEMU and the agent answers over hybrid vsock.

use std::time::Duration;

use veil_protocol::{
    agent::{check_response::ServingStatus, CheckRequest, ShutdownRequest, VersionRequest},
    agent_ttrpc::{GuestClient, HealthClient},
};
use veil_tests::{vm::pid_alive, Artefacts, TestVm, VmOptions};

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(10).as_nanos() as i64)
}

#[tokio::test]
async fn agent_answers_health_over_hybrid_vsock_and_powers_off_on_request() {
    let a = Artefacts::locate().unwrap();
    let mut vm = TestVm::boot(&a, &VmOptions::agent(&a)).unwrap();
    let client = vm.agent_client(Duration::from_secs(60)).await.unwrap();

    let health = HealthClient::new(client.clone());
    let r = health.check(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(r.status.enum_value(), Ok(ServingStatus::SERVING));
    let v = health.version(ctx(), &VersionRequest::new()).await.unwrap();
    assert_eq!(v.api_version, veil_protocol::API_VERSION);
    assert!(!v.agent_version.is_empty());

    // The agent powers the VM off on request: QEMU exits by itself.
    GuestClient::new(client)
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .unwrap();
    assert!(
        vm.wait_exit(Duration::from_secs(30)),
        "VM still running after Shutdown; console:\n{}",
        vm.console()
    );
}

#[tokio::test]
async fn dropping_the_vm_leaves_no_process_and_no_files() {
    let a = Artefacts::locate().unwrap();
    let vm = TestVm::boot(&a, &VmOptions::agent(&a)).unwrap();
    let pids = vm.pids();
    let dir = vm.dir().to_path_buf();
    assert_eq!(
        pids.len(),
        2,
        "QEMU and vhost-device-vsock should both be running"
    );
    drop(vm);
    for pid in pids {
        assert!(!pid_alive(pid), "process {pid} survived the VM's drop");
    }
    assert!(!dir.exists(), "{} survived the VM's drop", dir.display());
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let a = Artefacts::locate().unwrap();
    let (pids_tx, pids_rx) = std::sync::mpsc::channel();
    let a2 = a.clone();
    let r = std::thread::spawn(move || {
        let vm = TestVm::boot(&a2, &VmOptions::agent(&a2)).unwrap();
        pids_tx.send(vm.pids()).unwrap();
        panic!("deliberate panic with a VM alive");
    })
    .join();
    assert!(r.is_err());
    for pid in pids_rx.recv().unwrap() {
        assert!(!pid_alive(pid), "process {pid} survived a panicking test");
    }
}
