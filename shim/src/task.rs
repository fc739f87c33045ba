//! The containerd task API (v2), served for one pod: containers and their
//! processes, relayed to the agent in the pod VM.
//!
//! [`TaskService`] is the edge: it takes containerd's request messages,
//! translates them into our terms once (rootfs mounts, stdio paths, specs),
//! and drives the [`Sandbox`] and the agent. It needs no ttrpc context, so it
//! is callable directly from tests; [`TaskServer`] is the thin ttrpc adapter.
//! Errors are [`TaskError`]s; [`crate::status`] maps them to ttrpc codes.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use containerd_shim_protos::{
    api::{self, Empty, ProcessInfo, Status as TaskStatus},
    protobuf::{
        well_known_types::{any::Any, timestamp::Timestamp},
        MessageField,
    },
};
use tokio::sync::watch;
use veil_protocol::agent::{
    ContainerRequest, CreateContainerRequest, ExecProcessRequest, ProcessRequest,
    ResizeTerminalRequest, Rootfs, SignalProcessRequest, UpdateContainerRequest,
};

use crate::{
    agent::{self, AgentError},
    config::{ConfigError, ConfigSource},
    container::{Container, ExitInfo, ProcStatus, Process},
    events::{EventSink, TaskEvent},
    phases::Phases,
    rootfs::{Layers, RootfsError, RootfsMount},
    sandbox::{self, BootParams, Sandbox, SandboxError},
    spec::{HostSpec, SpecError},
    state,
    stdio::{Relay, StdioError, StdioPaths},
};

/// How long output may still flow after the agent reported an exit (it
/// reports it once the output was written, so this only covers transit).
const OUTPUT_GRACE: Duration = Duration::from_secs(30);

/// File in the bundle recording which config the pod uses (for `delete`).
pub const BUNDLE_CONFIG_FILE: &str = "veil-config";

