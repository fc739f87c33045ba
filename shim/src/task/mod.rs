//! The containerd task API (v2), served for one pod.
//!
//! [`TaskService`] is the edge: it takes containerd's request messages,
//! translates them into our terms once (rootfs mounts, stdio paths, specs),
//! keeps the state containerd asks about (containers, processes, exits) and
//! drives the pod through the [`Pod`] seam. It needs no ttrpc context and no
//! VM: the unit tests drive it against a fake pod. [`server::TaskServer`] is
//! the thin ttrpc adapter. Errors are [`TaskError`]s, each of which knows its
//! kind. The same service answers containerd's sandbox API
//! ([`sandbox_api`]), which boots the pod VM without a sandbox container.

pub mod process;
pub mod sandbox_api;
pub mod server;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod sandbox_api_tests;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::SystemTime,
};

use containerd_shim_protos::{
    api::{self, Empty, ProcessInfo, Status as TaskStatus},
    protobuf::{
        well_known_types::{any::Any, timestamp::Timestamp},
        MessageField,
    },
};
use tokio::sync::watch;
use veil_common::{validate_id, Classify, IdError, Kind};

use crate::{
    config::{ConfigError, ConfigSource},
    events::{EventSink, TaskEvent},
    phases::Phases,
    pod::{ExitInfo, LaunchRequest, Launcher, NewContainer, NewExec, Pod, PodError, PodEvent},
    rootfs::{Layers, RootfsError, RootfsMount},
    spec::{HostSpec, SpecError},
    stdio::StdioPaths,
    sync::Lock,
};
use process::{Container, ProcState, Process, TransitionError};

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
    /// A bad container or exec id.
    #[error(transparent)]
    Id(#[from] IdError),
    /// containerd's runtime options.
    #[error("runtime options")]
    Options(#[from] ConfigError),
    /// The bundle's spec.
    #[error("bundle spec")]
    Spec(#[from] SpecError),
    /// containerd's rootfs mounts.
    #[error("root filesystem")]
    Rootfs(#[from] RootfsError),
    /// A process state change that does not fit.
    #[error("process {process}")]
    Transition {
        /// `container/exec`.
        process: String,
        /// Why.
        #[source]
        source: TransitionError,
    },
    /// The pod.
    #[error(transparent)]
    Pod(#[from] PodError),
    /// Encoding the metrics.
    #[error("encoding metrics")]
    Metrics(#[source] protobuf::Error),
}

impl Classify for TaskError {
    fn kind(&self) -> Kind {
        match self {
            TaskError::NotFound(_) => Kind::NotFound,
            TaskError::AlreadyExists(_) => Kind::AlreadyExists,
            TaskError::InvalidArgument(_) | TaskError::Id(_) => Kind::InvalidArgument,
            TaskError::FailedPrecondition(_) => Kind::FailedPrecondition,
            TaskError::Unimplemented(_) => Kind::Unimplemented,
            TaskError::Options(e) => e.kind(),
            TaskError::Spec(e) => e.kind(),
            TaskError::Rootfs(e) => e.kind(),
            TaskError::Transition { source, .. } => source.kind(),
            TaskError::Pod(e) => e.kind(),
            TaskError::Metrics(_) => Kind::Internal,
        }
    }
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
}

/// The task service of one pod.
pub struct TaskService {
    ctx: ServiceContext,
    launcher: Arc<dyn Launcher>,
    /// The pod, once its sandbox container was created. An async lock: a
    /// second Create waits while the first boots the VM.
    pod: tokio::sync::Mutex<Option<Arc<dyn Pod>>>,
    containers: Lock<HashMap<String, Arc<Container>>>,
    /// The sandbox containerd's sandbox API created, if it did.
    sandbox: Lock<Option<Arc<sandbox_api::SandboxRecord>>>,
    shutdown: watch::Sender<bool>,
    serving_ns: AtomicU64,
    /// The pod's teardown marks (logged when the pod stops).
    teardown: Arc<Phases>,
}

fn ts(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    MessageField::some(Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    })
}

fn process_name(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        id.to_string()
    } else {
        format!("{id}/{exec_id}")
    }
}

impl TaskService {
    /// A service with no pod yet; `launcher` starts the pod at the sandbox
    /// container's Create.
    pub fn new(ctx: ServiceContext, launcher: Arc<dyn Launcher>) -> Self {
        TaskService {
            ctx,
            launcher,
            pod: tokio::sync::Mutex::new(None),
            containers: Lock::new(HashMap::new()),
            sandbox: Lock::new(None),
            shutdown: watch::channel(false).0,
            serving_ns: AtomicU64::new(0),
            teardown: Arc::new(Phases::teardown()),
        }
    }

    /// Records when the server started serving (a phase mark).
    pub fn set_serving(&self, ns: u128) {
        self.serving_ns
            .store(u64::try_from(ns).unwrap_or(0), Ordering::Relaxed);
    }

    /// Resolves once `Shutdown` decided the shim should exit.
    pub fn exit_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, TaskError> {
        self.containers
            .lock()
            .get(id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("container {id}")))
    }

    fn process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Container>, Arc<Process>), TaskError> {
        let c = self.container(id)?;
        let p = c
            .process(exec_id)
            .ok_or_else(|| TaskError::NotFound(format!("process {exec_id} of {id}")))?;
        Ok((c, p))
    }

    async fn pod(&self) -> Result<Arc<dyn Pod>, TaskError> {
        self.pod
            .lock()
            .await
            .clone()
            .ok_or_else(|| TaskError::FailedPrecondition("the pod VM is not running".into()))
    }

    /// PIDs of the pod's host processes (for tests and reports).
    pub async fn vm_pids(&self) -> Vec<u32> {
        match self.pod.lock().await.as_ref() {
            Some(p) => p.host_pids(),
            None => Vec::new(),
        }
    }

    /// The pod of container `id` in `sandbox_id`, launched if this is the
    /// sandbox container.
    async fn pod_for(
        &self,
        req: &api::CreateTaskRequest,
        spec: &HostSpec,
        sandbox_id: &str,
        layers: &Layers,
        phases: &Phases,
    ) -> Result<Arc<dyn Pod>, TaskError> {
        let mut slot = self.pod.lock().await;
        match slot.as_ref() {
            Some(p) if p.id() == sandbox_id => return Ok(Arc::clone(p)),
            Some(p) => {
                return Err(TaskError::FailedPrecondition(format!(
                    "container {} belongs to pod {sandbox_id}, this shim runs pod {}",
                    req.id,
                    p.id()
                )))
            }
            None if self.sandbox.lock().is_some() => {
                return Err(TaskError::FailedPrecondition(format!(
                    "pod {sandbox_id} has no VM: StartSandbox has not run (or the sandbox was stopped)"
                )))
            }
            None if sandbox_id != req.id => {
                return Err(TaskError::FailedPrecondition(format!(
                    "pod {sandbox_id} has no VM: its sandbox container must be created first"
                )))
            }
            None => {}
        }
        if let Some(ns) = self.ctx.start_cmd_ns {
            phases.mark_at("start_cmd", ns);
        }
        phases.mark_at(
            "serving",
            u128::from(self.serving_ns.load(Ordering::Relaxed)),
        );
        let pod = self
            .launcher
            .launch(
                LaunchRequest {
                    sandbox_id,
                    bundle: PathBuf::from(&req.bundle),
                    config: ConfigSource::from_options(req.options.as_ref())?,
                    hostname: spec
                        .hostname()
                        .unwrap_or(sandbox_id)
                        .chars()
                        .take(64)
                        .collect(),
                    spec,
                    first_image: Some(layers.clone()),
                    netns: spec.network_namespace(),
                },
                phases,
            )
            .await?;
        self.spawn_event_relay(Arc::clone(&pod));
        *slot = Some(Arc::clone(&pod));
        Ok(pod)
    }

    /// Forwards what the pod reports (OOM kills) to containerd.
    fn spawn_event_relay(&self, pod: Arc<dyn Pod>) {
        let events = Arc::clone(&self.ctx.events);
        tokio::spawn(async move {
            while let Some(ev) = pod.next_event().await {
                match ev {
                    PodEvent::Oom { container } => {
                        tracing::info!(%container, "OOM kill in the guest");
                        events.publish(TaskEvent::Oom { id: container });
                    }
                }
            }
        });
    }

    /// Task `Create`: starts the pod for its sandbox container, attaches the
    /// root image, creates the container in the guest.
    pub async fn create(
        &self,
        req: api::CreateTaskRequest,
    ) -> Result<api::CreateTaskResponse, TaskError> {
        let phases = Phases::default();
        phases.mark("create");
        validate_id("container id", &req.id)?;
        if self.containers.lock().contains_key(&req.id) {
            return Err(TaskError::AlreadyExists(format!("container {}", req.id)));
        }
        if !req.checkpoint.is_empty() {
            return Err(TaskError::Unimplemented("restoring from a checkpoint"));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = HostSpec::read(&bundle)?;
        // hostNetwork/hostPID/hostIPC: refused before anything starts.
        spec.check_namespaces()?;
        let sandbox_id = spec.sandbox_id(&req.id).to_string();
        validate_id("sandbox id", &sandbox_id)?;
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
        let pod = self
            .pod_for(&req, &spec, &sandbox_id, &layers, &phases)
            .await?;
        let created = async {
            let image = pod
                .attach_image(&layers, spec.image_name(), bundle.clone(), &phases)
                .await?;
            let pid = pod
                .create_container(
                    NewContainer {
                        id: &req.id,
                        bundle: bundle.clone(),
                        spec: &spec,
                        image: &image,
                        stdio: &stdio,
                    },
                    &phases,
                )
                .await;
            match pid {
                Ok(pid) => Ok((image, pid)),
                Err(e) => {
                    if let Err(d) = pod.detach_image(&image).await {
                        tracing::warn!(error = %veil_common::error_chain(&d), "cannot detach the image of a failed container");
                    }
                    Err(e)
                }
            }
        }
        .await;
        let (image, pid) = match created {
            Ok(x) => x,
            Err(e) => {
                // A pod whose sandbox container failed has nothing to run.
                if sandbox_id == req.id && self.containers.lock().is_empty() {
                    if let Some(p) = self.pod.lock().await.take() {
                        p.shutdown(&Phases::teardown()).await;
                    }
                }
                return Err(e.into());
            }
        };
        let init = Process::new("", stdio.clone(), pid);
        let c = Container::new(&req.id, &req.bundle, image, init, phases);
        self.containers.lock().insert(req.id.clone(), c);
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

    /// Task `Start`: runs the container's program or an exec'd process.
    pub async fn start(&self, req: api::StartRequest) -> Result<api::StartResponse, TaskError> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let name = process_name(&req.id, &req.exec_id);
        let transition = |source| TaskError::Transition {
            process: name.clone(),
            source,
        };
        match p.state() {
            ProcState::Created { .. } => {}
            ProcState::Running { .. } => return Err(transition(TransitionError::AlreadyStarted)),
            ProcState::Exited { .. } => return Err(transition(TransitionError::Exited)),
        }
        let pod = self.pod().await?;
        let pid = pod.start(&req.id, &req.exec_id).await?;
        p.start(pid).map_err(transition)?;
        self.spawn_waiter(pod, c.id.clone(), Arc::clone(&p));
        if req.exec_id.is_empty() {
            self.ctx.events.publish(TaskEvent::Start {
                id: req.id.clone(),
                pid,
            });
            if let Some(ph) = c.take_start_phases() {
                ph.mark("container_started");
                crate::report::started(&ph.marks());
                tracing::info!("{}", ph.line(&self.pod_id().await, &req.id));
            }
        } else {
            self.ctx.events.publish(TaskEvent::ExecStarted {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
            });
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn pod_id(&self) -> String {
        self.pod
            .lock()
            .await
            .as_ref()
            .map(|p| p.id().to_string())
            .unwrap_or_default()
    }

    /// Waits for the process in the pod, then records and reports its exit.
    fn spawn_waiter(&self, pod: Arc<dyn Pod>, container: String, p: Arc<Process>) {
        let events = Arc::clone(&self.ctx.events);
        let teardown = Arc::clone(&self.teardown);
        tokio::spawn(async move {
            let exit = pod.wait(&container, &p.exec_id).await;
            let pod_init = container == pod.id() && p.exec_id.is_empty();
            if pod_init {
                teardown.mark_once("exited");
            }
            if p.exit(exit) {
                events.publish(TaskEvent::Exit {
                    id: container,
                    exec_id: p.exec_id.clone(),
                    pid: p.state().pid(),
                    status: exit.status,
                    at: exit.at,
                });
                if pod_init {
                    teardown.mark_once("exit_published");
                }
            }
        });
    }

    /// Task `Delete`: removes an exec'd process or the container.
    pub async fn delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse, TaskError> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let state = p.state();
        if let ProcState::Running { .. } = state {
            return Err(TaskError::FailedPrecondition(format!(
                "process {} is running",
                process_name(&req.id, &req.exec_id)
            )));
        }
        let exit = state.exit().unwrap_or(ExitInfo {
            status: 0,
            at: SystemTime::now(),
        });
        let pod = self.pod().await?;
        if req.exec_id.is_empty() {
            let sandbox = req.id == pod.id();
            let mark = |name| {
                if sandbox {
                    self.teardown.mark_once(name);
                }
            };
            mark("delete");
            pod.remove_container(&req.id).await?;
            mark("removed");
            if sandbox {
                // The sandbox container goes: containerd runs CNI's DEL next.
                pod.release_network();
                mark("network_released");
            }
            let released = if sandbox {
                pod.release_image(&c.image).await
            } else {
                pod.detach_image(&c.image).await
            };
            if let Err(e) = released {
                tracing::warn!(container = %req.id, error = %veil_common::error_chain(&e), "cannot detach the container's image");
            }
            mark("image_detached");
            self.containers.lock().remove(&req.id);
            self.ctx.events.publish(TaskEvent::Delete {
                id: req.id.clone(),
                pid: state.pid(),
                status: exit.status,
                at: exit.at,
            });
            mark("deleted");
        } else {
            pod.delete_process(&req.id, &req.exec_id).await?;
            c.remove_exec(&req.exec_id);
        }
        Ok(api::DeleteResponse {
            pid: state.pid(),
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    /// Task `Exec`: prepares a process in a running container.
    pub async fn exec(&self, req: api::ExecProcessRequest) -> Result<Empty, TaskError> {
        let c = self.container(&req.id)?;
        validate_id("exec id", &req.exec_id)?;
        if c.process(&req.exec_id).is_some() {
            return Err(TaskError::AlreadyExists(format!(
                "process {}",
                process_name(&req.id, &req.exec_id)
            )));
        }
        if let ProcState::Exited { .. } = c.init.state() {
            return Err(TaskError::FailedPrecondition(format!(
                "container {} has exited",
                req.id
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
        pod.exec(NewExec {
            container: &req.id,
            exec: &req.exec_id,
            process: &spec.value,
            stdio: &stdio,
        })
        .await?;
        if !c.add_exec(Process::new(&req.exec_id, stdio, 0)) {
            return Err(TaskError::AlreadyExists(format!(
                "process {}",
                process_name(&req.id, &req.exec_id)
            )));
        }
        self.ctx.events.publish(TaskEvent::ExecAdded {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
        });
        Ok(Empty::new())
    }

    /// Task `State`.
    pub async fn state(&self, req: api::StateRequest) -> Result<api::StateResponse, TaskError> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let state = p.state();
        let status = match state {
            ProcState::Created { .. } => TaskStatus::CREATED,
            ProcState::Running { .. } if c.paused() => TaskStatus::PAUSED,
            ProcState::Running { .. } => TaskStatus::RUNNING,
            ProcState::Exited { .. } => TaskStatus::STOPPED,
        };
        let exit = state.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: state.pid(),
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
        let (_, p) = self.process(&req.id, &req.exec_id)?;
        if let ProcState::Exited { .. } = p.state() {
            if !req.all {
                return Err(TaskError::NotFound(format!(
                    "process {}: already finished",
                    process_name(&req.id, &req.exec_id)
                )));
            }
        }
        let pod = self.pod().await?;
        pod.signal(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    /// Task `Wait`: blocks until the process exited and its output was delivered.
    pub async fn wait(&self, req: api::WaitRequest) -> Result<api::WaitResponse, TaskError> {
        let (_, p) = self.process(&req.id, &req.exec_id)?;
        let exit = p.exited().await;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: ts(exit.at),
            ..Default::default()
        })
    }

    /// Task `Pids`: the container's processes (guest PIDs).
    pub async fn pids(&self, req: api::PidsRequest) -> Result<api::PidsResponse, TaskError> {
        self.container(&req.id)?;
        let pids = self.pod().await?.pids(&req.id).await?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn freeze(&self, id: &str, pause: bool) -> Result<Empty, TaskError> {
        let c = self.container(id)?;
        self.pod().await?.freeze(id, pause).await?;
        c.set_paused(pause);
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
        self.process(&req.id, &req.exec_id)?;
        self.pod()
            .await?
            .resize(&req.id, &req.exec_id, req.height, req.width)
            .await?;
        Ok(Empty::new())
    }

    /// Task `CloseIO`: closes the process's stdin.
    pub async fn close_io(&self, req: api::CloseIORequest) -> Result<Empty, TaskError> {
        self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            self.pod().await?.close_stdin(&req.id, &req.exec_id).await?;
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
        self.pod().await?.update(&req.id, &resources.value).await?;
        Ok(Empty::new())
    }

    /// Task `Stats`: the guest cgroup's statistics as containerd's cgroup v1
    /// `Metrics` (what `ctr task metrics` decodes).
    pub async fn stats(&self, req: api::StatsRequest) -> Result<api::StatsResponse, TaskError> {
        self.container(&req.id)?;
        let s = self.pod().await?.stats(&req.id).await?;
        let value = crate::metrics::cgroup_v1(&s).map_err(TaskError::Metrics)?;
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
            .map(|c| c.init.state().pid())
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: self.ctx.shim_pid,
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    /// Task `Shutdown`: once the pod has no containers left, lets the shim
    /// exit (which stops the pod first, see [`Self::stop_pod`]); otherwise a
    /// no-op. A sandbox of the sandbox API that has not been stopped keeps
    /// the shim too (containerd shuts the task service down after each
    /// container; the sandbox ends with `ShutdownSandbox`). It answers at
    /// once: containerd gives Shutdown a few seconds, and a slow VM
    /// teardown must not turn into a failed shutdown.
    pub async fn shutdown(&self, _req: api::ShutdownRequest) -> Result<Empty, TaskError> {
        if !self.containers.lock().is_empty() {
            return Ok(Empty::new());
        }
        if self.sandbox.lock().as_ref().is_some_and(|s| s.live()) {
            return Ok(Empty::new());
        }
        self.teardown.mark_once("shutdown");
        self.shutdown.send_replace(true);
        Ok(Empty::new())
    }

    /// Stops the pod, if any (also on SIGTERM); a sandbox of the sandbox
    /// API is stopped with it.
    pub async fn stop_pod(&self) {
        let pod = self.pod.lock().await.take();
        if let Some(p) = pod {
            self.end_pod(&*p).await;
        }
        let sandbox = self.sandbox.lock().clone();
        if let Some(s) = sandbox {
            s.stop_now(255);
        }
    }

    /// Stops pod `p` and reports its teardown marks (log line and node
    /// metrics).
    async fn end_pod(&self, p: &dyn Pod) {
        p.shutdown(&self.teardown).await;
        tracing::info!("{}", self.teardown.line(p.id(), p.id()));
        crate::report::torn_down(&self.teardown.marks());
    }

    /// Task `Checkpoint`.
    pub async fn checkpoint(&self, _req: api::CheckpointTaskRequest) -> Result<Empty, TaskError> {
        Err(TaskError::Unimplemented("checkpoint"))
    }
}
