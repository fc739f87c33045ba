//! containerd's sandbox API (`containerd.runtime.sandbox.v1.Sandbox`),
//! served by the same [`TaskService`] that serves the task API.
//!
//! containerd 2.x drives a runtime configured with `sandboxer = "shim"`
//! through this service: `CreateSandbox` (the pod's bundle, options and
//! network namespace), `StartSandbox` (the pod VM boots here, as it does at
//! the task API's `Create` of a sandbox container, but with no sandbox
//! container and so no root image), then the pod's containers through the
//! task API, `StopSandbox` (the VM and everything of it on the host goes, as
//! at the pod's teardown), `WaitSandbox`, and `ShutdownSandbox` (the shim
//! exits). `SandboxStatus`, `PingSandbox` and `Platform` answer at any
//! point. One shim serves one sandbox; a call naming another fails
//! `NotFound`, a call that does not fit the sandbox's state fails
//! `FailedPrecondition`, each naming the call and why.
//!
//! A pod whose VM was booted by the task API (containerd 1.6, or 2.x
//! without `sandboxer = "shim"`) is not a sandbox of this API: the two ways
//! do not mix in one shim.

use std::{path::PathBuf, sync::Arc, time::SystemTime};

use containerd_shim_protos::{
    protobuf::{well_known_types::any::Any, MessageField},
    sandbox_api as sb,
    types::platform::Platform,
};
use tokio::sync::watch;
use veil_common::validate_id;

use super::{ts, TaskError, TaskService};
use crate::{
    config::ConfigSource,
    phases::Phases,
    pod::{ExitInfo, LaunchRequest},
    spec::HostSpec,
};

/// The sandbox state `SandboxStatus` reports while the pod VM runs (the
/// names containerd's CRI plugin uses for its sandbox store).
pub const STATE_READY: &str = "SANDBOX_READY";
/// ... and before it started or after it stopped.
pub const STATE_NOT_READY: &str = "SANDBOX_NOTREADY";

/// The sandbox API calls this shim answers (also in `-info`'s annotations).
pub const SUPPORTED_CALLS: &[&str] = &[
    "CreateSandbox",
    "StartSandbox",
    "Platform",
    "StopSandbox",
    "WaitSandbox",
    "SandboxStatus",
    "PingSandbox",
    "ShutdownSandbox",
];

/// Where a sandbox of this API is in its life.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// `CreateSandbox` ran; no VM yet.
    Created,
    /// The pod VM runs; `pid` is its VMM's.
    Running { pid: u32, started_at: SystemTime },
    /// Stopped (or never started and stopped).
    Stopped { pid: u32, exit: ExitInfo },
}

/// The sandbox of this shim, as `CreateSandbox` described it.
pub(super) struct SandboxRecord {
    id: String,
    bundle: PathBuf,
    options: Option<Any>,
    netns: Option<PathBuf>,
    created_at: SystemTime,
    phase: crate::sync::Lock<Phase>,
    exit: watch::Sender<Option<ExitInfo>>,
}

impl SandboxRecord {
    fn phase(&self) -> Phase {
        *self.phase.lock()
    }

    /// Whether it holds the shim: created or running, not stopped.
    pub(super) fn live(&self) -> bool {
        !matches!(self.phase(), Phase::Stopped { .. })
    }

    /// Records the end of a sandbox whose VM was stopped outside the API
    /// (SIGTERM); a stopped one keeps its exit.
    pub(super) fn stop_now(&self, status: u32) {
        let pid = match self.phase() {
            Phase::Stopped { .. } => return,
            Phase::Created => 0,
            Phase::Running { pid, .. } => pid,
        };
        self.stopped(pid, status);
    }

    fn stopped(&self, pid: u32, status: u32) -> ExitInfo {
        let exit = ExitInfo {
            status,
            at: SystemTime::now(),
        };
        *self.phase.lock() = Phase::Stopped { pid, exit };
        self.exit.send_replace(Some(exit));
        exit
    }
}

