//! The task lifecycle against the fake pod: no root, QEMU or containerd.

use std::{path::Path, sync::Arc, time::Duration};

use containerd_shim_protos::{
    api,
    protobuf::{well_known_types::any::Any, MessageField},
};
use veil_common::{Classify, Kind};

use super::{
    fake::{FakeLauncher, FakePod},
    ServiceContext, TaskError, TaskService,
};
use crate::events::{RecordingSink, TaskEvent};

pub(super) struct Fixture {
    pub(super) svc: TaskService,
    pub(super) pod: Arc<FakePod>,
    pub(super) launcher: Arc<FakeLauncher>,
    events: Arc<RecordingSink>,
    pub(super) dir: tempfile::TempDir,
}

pub(super) fn fixture() -> Fixture {
    let launcher = FakeLauncher::new();
    let events = Arc::new(RecordingSink::default());
    let svc = TaskService::new(
        ServiceContext {
            namespace: "test".into(),
            shim_pid: 42,
            events: events.clone(),
            start_cmd_ns: None,
        },
        launcher.clone(),
    );
    Fixture {
        svc,
        pod: Arc::clone(&launcher.pod),
        launcher,
        events,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Fixture {
    /// A bundle for container `id`; `pod`: the CRI pod it belongs to (None:
    /// its own sandbox, as with `ctr run`).
    fn bundle(&self, id: &str, pod: Option<&str>) -> String {
        let b = self.dir.path().join(id);
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        let spec = match pod {
            Some(p) => format!(
                r#"{{"annotations": {{"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "{p}"}}}}"#
            ),
            None => "{}".to_string(),
        };
        std::fs::write(b.join("config.json"), spec).unwrap();
        b.display().to_string()
    }

    pub(super) fn create_req(&self, id: &str, pod: Option<&str>) -> api::CreateTaskRequest {
        let bundle = self.bundle(id, pod);
        api::CreateTaskRequest {
            id: id.into(),
            rootfs: vec![api::Mount {
                type_: "bind".into(),
                source: Path::new(&bundle).join("rootfs").display().to_string(),
                options: vec!["ro".into()],
                ..Default::default()
            }],
            bundle,
            stdout: "/dev/null".into(),
            ..Default::default()
        }
    }

    async fn create(&self, id: &str, pod: Option<&str>) -> u32 {
        self.svc.create(self.create_req(id, pod)).await.unwrap().pid
    }

    pub(super) async fn start(&self, id: &str, exec: &str) -> u32 {
        self.svc
            .start(api::StartRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .pid
    }

    async fn exec(&self, id: &str, exec: &str) -> Result<(), TaskError> {
        self.svc
            .exec(api::ExecProcessRequest {
                id: id.into(),
                exec_id: exec.into(),
                spec: MessageField::some(Any {
                    value: br#"{"args": ["sh"]}"#.to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn kill(&self, id: &str, exec: &str, signal: u32) -> Result<(), TaskError> {
        self.svc
            .kill(api::KillRequest {
                id: id.into(),
                exec_id: exec.into(),
                signal,
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    pub(super) async fn wait(&self, id: &str, exec: &str) -> u32 {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.svc.wait(api::WaitRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            }),
        )
        .await
        .expect("wait returned")
        .unwrap()
        .exit_status
    }

    async fn delete(&self, id: &str, exec: &str) -> Result<api::DeleteResponse, TaskError> {
        self.svc
            .delete(api::DeleteRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            })
            .await
    }

    pub(super) async fn status(&self, id: &str, exec: &str) -> api::Status {
        self.svc
            .state(api::StateRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .status
            .enum_value_or_default()
    }

    fn events(&self) -> Vec<TaskEvent> {
        self.events.events.lock().clone()
    }

    /// Waits (bounded) until `pred` holds for the recorded events.
    async fn until_event(&self, pred: impl Fn(&TaskEvent) -> bool) {
        for _ in 0..1000 {
            if self.events().iter().any(&pred) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("event never came; got {:?}", self.events());
    }
}

fn topics(events: &[TaskEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.to_containerd().0).collect()
}

#[tokio::test]
async fn create_start_exec_kill_wait_delete() {
    let f = fixture();
    let pid = f.create("c1", None).await;
    assert_eq!(f.status("c1", "").await, api::Status::CREATED);
    assert_eq!(f.start("c1", "").await, pid);
    assert_eq!(f.status("c1", "").await, api::Status::RUNNING);

    f.exec("c1", "e1").await.unwrap();
    assert_eq!(f.status("c1", "e1").await, api::Status::CREATED);
    f.start("c1", "e1").await;
    f.kill("c1", "e1", 9).await.unwrap();
    assert_eq!(f.wait("c1", "e1").await, 137);
    assert_eq!(f.status("c1", "e1").await, api::Status::STOPPED);
    assert_eq!(f.delete("c1", "e1").await.unwrap().exit_status, 137);
    assert!(matches!(
        f.status_err("c1", "e1").await,
        TaskError::NotFound(_)
    ));

    f.kill("c1", "", 15).await.unwrap();
    assert_eq!(f.wait("c1", "").await, 143);
    let d = f.delete("c1", "").await.unwrap();
    assert_eq!((d.pid, d.exit_status), (pid, 143));
    assert!(
        f.pod.images.lock().is_empty(),
        "the image went with the container"
    );
    let calls = f.pod.calls.lock().clone();
    assert!(
        calls.iter().any(|c| c.starts_with("release_image"))
            && !calls.iter().any(|c| c.starts_with("detach_image")),
        "the sandbox container's image is released without a guest detach: {calls:?}"
    );
    assert_eq!(f.pod.process_count(), 0);

    let exit = f.svc.exit_signal();
    f.svc
        .shutdown(api::ShutdownRequest::default())
        .await
        .unwrap();
    assert!(*exit.borrow());
    f.svc.stop_pod().await;
    assert!(f.pod.shut.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        topics(&f.events()),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    assert_eq!(
        f.launcher
            .launches
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

impl Fixture {
    async fn status_err(&self, id: &str, exec: &str) -> TaskError {
        self.svc
            .state(api::StateRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            })
            .await
            .unwrap_err()
    }
}

#[tokio::test]
async fn an_exit_before_wait_is_kept_for_the_waiter() {
    let f = fixture();
    f.create("c1", None).await;
    f.start("c1", "").await;
    f.pod.finish("c1", "", 3);
    f.until_event(|e| matches!(e, TaskEvent::Exit { status: 3, .. }))
        .await;
    assert_eq!(f.status("c1", "").await, api::Status::STOPPED);
    assert_eq!(f.wait("c1", "").await, 3);
    assert_eq!(f.wait("c1", "").await, 3, "a second wait too");
}

#[tokio::test]
async fn a_wait_before_the_exit_returns_with_it() {
    let f = fixture();
    f.create("c1", None).await;
    f.start("c1", "").await;
    let (waited, ()) = tokio::join!(f.wait("c1", ""), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        f.pod.finish("c1", "", 7);
    });
    assert_eq!(waited, 7);
}

#[tokio::test]
async fn exec_into_an_exited_container_is_refused() {
    let f = fixture();
    f.create("c1", None).await;
    f.start("c1", "").await;
    f.pod.finish("c1", "", 0);
    f.until_event(|e| matches!(e, TaskEvent::Exit { .. })).await;
    let e = f.exec("c1", "e1").await.unwrap_err();
    assert_eq!(e.kind(), Kind::FailedPrecondition, "{e}");
    let e = f.exec("nope", "e1").await.unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound, "{e}");
}

#[tokio::test]
async fn kill_of_an_unknown_or_finished_process_is_not_found() {
    let f = fixture();
    let e = f.kill("nope", "", 9).await.unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound);
    f.create("c1", None).await;
    let e = f.kill("c1", "nope", 9).await.unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound);
    f.start("c1", "").await;
    f.pod.finish("c1", "", 0);
    f.until_event(|e| matches!(e, TaskEvent::Exit { .. })).await;
    let e = f.kill("c1", "", 9).await.unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound, "{e}");
    assert!(e.to_string().contains("already finished"), "{e}");
}

#[tokio::test]
async fn delete_while_running_is_refused_and_keeps_the_container() {
    let f = fixture();
    f.create("c1", None).await;
    f.start("c1", "").await;
    let e = f.delete("c1", "").await.unwrap_err();
    assert_eq!(e.kind(), Kind::FailedPrecondition, "{e}");
    assert_eq!(f.status("c1", "").await, api::Status::RUNNING);
    assert_eq!(f.pod.images.lock().len(), 1);
}

#[tokio::test]
async fn a_created_container_can_be_deleted_without_starting() {
    let f = fixture();
    f.create("c1", None).await;
    f.delete("c1", "").await.unwrap();
    assert_eq!(f.pod.process_count(), 0);
    assert!(f.pod.images.lock().is_empty());
}

#[tokio::test]
async fn an_oom_in_the_pod_becomes_a_task_oom_event() {
    let f = fixture();
    f.create("c1", None).await;
    f.pod.oom("c1");
    f.until_event(|e| *e == TaskEvent::Oom { id: "c1".into() })
        .await;
}

#[tokio::test]
async fn a_second_container_joins_the_pod_without_a_second_launch() {
    let f = fixture();
    f.create("pod1", None).await;
    f.create("c2", Some("pod1")).await;
    f.start("c2", "").await;
    assert_eq!(
        f.launcher
            .launches
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // A container of another pod, and a member before its sandbox.
    let e = f
        .svc
        .create(f.create_req("c3", Some("pod2")))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::FailedPrecondition, "{e}");
    // Shutdown with containers left is a no-op.
    f.svc
        .shutdown(api::ShutdownRequest::default())
        .await
        .unwrap();
    assert!(!f.pod.shut.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test]
async fn a_member_before_its_sandbox_is_refused() {
    let f = fixture();
    let e = f
        .svc
        .create(f.create_req("c1", Some("pod1")))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::FailedPrecondition, "{e}");
    assert_eq!(
        f.launcher
            .launches
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn duplicate_ids_bad_ids_and_double_starts() {
    let f = fixture();
    f.create("c1", None).await;
    let e = f.svc.create(f.create_req("c1", None)).await.unwrap_err();
    assert_eq!(e.kind(), Kind::AlreadyExists);
    let mut bad = f.create_req("c9", None);
    bad.id = "-rf".into();
    let e = f.svc.create(bad).await.unwrap_err();
    assert_eq!(e.kind(), Kind::InvalidArgument, "{e}");
    let e = f.exec("c1", "../x").await.unwrap_err();
    assert_eq!(e.kind(), Kind::InvalidArgument, "{e}");
    f.start("c1", "").await;
    let e = f
        .svc
        .start(api::StartRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::FailedPrecondition, "{e}");
    f.exec("c1", "e1").await.unwrap();
    let e = f.exec("c1", "e1").await.unwrap_err();
    assert_eq!(e.kind(), Kind::AlreadyExists, "{e}");
}

#[tokio::test]
async fn the_pods_errors_keep_their_kind_and_change_no_state() {
    let f = fixture();
    f.create("c1", None).await;
    f.pod.fail_next("start", Kind::PermissionDenied);
    let e = f
        .svc
        .start(api::StartRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::PermissionDenied);
    assert_eq!(f.status("c1", "").await, api::Status::CREATED);
    f.pod.fail_next("exec", Kind::PermissionDenied);
    assert_eq!(
        f.exec("c1", "e1").await.unwrap_err().kind(),
        Kind::PermissionDenied
    );
    assert!(matches!(
        f.status_err("c1", "e1").await,
        TaskError::NotFound(_)
    ));
}

#[tokio::test]
async fn a_failed_launch_leaves_no_pod_and_can_be_retried() {
    let f = fixture();
    *f.launcher.fail.lock() = Some(Kind::Unavailable);
    let e = f.svc.create(f.create_req("c1", None)).await.unwrap_err();
    assert_eq!(e.kind(), Kind::Unavailable);
    assert!(matches!(
        f.status_err("c1", "").await,
        TaskError::NotFound(_)
    ));
    f.create("c1", None).await;
    assert_eq!(
        f.launcher
            .launches
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

#[tokio::test]
async fn a_sandbox_that_cannot_be_created_takes_its_pod_down() {
    let f = fixture();
    f.pod.fail_next("create_container", Kind::InvalidArgument);
    let e = f.svc.create(f.create_req("c1", None)).await.unwrap_err();
    assert_eq!(e.kind(), Kind::InvalidArgument);
    assert!(f.pod.shut.load(std::sync::atomic::Ordering::SeqCst));
    assert!(f.pod.images.lock().is_empty(), "its image was detached");
}

#[tokio::test]
async fn the_service_answers_without_a_pod() {
    let f = fixture();
    let e = f
        .svc
        .checkpoint(api::CheckpointTaskRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Unimplemented);
    let e = f
        .svc
        .create(api::CreateTaskRequest {
            id: "c1".into(),
            bundle: "/nonexistent/bundle".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::NotFound, "{e}");
    let c = f
        .svc
        .connect(api::ConnectRequest {
            id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((c.shim_pid, c.task_pid), (42, 0));
}

#[tokio::test]
async fn pids_stats_pause_resume_resize_close_io_update() {
    let f = fixture();
    f.create("c1", None).await;
    let pid = f.start("c1", "").await;
    let pids = f
        .svc
        .pids(api::PidsRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        pids.processes.iter().map(|p| p.pid).collect::<Vec<_>>(),
        [pid]
    );
    let s = f
        .svc
        .stats(api::StatsRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(s.stats.type_url, crate::metrics::TYPE_URL);
    f.svc
        .pause(api::PauseRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(f.status("c1", "").await, api::Status::PAUSED);
    f.svc
        .resume(api::ResumeRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(f.status("c1", "").await, api::Status::RUNNING);
    f.svc
        .resize_pty(api::ResizePtyRequest {
            id: "c1".into(),
            width: 80,
            height: 24,
            ..Default::default()
        })
        .await
        .unwrap();
    f.svc
        .close_io(api::CloseIORequest {
            id: "c1".into(),
            stdin: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let e = f
        .svc
        .update(api::UpdateTaskRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::InvalidArgument);
    let calls = f.pod.calls.lock().clone();
    for want in ["freeze c1/", "resize c1/", "close_stdin c1/"] {
        assert!(calls.iter().any(|c| c == want), "{want} in {calls:?}");
    }
    assert_eq!(
        topics(&f.events())[2..],
        ["/tasks/paused", "/tasks/resumed"]
    );
}

/// Every variant of the task service's own errors has its kind, and every
/// kind its ttrpc code (the mapping itself is `veil_protocol::status`).
#[test]
fn every_task_error_has_its_kind_and_code() {
    use ttrpc::Code;
    let cases: Vec<(TaskError, Kind, Code)> = vec![
        (
            TaskError::NotFound("c".into()),
            Kind::NotFound,
            Code::NOT_FOUND,
        ),
        (
            TaskError::AlreadyExists("c".into()),
            Kind::AlreadyExists,
            Code::ALREADY_EXISTS,
        ),
        (
            TaskError::InvalidArgument("x".into()),
            Kind::InvalidArgument,
            Code::INVALID_ARGUMENT,
        ),
        (
            TaskError::FailedPrecondition("x".into()),
            Kind::FailedPrecondition,
            Code::FAILED_PRECONDITION,
        ),
        (
            TaskError::Unimplemented("checkpoint"),
            Kind::Unimplemented,
            Code::UNIMPLEMENTED,
        ),
        (
            TaskError::Id(veil_common::validate_id("container id", "").unwrap_err()),
            Kind::InvalidArgument,
            Code::INVALID_ARGUMENT,
        ),
        (
            TaskError::Options(crate::config::ConfigError::UnknownHandler("h".into())),
            Kind::InvalidArgument,
            Code::INVALID_ARGUMENT,
        ),
        (
            TaskError::Spec(crate::spec::SpecError::NotObject),
            Kind::InvalidArgument,
            Code::INVALID_ARGUMENT,
        ),
        (
            TaskError::Rootfs(crate::rootfs::RootfsError::Unsupported("x".into())),
            Kind::InvalidArgument,
            Code::INVALID_ARGUMENT,
        ),
        (
            TaskError::Transition {
                process: "c1".into(),
                source: super::process::TransitionError::Exited,
            },
            Kind::FailedPrecondition,
            Code::FAILED_PRECONDITION,
        ),
        (
            TaskError::Pod(crate::pod::PodError::from(super::fake::FakeError {
                kind: Kind::DataLoss,
                message: "bad".into(),
            })),
            Kind::DataLoss,
            Code::DATA_LOSS,
        ),
        (
            TaskError::Metrics(protobuf::Error::from(std::io::Error::other("x"))),
            Kind::Internal,
            Code::INTERNAL,
        ),
    ];
    for (e, kind, code) in cases {
        assert_eq!(e.kind(), kind, "{e}");
        match veil_protocol::status::to_ttrpc(&e) {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), code, "{e}");
                assert!(!s.message.contains("Status {"), "{}", s.message);
            }
            other => panic!("{other:?}"),
        }
    }
}
