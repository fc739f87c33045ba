//! The sandbox API against the fake pod: the calls containerd makes with
//! `sandboxer = "shim"`, in order and out of it.

use std::{sync::atomic::Ordering, time::Duration};

use containerd_shim_protos::{api, sandbox_api as sb};
use veil_common::{Classify, Kind};

use super::{
    sandbox_api::{STATE_NOT_READY, STATE_READY},
    tests::{fixture, Fixture},
    TaskError,
};

const POD: &str = "pod1";

impl Fixture {
    /// A pod's sandbox bundle (pause-like spec, CRI annotations, a network
    /// namespace path).
    fn sandbox_bundle(&self, id: &str) -> String {
        let b = self.dir.path().join(format!("sandbox-{id}"));
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(
            b.join("config.json"),
            format!(
                r#"{{"hostname": "web-0", "annotations": {{"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "{id}"}},
                  "linux": {{"namespaces": [{{"type": "pid"}}, {{"type": "ipc"}}, {{"type": "uts"}}, {{"type": "mount"}}, {{"type": "network", "path": "/var/run/netns/cni-spec"}}]}}}}"#
            ),
        )
        .unwrap();
        b.display().to_string()
    }

    async fn create_sandbox(&self, id: &str, netns: &str) -> Result<(), TaskError> {
        self.svc
            .create_sandbox(sb::CreateSandboxRequest {
                sandbox_id: id.into(),
                bundle_path: self.sandbox_bundle(id),
                netns_path: netns.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn start_sandbox(&self, id: &str) -> Result<sb::StartSandboxResponse, TaskError> {
        self.svc
            .start_sandbox(sb::StartSandboxRequest {
                sandbox_id: id.into(),
                ..Default::default()
            })
            .await
    }

    async fn sandbox_state(&self, id: &str) -> sb::SandboxStatusResponse {
        self.svc
            .sandbox_status(sb::SandboxStatusRequest {
                sandbox_id: id.into(),
                verbose: true,
                ..Default::default()
            })
            .await
            .unwrap()
    }

    async fn ping(&self, id: &str) -> Result<(), TaskError> {
        self.svc
            .ping_sandbox(sb::PingRequest {
                sandbox_id: id.into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn stop_sandbox(&self, id: &str) -> Result<(), TaskError> {
        self.svc
            .stop_sandbox(sb::StopSandboxRequest {
                sandbox_id: id.into(),
                timeout_secs: 5,
                ..Default::default()
            })
            .await
            .map(|_| ())
    }
}

#[tokio::test]
async fn create_start_status_ping_platform_stop_wait_shutdown() {
    let f = fixture();
    f.create_sandbox(POD, "/var/run/netns/cni-api")
        .await
        .unwrap();
    // Created: recorded, no VM yet.
    assert_eq!(f.launcher.launches.load(Ordering::SeqCst), 0);
    let st = f.sandbox_state(POD).await;
    assert_eq!((st.state.as_str(), st.pid), (STATE_NOT_READY, 0));
    assert_eq!(st.info["phase"], "created");
    assert!(st.created_at.seconds > 0);
    assert_eq!(
        f.ping(POD).await.unwrap_err().kind(),
        Kind::FailedPrecondition
    );

    let started = f.start_sandbox(POD).await.unwrap();
    assert_eq!(started.pid, 42, "the fake pod has no VMM: the shim's PID");
    assert_eq!(started.created_at.seconds, st.created_at.seconds);
    // The VM booted once, without a sandbox container's image, in the
    // namespace the API named, with the spec's hostname.
    assert_eq!(f.launcher.launches.load(Ordering::SeqCst), 1);
    assert_eq!(
        f.launcher.last.lock().clone().unwrap(),
        (
            POD.to_string(),
            false,
            Some("/var/run/netns/cni-api".into()),
            "web-0".to_string()
        )
    );
    let st = f.sandbox_state(POD).await;
    assert_eq!((st.state.as_str(), st.pid), (STATE_READY, 42));
    assert!(st.exited_at.is_none());
    f.ping(POD).await.unwrap();
    let p = f
        .svc
        .platform(sb::PlatformRequest {
            sandbox_id: POD.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(p.platform.os, "linux");
    assert_eq!(p.platform.architecture, super::sandbox_api::go_arch());

    // A container of the pod runs through the task API in the booted VM.
    f.svc.create(f.create_req("c1", Some(POD))).await.unwrap();
    f.start("c1", "").await;
    assert_eq!(f.status("c1", "").await, api::Status::RUNNING);
    assert_eq!(f.launcher.launches.load(Ordering::SeqCst), 1);

    // WaitSandbox blocks until the stop.
    let waiter = f.svc.wait_sandbox(sb::WaitSandboxRequest {
        sandbox_id: POD.into(),
        ..Default::default()
    });
    tokio::pin!(waiter);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut waiter)
            .await
            .is_err(),
        "WaitSandbox returned while the sandbox runs"
    );
    f.stop_sandbox(POD).await.unwrap();
    let w = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("WaitSandbox returned after the stop")
        .unwrap();
    assert_eq!(w.exit_status, 0);
    assert!(w.exited_at.seconds > 0);
    assert!(f.pod.shut.load(Ordering::SeqCst), "the pod was shut down");
    // The pod's container went with the VM.
    assert_eq!(f.wait("c1", "").await, 255);
    let st = f.sandbox_state(POD).await;
    assert_eq!((st.state.as_str(), st.pid), (STATE_NOT_READY, 42));
    assert_eq!(st.exited_at.seconds, w.exited_at.seconds);
    assert!(f.ping(POD).await.is_err());
    // Stop again: nothing to do, still fine.
    f.stop_sandbox(POD).await.unwrap();
    assert_eq!(
        f.start_sandbox(POD).await.unwrap_err().kind(),
        Kind::FailedPrecondition
    );

    let exit = f.svc.exit_signal();
    f.svc
        .shutdown_sandbox(sb::ShutdownSandboxRequest {
            sandbox_id: POD.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(*exit.borrow(), "ShutdownSandbox lets the shim exit");
}

#[tokio::test]
async fn task_shutdown_keeps_a_live_sandbox_and_shutdown_sandbox_stops_it() {
    let f = fixture();
    f.create_sandbox(POD, "").await.unwrap();
    f.start_sandbox(POD).await.unwrap();
    // Without a netns_path the spec's namespace is used.
    assert_eq!(
        f.launcher.last.lock().clone().unwrap().2,
        Some("/var/run/netns/cni-spec".into())
    );
    // containerd shuts the task service down after each container; the
    // sandbox's shim stays.
    let exit = f.svc.exit_signal();
    f.svc
        .shutdown(api::ShutdownRequest::default())
        .await
        .unwrap();
    assert!(!*exit.borrow());
    assert!(!f.pod.shut.load(Ordering::SeqCst));
    f.svc
        .shutdown_sandbox(sb::ShutdownSandboxRequest {
            sandbox_id: POD.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(f.pod.shut.load(Ordering::SeqCst), "stopped on the way out");
    assert!(*exit.borrow());
    assert_eq!(f.sandbox_state(POD).await.state, STATE_NOT_READY);
}

#[tokio::test]
async fn calls_for_another_sandbox_or_out_of_order_are_refused_by_name() {
    let f = fixture();
    // Before CreateSandbox.
    let e = f.start_sandbox(POD).await.unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound);
    assert!(
        e.to_string().contains("StartSandbox") && e.to_string().contains("no CreateSandbox"),
        "{e}"
    );
    // A bad id, a missing bundle, a bundle of another pod.
    assert_eq!(
        f.create_sandbox("../x", "").await.unwrap_err().kind(),
        Kind::InvalidArgument
    );
    let e = f
        .svc
        .create_sandbox(sb::CreateSandboxRequest {
            sandbox_id: POD.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::InvalidArgument);
    assert!(e.to_string().contains("bundle_path"), "{e}");
    let other = f.sandbox_bundle("pod-other");
    let e = f
        .svc
        .create_sandbox(sb::CreateSandboxRequest {
            sandbox_id: POD.into(),
            bundle_path: other,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::InvalidArgument);
    assert!(e.to_string().contains("pod-other"), "{e}");

    f.create_sandbox(POD, "").await.unwrap();
    let e = f.create_sandbox("pod2", "").await.unwrap_err();
    assert_eq!(e.kind(), Kind::AlreadyExists);
    assert!(e.to_string().contains("serves sandbox pod1"), "{e}");
    let e = f
        .svc
        .sandbox_status(sb::SandboxStatusRequest {
            sandbox_id: "pod2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound);
    assert!(e.to_string().contains("SandboxStatus"), "{e}");
    // A container before StartSandbox: the pod has no VM yet.
    let e = f
        .svc
        .create(f.create_req("c1", Some(POD)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::FailedPrecondition);
    assert!(e.to_string().contains("StartSandbox"), "{e}");

    // A failed boot leaves the sandbox created; a retry boots it.
    *f.launcher.fail.lock() = Some(Kind::Internal);
    assert_eq!(
        f.start_sandbox(POD).await.unwrap_err().kind(),
        Kind::Internal
    );
    assert_eq!(f.sandbox_state(POD).await.state, STATE_NOT_READY);
    f.start_sandbox(POD).await.unwrap();
    let e = f.start_sandbox(POD).await.unwrap_err();
    assert_eq!(e.kind(), Kind::FailedPrecondition);
    assert!(e.to_string().contains("already running"), "{e}");
    f.stop_sandbox(POD).await.unwrap();
}

#[tokio::test]
async fn a_pod_booted_by_the_task_api_is_not_a_sandbox_of_this_api() {
    let f = fixture();
    f.svc.create(f.create_req(POD, None)).await.unwrap();
    let e = f.create_sandbox(POD, "").await.unwrap_err();
    assert_eq!(e.kind(), Kind::FailedPrecondition);
    assert!(e.to_string().contains("task API"), "{e}");
}

#[tokio::test]
async fn sigterm_stop_ends_a_waiting_wait_sandbox() {
    let f = fixture();
    f.create_sandbox(POD, "").await.unwrap();
    f.start_sandbox(POD).await.unwrap();
    let waiter = f.svc.wait_sandbox(sb::WaitSandboxRequest {
        sandbox_id: POD.into(),
        ..Default::default()
    });
    let (w, ()) = tokio::join!(waiter, f.svc.stop_pod());
    assert_eq!(w.unwrap().exit_status, 255);
    assert!(f.pod.shut.load(Ordering::SeqCst));
}