/// containerd's name of this machine's architecture (Go's `GOARCH`).
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl TaskService {
    /// The sandbox named `id` by call `call`.
    fn sandbox_named(&self, call: &str, id: &str) -> Result<Arc<SandboxRecord>, TaskError> {
        match self.sandbox.lock().as_ref() {
            Some(s) if s.id == id => Ok(Arc::clone(s)),
            Some(s) => Err(TaskError::NotFound(format!(
                "{call}: sandbox {id} (this shim serves sandbox {})",
                s.id
            ))),
            None => Err(TaskError::NotFound(format!(
                "{call}: sandbox {id} (no CreateSandbox reached this shim)"
            ))),
        }
    }

    /// `CreateSandbox`: checks the pod's bundle, options and namespaces and
    /// records them; the VM boots at `StartSandbox`.
    pub async fn create_sandbox(
        &self,
        req: sb::CreateSandboxRequest,
    ) -> Result<sb::CreateSandboxResponse, TaskError> {
        validate_id("sandbox id", &req.sandbox_id)?;
        if let Some(s) = self.sandbox.lock().as_ref() {
            return Err(TaskError::AlreadyExists(format!(
                "CreateSandbox: sandbox {} (this shim serves sandbox {}; one shim runs one pod)",
                req.sandbox_id, s.id
            )));
        }
        if let Some(p) = self.pod.lock().await.as_ref() {
            return Err(TaskError::FailedPrecondition(format!(
                "CreateSandbox {}: this shim already runs pod {}, booted by the task API's Create of its sandbox container",
                req.sandbox_id,
                p.id()
            )));
        }
        if req.bundle_path.is_empty() {
            return Err(TaskError::InvalidArgument(format!(
                "CreateSandbox {}: no bundle_path (the pod's spec is read from its config.json)",
                req.sandbox_id
            )));
        }
        let bundle = PathBuf::from(&req.bundle_path);
        let spec = HostSpec::read(&bundle)?;
        spec.check_namespaces()?;
        let named = spec.sandbox_id(&req.sandbox_id);
        if named != req.sandbox_id {
            return Err(TaskError::InvalidArgument(format!(
                "CreateSandbox {}: the bundle's spec belongs to pod {named}",
                req.sandbox_id
            )));
        }
        // Refuse bad options now rather than at StartSandbox.
        ConfigSource::from_options(req.options.as_ref())?;
        if !req.rootfs.is_empty() {
            // No sandbox container runs in the guest: the VM is the sandbox.
            tracing::debug!(sandbox = %req.sandbox_id, mounts = req.rootfs.len(), "sandbox rootfs not used");
        }
        let netns = (!req.netns_path.is_empty())
            .then(|| PathBuf::from(&req.netns_path))
            .or_else(|| spec.network_namespace());
        let record = Arc::new(SandboxRecord {
            id: req.sandbox_id.clone(),
            bundle,
            options: req.options.into_option(),
            netns,
            created_at: SystemTime::now(),
            phase: crate::sync::Lock::new(Phase::Created),
            exit: watch::channel(None).0,
        });
        let mut slot = self.sandbox.lock();
        if let Some(s) = slot.as_ref() {
            return Err(TaskError::AlreadyExists(format!(
                "CreateSandbox: sandbox {} (this shim serves sandbox {})",
                req.sandbox_id, s.id
            )));
        }
        *slot = Some(record);
        tracing::info!(sandbox = %req.sandbox_id, "sandbox created (sandbox API)");
        Ok(sb::CreateSandboxResponse::new())
    }

    /// `StartSandbox`: boots the pod VM; answers with the VMM's PID.
    pub async fn start_sandbox(
        &self,
        req: sb::StartSandboxRequest,
    ) -> Result<sb::StartSandboxResponse, TaskError> {
        let s = self.sandbox_named("StartSandbox", &req.sandbox_id)?;
        let mut slot = self.pod.lock().await;
        match s.phase() {
            Phase::Created => {}
            Phase::Running { .. } => {
                return Err(TaskError::FailedPrecondition(format!(
                    "StartSandbox {}: the sandbox is already running",
                    s.id
                )))
            }
            Phase::Stopped { .. } => {
                return Err(TaskError::FailedPrecondition(format!(
                    "StartSandbox {}: the sandbox was stopped; a stopped sandbox is not restarted",
                    s.id
                )))
            }
        }
        if let Some(p) = slot.as_ref() {
            return Err(TaskError::FailedPrecondition(format!(
                "StartSandbox {}: this shim already runs pod {}",
                s.id,
                p.id()
            )));
        }
        let spec = HostSpec::read(&s.bundle)?;
        let phases = Phases::default();
        phases.mark("create");
        if let Some(ns) = self.ctx.start_cmd_ns {
            phases.mark_at("start_cmd", ns);
        }
        let pod = self
            .launcher
            .launch(
                LaunchRequest {
                    sandbox_id: &s.id,
                    bundle: s.bundle.clone(),
                    config: ConfigSource::from_options(s.options.as_ref())?,
                    hostname: spec.hostname().unwrap_or(&s.id).chars().take(64).collect(),
                    spec: &spec,
                    first_image: None,
                    netns: s.netns.clone(),
                },
                &phases,
            )
            .await?;
        self.spawn_event_relay(Arc::clone(&pod));
        let pid = pod
            .host_pids()
            .first()
            .copied()
            .unwrap_or(self.ctx.shim_pid);
        *slot = Some(pod);
        *s.phase.lock() = Phase::Running {
            pid,
            started_at: SystemTime::now(),
        };
        phases.mark("sandbox_started");
        tracing::info!(sandbox = %s.id, pid, "{}", phases.line(&s.id, &s.id));
        Ok(sb::StartSandboxResponse {
            pid,
            created_at: ts(s.created_at),
            ..Default::default()
        })
    }

    /// `Platform`: what the guest runs (Linux on the host's architecture).
    pub async fn platform(
        &self,
        req: sb::PlatformRequest,
    ) -> Result<sb::PlatformResponse, TaskError> {
        self.sandbox_named("Platform", &req.sandbox_id)?;
        Ok(sb::PlatformResponse {
            platform: MessageField::some(Platform {
                os: "linux".into(),
                architecture: go_arch().into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// `StopSandbox`: stops the pod VM and removes what it had on the host
    /// (the same teardown as the pod's end under the task API); the pod's
    /// processes end with 255. Stopping a stopped sandbox succeeds.
    pub async fn stop_sandbox(
        &self,
        req: sb::StopSandboxRequest,
    ) -> Result<sb::StopSandboxResponse, TaskError> {
        let s = self.sandbox_named("StopSandbox", &req.sandbox_id)?;
        match s.phase() {
            Phase::Stopped { .. } => {}
            Phase::Created => {
                s.stopped(0, 0);
            }
            Phase::Running { pid, .. } => {
                let pod = self.pod.lock().await.take();
                if let Some(p) = pod {
                    p.release_network();
                    self.end_pod(&*p).await;
                }
                s.stopped(pid, 0);
                tracing::info!(sandbox = %s.id, "sandbox stopped (sandbox API)");
            }
        }
        Ok(sb::StopSandboxResponse::new())
    }

    /// `WaitSandbox`: blocks until the sandbox stopped.
    pub async fn wait_sandbox(
        &self,
        req: sb::WaitSandboxRequest,
    ) -> Result<sb::WaitSandboxResponse, TaskError> {
        let s = self.sandbox_named("WaitSandbox", &req.sandbox_id)?;
        let mut rx = s.exit.subscribe();
        let exit = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                return Err(TaskError::FailedPrecondition(format!(
                    "WaitSandbox {}: the shim is shutting down",
                    s.id
                )));
            }
        };
        Ok(sb::WaitSandboxResponse {
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    /// `SandboxStatus`: state, the VMM's PID, when it was created and when
    /// it stopped; `verbose` adds the phase and the bundle in `info`.
    pub async fn sandbox_status(
        &self,
        req: sb::SandboxStatusRequest,
    ) -> Result<sb::SandboxStatusResponse, TaskError> {
        let s = self.sandbox_named("SandboxStatus", &req.sandbox_id)?;
        let (state, pid, exited, phase) = match s.phase() {
            Phase::Created => (STATE_NOT_READY, 0, None, "created"),
            Phase::Running { pid, .. } => (STATE_READY, pid, None, "running"),
            Phase::Stopped { pid, exit } => (STATE_NOT_READY, pid, Some(exit), "stopped"),
        };
        let mut info = std::collections::HashMap::new();
        if req.verbose {
            info.insert("phase".to_string(), phase.to_string());
            info.insert("bundle".to_string(), s.bundle.display().to_string());
            if let Phase::Running { started_at, .. } = s.phase() {
                info.insert(
                    "started_at".to_string(),
                    started_at
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs()
                        .to_string(),
                );
            }
        }
        Ok(sb::SandboxStatusResponse {
            sandbox_id: s.id.clone(),
            pid,
            state: state.into(),
            info,
            created_at: ts(s.created_at),
            exited_at: exited.map(|e| ts(e.at)).unwrap_or_default(),
            ..Default::default()
        })
    }

    /// `PingSandbox`: succeeds while the pod VM runs.
    pub async fn ping_sandbox(&self, req: sb::PingRequest) -> Result<sb::PingResponse, TaskError> {
        let s = self.sandbox_named("PingSandbox", &req.sandbox_id)?;
        match s.phase() {
            Phase::Running { .. } if self.pod.lock().await.is_some() => Ok(sb::PingResponse::new()),
            Phase::Created => Err(TaskError::FailedPrecondition(format!(
                "PingSandbox {}: the sandbox was created but not started",
                s.id
            ))),
            _ => Err(TaskError::FailedPrecondition(format!(
                "PingSandbox {}: the sandbox has stopped",
                s.id
            ))),
        }
    }

    /// `ShutdownSandbox`: stops the sandbox if it still runs, then lets the
    /// shim exit.
    pub async fn shutdown_sandbox(
        &self,
        req: sb::ShutdownSandboxRequest,
    ) -> Result<sb::ShutdownSandboxResponse, TaskError> {
        let s = self.sandbox_named("ShutdownSandbox", &req.sandbox_id)?;
        if s.live() {
            self.stop_sandbox(sb::StopSandboxRequest {
                sandbox_id: s.id.clone(),
                ..Default::default()
            })
            .await?;
        }
        self.shutdown.send_replace(true);
        Ok(sb::ShutdownSandboxResponse::new())
    }
}