/// Errors of the task service.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No such container or process.
    #[error("{0} not found")]
    NotFound(String),
    /// The id is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A malformed request.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The request does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Not supported by veil.
    #[error("{0} is not supported by veil")]
    Unimplemented(&'static str),
    /// The configuration.
    #[error("configuration")]
    Config(#[from] ConfigError),
    /// The bundle's spec.
    #[error("bundle spec")]
    Spec(#[from] SpecError),
    /// The pod VM.
    #[error("pod VM")]
    Sandbox(#[from] SandboxError),
    /// The agent.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The root image.
    #[error("root filesystem")]
    Rootfs(#[from] RootfsError),
    /// stdio.
    #[error("stdio")]
    Stdio(#[from] StdioError),
}

/// What the service was started with.
pub struct ServiceContext {
    /// containerd namespace.
    pub namespace: String,
    /// This shim's PID.
    pub shim_pid: u32,
    /// Where events go.
    pub events: Arc<dyn EventSink>,
    /// When `start` ran (ns since epoch), for the first phase mark.
    pub start_cmd_ns: Option<u128>,
    /// When the server started serving (0 until known).
    pub serving_ns: u128,
}

/// The task service of one pod.
pub struct TaskService {
    ctx: ServiceContext,
    pod: tokio::sync::Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    shutdown: watch::Sender<bool>,
    serving_ns: std::sync::atomic::AtomicU64,
}

fn ts(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    MessageField::some(Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    })
}

fn from_ns(ns: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
}

impl TaskService {
    /// A service with no pod yet.
    pub fn new(ctx: ServiceContext) -> Self {
        TaskService {
            pod: tokio::sync::Mutex::new(None),
            serving_ns: std::sync::atomic::AtomicU64::new(
                u64::try_from(ctx.serving_ns).unwrap_or(0),
            ),
            ctx,
            containers: Mutex::new(HashMap::new()),
            shutdown: watch::channel(false).0,
        }
    }

    /// Records when the server started serving (a phase mark).
    pub fn set_serving(&self, ns: u128) {
        self.serving_ns.store(
            u64::try_from(ns).unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Resolves once `Shutdown` decided the shim should exit.
    pub fn exit_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, TaskError> {
        self.containers
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))
    }

    async fn pod(&self) -> Result<Arc<Sandbox>, TaskError> {
        self.pod
            .lock()
            .await
            .clone()
            .ok_or_else(|| TaskError::FailedPrecondition("the pod VM is not running".into()))
    }

    /// PIDs of the pod's VMM and vsock backend (for tests and reports).
    pub async fn vm_pids(&self) -> Vec<u32> {
        match self.pod.lock().await.as_ref() {
            Some(p) => p.pids(),
            None => Vec::new(),
        }
    }

    /// Task `Create`: boots the pod VM for the pod's first container, builds
    /// and attaches the root image, creates the container in the guest.
    pub async fn create(
        &self,
        req: api::CreateTaskRequest,
    ) -> Result<api::CreateTaskResponse, TaskError> {
        let phases = Phases::default();
        phases.mark("create");
        if !state::valid_id(&req.id) {
            return Err(TaskError::InvalidArgument(format!(
                "container id '{}'",
                req.id
            )));
        }
        if self
            .containers
            .lock()
            .is_ok_and(|m| m.contains_key(&req.id))
        {
            return Err(TaskError::AlreadyExists(format!("container {}", req.id)));
        }
        if !req.checkpoint.is_empty() {
            return Err(TaskError::Unimplemented("restoring from a checkpoint"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = HostSpec::read(&bundle)?;
        let sandbox_id = spec.sandbox_id(&req.id).to_string();
        let mounts: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                typ: m.type_.clone(),
                source: PathBuf::from(&m.source),
                options: m.options.clone(),
            })
            .collect();
        let layers = Layers::from_mounts(&mounts)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal || spec.terminal(),
        };

        let pod = {
            let mut slot = self.pod.lock().await;
            match slot.as_ref() {
                Some(p) if p.id == sandbox_id => p.clone(),
                Some(p) => {
                    return Err(TaskError::FailedPrecondition(format!(
                        "container {} belongs to pod {sandbox_id}, this shim runs pod {}",
                        req.id, p.id
                    )))
                }
                None if sandbox_id != req.id => {
                    return Err(TaskError::FailedPrecondition(format!(
                        "pod {sandbox_id} has no VM: its sandbox container must be created first"
                    )))
                }
                None => {
                    if let Some(ns) = self.ctx.start_cmd_ns {
                        phases.mark_at("start_cmd", ns);
                    }
                    phases.mark_at(
                        "serving",
                        u128::from(self.serving_ns.load(std::sync::atomic::Ordering::Relaxed)),
                    );
                    let source = ConfigSource::from_options(req.options.as_ref())?;
                    let (config, handler_name) = source.load()?;
                    let handler = config.handler(&handler_name)?.clone();
                    let _ = std::fs::write(
                        bundle.join(BUNDLE_CONFIG_FILE),
                        format!("{}#{handler_name}", source.path.display()),
                    );
                    tracing::info!(pod = %sandbox_id, handler = %handler_name, "booting pod VM");
                    // Build the root image while the VM boots.
                    let store = sandbox::image_store(&config, &handler);
                    let scratch = config.state_dir.join(&sandbox_id);
                    let (l, holder) = (layers.clone(), sandbox_id.clone());
                    let build = tokio::task::spawn_blocking(move || {
                        let _ = std::fs::create_dir_all(&scratch);
                        store.acquire(&l, &holder, &scratch)
                    });
                    let booted = Sandbox::boot(
                        BootParams {
                            id: &sandbox_id,
                            config: &config,
                            handler: &handler,
                            hostname: spec
                                .hostname()
                                .unwrap_or(&sandbox_id)
                                .chars()
                                .take(64)
                                .collect(),
                            host_services: Vec::new(),
                        },
                        &phases,
                    )
                    .await;
                    let built = build.await;
                    let sb = match booted {
                        Ok(sb) => Arc::new(sb),
                        Err(e) => {
                            // The build's ref (if any) goes with the pod.
                            let store = sandbox::image_store(&config, &handler);
                            let _ = store.release_holder(&sandbox_id);
                            return Err(e.into());
                        }
                    };
                    match built {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            sb.shutdown().await;
                            return Err(e.into());
                        }
                        Err(join) => {
                            sb.shutdown().await;
                            return Err(TaskError::FailedPrecondition(format!(
                                "image build task failed: {join}"
                            )));
                        }
                    }
                    *slot = Some(sb.clone());
                    sb
                }
            }
        };

        let result = self
            .create_in_pod(&pod, &req, &layers, &spec, &stdio, &phases)
            .await;
        match result {
            Ok(c) => {
                let pid = c.init.status().1;
                if let Ok(mut slot) = c.start_phases.lock() {
                    *slot = Some(phases);
                }
                if let Ok(mut m) = self.containers.lock() {
                    m.insert(req.id.clone(), c);
                }
                self.ctx.events.publish(TaskEvent::Create {
                    id: req.id.clone(),
                    bundle: req.bundle.clone(),
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: stdio.terminal,
                    pid,
                });

                Ok(api::CreateTaskResponse {
                    pid,
                    ..Default::default()
                })
            }
            Err(e) => {
                if sandbox_id == req.id && self.containers.lock().is_ok_and(|m| m.is_empty()) {
                    if let Some(p) = self.pod.lock().await.take() {
                        p.shutdown().await;
                    }
                }
                Err(e)
            }
        }
    }

    async fn create_in_pod(
        &self,
        pod: &Arc<Sandbox>,
        req: &api::CreateTaskRequest,
        layers: &Layers,
        spec: &HostSpec,
        stdio: &StdioPaths,
        phases: &Phases,
    ) -> Result<Arc<Container>, TaskError> {
        let guest = spec.for_guest(pod.has_scratch)?;
        let store = pod.store().clone();
        let scratch = PathBuf::from(&req.bundle);
        let (l, holder) = (layers.clone(), pod.id.clone());
        let image = tokio::task::spawn_blocking(move || store.acquire(&l, &holder, &scratch))
            .await
            .map_err(|e| TaskError::FailedPrecondition(format!("image task failed: {e}")))??;
        let storage_id = pod.attach_image(&image, spec.image_name()).await?;
        phases.mark("rootfs_attached");
        let created = async {
            let mut c = CreateContainerRequest::new();
            c.container_id = req.id.clone();
            c.oci_spec = guest.json.clone();
            let mut root = Rootfs::new();
            root.storage_id = storage_id.clone();
            if pod.has_scratch {
                // The writable layer on the encrypted scratch disk.
                root.upper_storage_id = crate::storage::scratch::STORAGE_ID.into();
            }
            c.rootfs = MessageField::some(root);
            c.stdio = MessageField::some(stdio.wanted());
            let resp = agent::rpc(
                "CreateContainer",
                pod.agent
                    .containers
                    .create_container(agent::ctx(), &c)
                    .await,
            )?;
            let relay = match Relay::attach(&pod.agent, &req.id, "", stdio).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = pod
                        .agent
                        .containers
                        .remove_container(agent::ctx(), &creq(&req.id))
                        .await;
                    return Err(TaskError::from(e));
                }
            };
            Ok::<_, TaskError>((resp.pid, relay))
        }
        .await;
        let (pid, relay) = match created {
            Ok(x) => x,
            Err(e) => {
                let _ = pod.detach_image(&image.key).await;
                return Err(e);
            }
        };
        phases.mark("container_created");
        Ok(Arc::new(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            image_key: image.key,
            init: Process::new("", stdio.clone(), relay, pid),
            execs: Mutex::new(HashMap::new()),
            paused: Mutex::new(false),
            start_phases: Mutex::new(None),
        }))
    }

    /// Task `Start`: runs the container's program or an exec'd process.
    pub async fn start(&self, req: api::StartRequest) -> Result<api::StartResponse, TaskError> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if p.status().0 != ProcStatus::Created {
            return Err(TaskError::FailedPrecondition(format!(
                "process {}/{} was already started",
                req.id, req.exec_id
            )));
        }
        let pod = self.pod().await?;
        let r = agent::rpc(
            "StartProcess",
            pod.agent
                .containers
                .start_process(agent::ctx(), &preq(&req.id, &req.exec_id))
                .await,
        )?;
        p.set(ProcStatus::Running, r.pid);
        self.spawn_waiter(pod.clone(), c.clone(), p.clone());
        if req.exec_id.is_empty() {
            self.ctx.events.publish(TaskEvent::Start {
                id: req.id.clone(),
                pid: r.pid,
            });
            let phases = c.start_phases.lock().ok().and_then(|mut p| p.take());
            if let Some(ph) = phases {
                ph.mark("container_started");
                tracing::info!("{}", ph.line(&pod.id, &req.id));
            }
        } else {
            self.ctx.events.publish(TaskEvent::ExecStarted {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: r.pid,
            });
        }
        Ok(api::StartResponse {
            pid: r.pid,
            ..Default::default()
        })
    }

    /// Waits for the process in the guest, then for its output to be
    /// delivered, then reports the exit.
    fn spawn_waiter(&self, pod: Arc<Sandbox>, c: Arc<Container>, p: Arc<Process>) {
        let events = self.ctx.events.clone();
        tokio::spawn(async move {
            let waited = pod
                .agent
                .containers
                .wait_process(agent::ctx_unbounded(), &preq(&c.id, &p.exec_id))
                .await;
            let (status, at) = match waited {
                Ok(w) => (
                    u32::try_from(w.exit_status).unwrap_or(255),
                    from_ns(w.exited_at_ns),
                ),
                Err(e) => {
                    tracing::warn!(container = %c.id, exec = %p.exec_id, error = %e, "lost the process");
                    (255, SystemTime::now())
                }
            };
            {
                let mut relay = p.relay.lock().await;
                // Input first: a terminal's connection carries both directions
                // and only closes (EOF for its output) once our side is done.
                relay.close_stdin();
                if tokio::time::timeout(OUTPUT_GRACE, relay.finish_output())
                    .await
                    .is_err()
                {
                    tracing::warn!(container = %c.id, exec = %p.exec_id, "output did not end after the exit");
                }
            }
            let pid = p.status().1;
            p.set(ProcStatus::Stopped, pid);
            p.exit_tx.send_replace(Some(ExitInfo { status, at }));
            events.publish(TaskEvent::Exit {
                id: c.id.clone(),
                exec_id: p.exec_id.clone(),
                pid,
                status,
                at,
            });
        });
    }

    /// Task `Delete`: removes an exec'd process or the container.
    pub async fn delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse, TaskError> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let (status, pid) = p.status();
        if status == ProcStatus::Running {
            return Err(TaskError::FailedPrecondition(format!(
                "process {}/{} is running",
                req.id, req.exec_id
            )));
        }
        let exit = p.exit().unwrap_or(ExitInfo {
            status: 0,
            at: SystemTime::now(),
        });
        let pod = self.pod().await?;
        if !req.exec_id.is_empty() {
            if status == ProcStatus::Stopped {
                agent::rpc(
                    "DeleteProcess",
                    pod.agent
                        .containers
                        .delete_process(agent::ctx(), &preq(&req.id, &req.exec_id))
                        .await,
                )?;
            }
            if let Ok(mut m) = c.execs.lock() {
                m.remove(&req.exec_id);
            }
        } else {
            if status == ProcStatus::Created {
                // Never started: kill the waiting init so it can be removed.
                let mut s = SignalProcessRequest::new();
                s.container_id = req.id.clone();
                s.signal = 9;
                let _ = pod.agent.containers.signal_process(agent::ctx(), &s).await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    pod.agent
                        .containers
                        .wait_process(agent::ctx(), &preq(&req.id, "")),
                )
                .await;
            }
            agent::rpc(
                "RemoveContainer",
                pod.agent
                    .containers
                    .remove_container(agent::ctx(), &creq(&req.id))
                    .await,
            )?;
            pod.detach_image(&c.image_key).await?;
            if let Ok(mut m) = self.containers.lock() {
                m.remove(&req.id);
            }
            self.ctx.events.publish(TaskEvent::Delete {
                id: req.id.clone(),
                pid,
                status: exit.status,
                at: exit.at,
            });
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    /// Task `Exec`: prepares a process in a running container.
    pub async fn exec(&self, req: api::ExecProcessRequest) -> Result<Empty, TaskError> {
        let c = self.container(&req.id)?;
        if !state::valid_id(&req.exec_id) {
            return Err(TaskError::InvalidArgument(format!(
                "exec id '{}'",
                req.exec_id
            )));
        }
        if c.process(&req.exec_id).is_ok() {
            return Err(TaskError::AlreadyExists(format!(
                "process {}/{}",
                req.id, req.exec_id
            )));
        }
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| TaskError::InvalidArgument("exec without a process spec".into()))?;
        let pod = self.pod().await?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut e = ExecProcessRequest::new();
        e.container_id = req.id.clone();
        e.exec_id = req.exec_id.clone();
        e.process = spec.value.clone();
        e.stdio = MessageField::some(stdio.wanted());
        agent::rpc(
            "ExecProcess",
            pod.agent.containers.exec_process(agent::ctx(), &e).await,
        )?;
        let relay = match Relay::attach(&pod.agent, &req.id, &req.exec_id, &stdio).await {
            Ok(r) => r,
            Err(err) => {
                let _ = pod
                    .agent
                    .containers
                    .delete_process(agent::ctx(), &preq(&req.id, &req.exec_id))
                    .await;
                return Err(err.into());
            }
        };
        if let Ok(mut m) = c.execs.lock() {
            m.insert(
                req.exec_id.clone(),
                Process::new(&req.exec_id, stdio, relay, 0),
            );
        }
        self.ctx.events.publish(TaskEvent::ExecAdded {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
        });
        Ok(Empty::new())
    }

    /// Task `State`.
    pub async fn state(&self, req: api::StateRequest) -> Result<api::StateResponse, TaskError> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let (status, pid) = p.status();
        let paused = c.paused.lock().map(|p| *p).unwrap_or(false);
        let status = match status {
            ProcStatus::Created => TaskStatus::CREATED,
            ProcStatus::Running if paused => TaskStatus::PAUSED,
            ProcStatus::Running => TaskStatus::RUNNING,
            ProcStatus::Stopped => TaskStatus::STOPPED,
        };
        let exit = p.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid,
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| ts(e.at)).unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    /// Task `Kill`: signals a process, or every process of the container.
    pub async fn kill(&self, req: api::KillRequest) -> Result<Empty, TaskError> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if p.status().0 == ProcStatus::Stopped && !req.all {
            return Err(TaskError::NotFound(format!(
                "process {}/{}: already finished",
                req.id, req.exec_id
            )));
        }
        let pod = self.pod().await?;
        let mut s = SignalProcessRequest::new();
        s.container_id = req.id.clone();
        s.exec_id = req.exec_id.clone();
        s.signal = req.signal;
        s.all = req.all;
        agent::rpc(
            "SignalProcess",
            pod.agent.containers.signal_process(agent::ctx(), &s).await,
        )?;
        Ok(Empty::new())
    }

    /// Task `Wait`: blocks until the process exited and its output was delivered.
    pub async fn wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse, TaskError> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let mut rx = p.exit_tx.subscribe();
        let exit = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                return Err(TaskError::NotFound(format!(
                    "process {}/{}",
                    req.id, req.exec_id
                )));
            }
        };
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    /// Task `Pids`: the container's processes (guest PIDs).
    pub async fn pids(&self, req: api::PidsRequest) -> Result<api::PidsResponse, TaskError> {
        self.container(&req.id)?;
        let pod = self.pod().await?;
        let r = agent::rpc(
            "ListPids",
            pod.agent
                .containers
                .list_pids(agent::ctx(), &creq(&req.id))
                .await,
        )?;
        Ok(api::PidsResponse {
            processes: r
                .pids
                .iter()
                .map(|pid| ProcessInfo {
                    pid: *pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn freeze(&self, id: &str, pause: bool) -> Result<Empty, TaskError> {
        let c = self.container(id)?;
        let pod = self.pod().await?;
        if pause {
            agent::rpc(
                "PauseContainer",
                pod.agent
                    .containers
                    .pause_container(agent::ctx(), &creq(id))
                    .await,
            )?;
        } else {
            agent::rpc(
                "ResumeContainer",
                pod.agent
                    .containers
                    .resume_container(agent::ctx(), &creq(id))
                    .await,
            )?;
        }
        if let Ok(mut p) = c.paused.lock() {
            *p = pause;
        }
        let id = id.to_string();
        self.ctx.events.publish(if pause {
            TaskEvent::Paused { id }
        } else {
            TaskEvent::Resumed { id }
        });
        Ok(Empty::new())
    }

    /// Task `Pause` (cgroup freezer in the guest).
    pub async fn pause(&self, req: api::PauseRequest) -> Result<Empty, TaskError> {
        self.freeze(&req.id, true).await
    }

    /// Task `Resume`.
    pub async fn resume(&self, req: api::ResumeRequest) -> Result<Empty, TaskError> {
        self.freeze(&req.id, false).await
    }

    /// Task `ResizePty`.
    pub async fn resize_pty(&self, req: api::ResizePtyRequest) -> Result<Empty, TaskError> {
        let c = self.container(&req.id)?;
        c.process(&req.exec_id)?;
        let pod = self.pod().await?;
        let mut r = ResizeTerminalRequest::new();
        r.container_id = req.id.clone();
        r.exec_id = req.exec_id.clone();
        r.rows = req.height;
        r.cols = req.width;
        agent::rpc(
            "ResizeTerminal",
            pod.agent.containers.resize_terminal(agent::ctx(), &r).await,
        )?;
        Ok(Empty::new())
    }

    /// Task `CloseIO`: closes the process's stdin.
    pub async fn close_io(&self, req: api::CloseIORequest) -> Result<Empty, TaskError> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            p.relay.lock().await.close_stdin();
            let pod = self.pod().await?;
            agent::rpc(
                "CloseStdin",
                pod.agent
                    .containers
                    .close_stdin(agent::ctx(), &preq(&req.id, &req.exec_id))
                    .await,
            )?;
        }
        Ok(Empty::new())
    }

    /// Task `Update`: new cgroup resources (OCI `LinuxResources` as JSON).
    pub async fn update(&self, req: api::UpdateTaskRequest) -> Result<Empty, TaskError> {
        self.container(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .ok_or_else(|| TaskError::InvalidArgument("update without resources".into()))?;
        let pod = self.pod().await?;
        let mut u = UpdateContainerRequest::new();
        u.container_id = req.id.clone();
        u.resources = resources.value.clone();
        agent::rpc(
            "UpdateContainer",
            pod.agent
                .containers
                .update_container(agent::ctx(), &u)
                .await,
        )?;
        Ok(Empty::new())
    }

    /// Task `Stats`: the guest cgroup's statistics as containerd's cgroup v1
    /// `Metrics` (what `ctr task metrics` decodes).
    pub async fn stats(&self, req: api::StatsRequest) -> Result<api::StatsResponse, TaskError> {
        self.container(&req.id)?;
        let pod = self.pod().await?;
        let s = agent::rpc(
            "StatsContainer",
            pod.agent
                .containers
                .stats_container(agent::ctx(), &creq(&req.id))
                .await,
        )?;
        let value = crate::metrics::cgroup_v1(&s)
            .map_err(|e| TaskError::InvalidArgument(format!("encoding metrics: {e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: crate::metrics::TYPE_URL.into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Task `Connect`.
    pub async fn connect(
        &self,
        req: api::ConnectRequest,
    ) -> Result<api::ConnectResponse, TaskError> {
        let task_pid = self
            .container(&req.id)
            .map(|c| c.init.status().1)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: self.ctx.shim_pid,
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    /// Task `Shutdown`: once the pod has no containers left, stops the VM and
    /// lets the shim exit; otherwise a no-op.
    pub async fn shutdown(&self, _req: api::ShutdownRequest) -> Result<Empty, TaskError> {
        if self.containers.lock().is_ok_and(|m| !m.is_empty()) {
            return Ok(Empty::new());
        }
        self.stop_pod().await;
        self.shutdown.send_replace(true);
        Ok(Empty::new())
    }

    /// Stops the pod VM, if any (also on SIGTERM).
    pub async fn stop_pod(&self) {
        if let Some(p) = self.pod.lock().await.take() {
            p.shutdown().await;
        }
    }

    /// Task `Checkpoint`.
    pub async fn checkpoint(&self, _req: api::CheckpointTaskRequest) -> Result<Empty, TaskError> {
        Err(TaskError::Unimplemented("checkpoint"))
    }
}

fn creq(id: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = id.to_string();
    r
}

fn preq(id: &str, exec: &str) -> ProcessRequest {
    let mut r = ProcessRequest::new();
    r.container_id = id.to_string();
    r.exec_id = exec.to_string();
    r
}

/// The ttrpc adapter: each method calls the service and maps its error.
pub struct TaskServer(pub Arc<TaskService>);

macro_rules! relay {
    ($( $name:ident : $req:ty => $resp:ty ),* $(,)?) => {
        #[async_trait::async_trait]
        impl containerd_shim_protos::shim_async::Task for TaskServer {
            $(
                async fn $name(
                    &self,
                    _ctx: &ttrpc::asynchronous::TtrpcContext,
                    req: $req,
                ) -> ttrpc::Result<$resp> {
                    tracing::debug!(method = stringify!($name), "task request");
                    self.0.$name(req).await.map_err(|e| {
                        tracing::warn!(method = stringify!($name), error = %crate::error_chain(&e), "task request failed");
                        crate::status::to_ttrpc(&e)
                    })
                }
            )*
        }
    };
}

relay! {
    state: api::StateRequest => api::StateResponse,
    create: api::CreateTaskRequest => api::CreateTaskResponse,
    start: api::StartRequest => api::StartResponse,
    delete: api::DeleteRequest => api::DeleteResponse,
    pids: api::PidsRequest => api::PidsResponse,
    pause: api::PauseRequest => Empty,
    resume: api::ResumeRequest => Empty,
    checkpoint: api::CheckpointTaskRequest => Empty,
    kill: api::KillRequest => Empty,
    exec: api::ExecProcessRequest => Empty,
    resize_pty: api::ResizePtyRequest => Empty,
    close_io: api::CloseIORequest => Empty,
    update: api::UpdateTaskRequest => Empty,
    wait: api::WaitRequest => api::WaitResponse,
    stats: api::StatsRequest => api::StatsResponse,
    connect: api::ConnectRequest => api::ConnectResponse,
    shutdown: api::ShutdownRequest => Empty,
}

/// Reads the config a pod was created with from its bundle (for `delete`).
pub fn bundle_config(bundle: &Path) -> ConfigSource {
    std::fs::read_to_string(bundle.join(BUNDLE_CONFIG_FILE))
        .map(|s| ConfigSource::from_config_path(s.trim()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::RecordingSink;

    fn service() -> TaskService {
        TaskService::new(ServiceContext {
            namespace: "test".into(),
            shim_pid: 1,
            events: Arc::new(RecordingSink::default()),
            start_cmd_ns: None,
            serving_ns: 0,
        })
    }

    #[tokio::test]
    async fn unknown_ids_are_not_found() {
        let s = service();
        let e = s
            .state(api::StateRequest {
                id: "nope".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, TaskError::NotFound(_)), "{e}");
        let e = s
            .kill(api::KillRequest {
                id: "nope".into(),
                signal: 9,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, TaskError::NotFound(_)));
    }

    #[tokio::test]
    async fn checkpoint_is_unimplemented() {
        let e = service()
            .checkpoint(api::CheckpointTaskRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(e, TaskError::Unimplemented(_)));
    }

    #[tokio::test]
    async fn a_pod_member_before_its_sandbox_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.json"),
            br#"{"annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod1"}}"#,
        )
        .unwrap();
        let e = service()
            .create(api::CreateTaskRequest {
                id: "c1".into(),
                bundle: d.path().display().to_string(),
                rootfs: vec![api::Mount {
                    type_: "bind".into(),
                    source: d.path().display().to_string(),
                    options: vec!["ro".into()],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, TaskError::FailedPrecondition(_)), "{e}");
    }

    #[tokio::test]
    async fn bad_input_is_invalid_or_not_found() {
        let s = service();
        let e = s
            .create(api::CreateTaskRequest {
                id: "../x".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, TaskError::InvalidArgument(_)));
        let e = s
            .create(api::CreateTaskRequest {
                id: "c1".into(),
                bundle: "/nonexistent/bundle".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, TaskError::Spec(SpecError::Read { .. })), "{e}");
    }

    #[tokio::test]
    async fn shutdown_without_containers_signals_exit() {
        let s = service();
        let rx = s.exit_signal();
        s.shutdown(api::ShutdownRequest::default()).await.unwrap();
        assert!(*rx.borrow());
        let c = s
            .connect(api::ConnectRequest {
                id: "x".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!((c.shim_pid, c.task_pid), (1, 0));
    }
}
