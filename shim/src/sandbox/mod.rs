//! The pod VM: the real [`Pod`] behind the task service.
//!
//! [`VmLauncher`] loads the pod's configuration and boots its VM
//! ([`boot`]), building the sandbox container's root image meanwhile.
//! [`Sandbox`] owns what the VM needs on the host — the VMM process, the
//! vsock backend, the pod directory, QMP, the agent connection, the attached
//! images ([`images`]) and the stdio relays of its processes — and relays
//! the container and process calls to the agent. It does not track
//! containerd's view of the containers (the task service does).
//!
//! [`launch`] holds what the attestation services plug in with.

pub mod boot;
pub mod images;
pub mod launch;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Weak},
    time::Duration,
};

use protobuf::MessageField;
use veil_common::{Classify, Kind};
use veil_protocol::agent::{
    CloseStdinRequest, ContainerRequest, ContainerStats, CreateContainerRequest,
    DestroySandboxRequest, ExecProcessRequest, ProcessRequest, ResizeTerminalRequest, Rootfs,
    ShutdownRequest, SignalProcessRequest, UpdateContainerRequest,
};

pub use boot::{cmdline, launch_info, BootError, BootParams, BASE_CMDLINE};
pub use images::image_store;
pub use launch::{HostService, LaunchInfo};

use crate::{
    agent::{self, Agent},
    config::ConfigError,
    network::PodNetwork,
    phases::Phases,
    pod::{
        AttachedImage, ExitInfo, LaunchRequest, Launcher, NewContainer, NewExec, Pod, PodError,
        PodEvent, PodFailure,
    },
    rootfs::Layers,
    spec::{MountContext, SpecError},
    state::PodDir,
    stdio::{Relay, StdioPaths},
    sync::Lock,
    vmm::{qmp::Qmp, RunningVm},
    volumes::{block::PodBlocks, shared::VirtioFs, PodVolumes},
    vsock::{AgentReady, HybridVsockBackend},
};
use images::Images;

/// How often the watchdog looks at the VMM and the vsock backend.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Errors of the pod's own steps (the agent's, the images' and the boot's
/// errors keep their own types).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The configuration.
    #[error("configuration")]
    Config(#[from] ConfigError),
    /// The container's spec.
    #[error("container spec")]
    Spec(#[from] SpecError),
    /// No relay for a process (never created here, or already waited for).
    #[error("no stdio for process {0}")]
    NoRelay(String),
    /// The pod's VM is gone; only teardown calls still succeed.
    #[error("the pod's VM is gone ({0}); the pod can only be removed")]
    Gone(String),
}

impl Classify for SandboxError {
    fn kind(&self) -> Kind {
        match self {
            SandboxError::Config(e) => e.kind(),
            SandboxError::Spec(e) => e.kind(),
            SandboxError::NoRelay(_) => Kind::NotFound,
            SandboxError::Gone(_) => Kind::Unavailable,
        }
    }
}

/// Boots pod VMs.
#[derive(Debug, Default)]
pub struct VmLauncher;

#[async_trait::async_trait]
impl Launcher for VmLauncher {
    async fn launch(
        &self,
        req: LaunchRequest<'_>,
        phases: &Phases,
    ) -> Result<Arc<dyn Pod>, PodError> {
        let (config, handler_name) = req.config.load().map_err(SandboxError::Config)?;
        let handler = config
            .handler(&handler_name)
            .map_err(SandboxError::Config)?
            .clone();
        if let Err(e) = req.config.record(&req.bundle, &handler_name) {
            tracing::warn!(error = %e, "cannot record the pod's config in its bundle");
        }
        tracing::info!(pod = %req.sandbox_id, handler = %handler_name, "booting pod VM");
        crate::report::init(&config.state_dir, req.sandbox_id, &handler_name);
        let images = Images::new(req.sandbox_id, image_store(&config, &handler));
        // Build the sandbox container's image while the VM boots; the boot
        // hot-adds it once QEMU answers QMP.
        let built = req
            .first_image
            .as_ref()
            .map(|l| images::Built::new(l.clone(), req.bundle.clone()));
        let prebuild = async {
            if let Some(b) = &built {
                images.first_built(b).await;
            }
        };
        let (booted, ()) = tokio::join!(
            boot::boot(
                BootParams {
                    id: req.sandbox_id,
                    config: &config,
                    handler: &handler,
                    hostname: req.hostname.clone(),
                    policy: req
                        .spec
                        .annotation(crate::spec::POLICY_ANNOTATION)
                        .unwrap_or_default()
                        .as_bytes()
                        .to_vec(),
                    netns: req.netns.clone(),
                    first_image: built.as_ref().map(|built| boot::FirstImage {
                        images: &images,
                        built,
                    }),
                },
                phases,
            ),
            prebuild
        );
        let b = match booted {
            Ok(b) => b,
            Err(e) => {
                images.release_all().await;
                return Err(e.into());
            }
        };
        crate::report::pod(
            &b.dir.path,
            &crate::report::PodReport {
                memory_mib: handler.memory_mib,
                vcpus: handler.vcpus,
                shim_pid: std::process::id(),
                vmm_pid: b.vm.pid(),
                backend_pid: b.backend.as_ref().and_then(|x| x.pid()),
            },
        );
        let sandbox = Arc::new(Sandbox {
            id: req.sandbox_id.to_string(),
            dir: b.dir,
            vm: Lock::new(Some(b.vm)),
            backend: Lock::new(b.backend),
            _vhost_device: b.vhost_device,
            qmp: tokio::sync::Mutex::new(b.qmp),
            agent: b.agent,
            images,
            services: b.services,
            _ready_call: b.ready_call,
            launch: b.launch,
            has_scratch: b.has_scratch,
            relays: Lock::new(HashMap::new()),
            volumes: PodVolumes::new(b.virtiofs.as_ref().map(|f| f.root.clone())),
            mounts: MountContext {
                scratch: b.has_scratch,
                shared_dirs: b.virtiofs.is_some(),
                handler: handler_name.clone(),
            },
            virtiofs: Lock::new(b.virtiofs),
            network: Lock::new(b.network),
            blocks: PodBlocks::default(),
            gone: Lock::new(None),
        });
        tokio::spawn(watchdog(Arc::downgrade(&sandbox)));
        Ok(sandbox)
    }
}

/// Watches the pod's host processes: when the VMM or the vsock backend
/// exits, the pod is gone — the other is stopped (its connections close, so
/// every waiting call returns and the processes are reported exited, once)
/// and from then on guest calls fail with the reason while teardown calls
/// succeed on the host side alone. Ends with the sandbox.
async fn watchdog(pod: Weak<Sandbox>) {
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(pod) = pod.upgrade() else { return };
        if pod.gone.lock().is_some() {
            return;
        }
        if let Some(reason) = pod.check_host_processes() {
            tracing::warn!(pod = %pod.id, %reason, "pod VM lost; stopping what is left of it");
            return;
        }
    }
}

type Shared<T> = Arc<tokio::sync::Mutex<T>>;

/// A booted pod VM.
pub struct Sandbox {
    id: String,
    dir: PodDir,
    vm: Lock<Option<Box<dyn RunningVm>>>,
    backend: Lock<Option<HybridVsockBackend>>,
    _vhost_device: Option<std::fs::File>,
    qmp: tokio::sync::Mutex<Qmp>,
    agent: Agent,
    images: Images,
    services: Vec<tokio::task::JoinHandle<()>>,
    /// The agent's readiness connection, kept open.
    _ready_call: Option<AgentReady>,
    /// What was launched.
    pub launch: LaunchInfo,
    /// Whether the pod has its encrypted scratch disk (container writable
    /// layers and emptyDir volumes live there).
    pub has_scratch: bool,
    relays: Lock<HashMap<(String, String), Shared<Relay>>>,
    /// The file volumes copied into the guest, the host directories shared.
    volumes: PodVolumes,
    /// What the pod offers containers' mounts.
    mounts: MountContext,
    /// The virtio-fs daemon of the pod's share, if it has one.
    virtiofs: Lock<Option<VirtioFs>>,
    /// The pod's network on the host (taps, redirects), if it has one.
    network: Lock<Option<PodNetwork>>,
    /// The block volumes hot-added to the VM.
    blocks: PodBlocks,
    /// Why the VM is gone, once it is (it died, or the pod was shut down).
    gone: Lock<Option<String>>,
}

/// Why the pod is gone if its host process `what` no longer runs.
fn exit_reason(what: &str, running: bool, pid: Option<u32>) -> Option<String> {
    let pid = pid.map_or_else(|| "?".into(), |p| p.to_string());
    (!running).then(|| format!("its {what} (pid {pid}) exited"))
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

fn key(c: &str, e: &str) -> (String, String) {
    (c.to_string(), e.to_string())
}

impl Sandbox {
    /// Looks at the VMM and the backend; if either exited, records why,
    /// stops the other and returns the reason.
    fn check_host_processes(&self) -> Option<String> {
        let vm_exit = self
            .vm
            .lock()
            .as_mut()
            .and_then(|v| exit_reason("VMM", v.is_running(), v.pid()));
        let backend_exit = || {
            self.backend
                .lock()
                .as_mut()
                .and_then(|b| exit_reason("vsock backend", b.is_running(), b.pid()))
        };
        let virtiofs_exit = || {
            self.virtiofs
                .lock()
                .as_mut()
                .and_then(|f| exit_reason("virtiofsd", f.is_running(), f.pid()))
        };
        let reason = vm_exit.or_else(backend_exit).or_else(virtiofs_exit)?;
        {
            let mut gone = self.gone.lock();
            if let Some(r) = gone.as_ref() {
                return Some(r.clone());
            }
            *gone = Some(reason.clone());
        }
        // All go: a VM without its backend cannot be reached, a backend
        // without its VM serves nobody, nor does virtiofsd.
        self.stop_host_processes();
        Some(reason)
    }

    /// Kills the VMM and stops the vsock backend and virtiofsd, by PID.
    fn stop_host_processes(&self) {
        if let Some(mut vm) = self.vm.lock().take() {
            vm.kill();
        }
        if let Some(mut b) = self.backend.lock().take() {
            b.stop();
        }
        if let Some(mut f) = self.virtiofs.lock().take() {
            f.stop();
        }
    }

    /// Fails with [`SandboxError::Gone`] once the VM is gone.
    fn guest(&self) -> Result<(), PodError> {
        match self.gone.lock().as_ref() {
            Some(r) => Err(SandboxError::Gone(r.clone()).into()),
            None => Ok(()),
        }
    }

    /// Whether the VM is gone, looking now rather than at the watchdog's
    /// last round (a call that just lost its connection asks).
    fn is_gone(&self) -> bool {
        self.gone.lock().is_some() || self.check_host_processes().is_some()
    }

    /// A guest call's result: a lost connection to a VM that died reads as
    /// the pod being gone, with the reason.
    fn answer<T>(&self, r: Result<T, agent::AgentError>) -> Result<T, PodError> {
        r.map_err(|e| {
            if e.kind() == Kind::Unavailable && self.is_gone() {
                if let Err(gone) = self.guest() {
                    return gone;
                }
            }
            e.into()
        })
    }

    /// A teardown step's result: once the VM is gone its guest side went
    /// with it, so a lost connection counts as done.
    fn torn_down<T, E: PodFailure>(&self, r: Result<T, E>) -> Result<(), PodError> {
        match r {
            Err(e) if e.kind() != Kind::Unavailable || !self.is_gone() => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn relay(&self, c: &str, e: &str) -> Option<Shared<Relay>> {
        self.relays.lock().get(&key(c, e)).cloned()
    }

    async fn attach_stdio(&self, c: &str, e: &str, stdio: &StdioPaths) -> Result<(), PodError> {
        let relay = Relay::attach(&self.agent, c, e, stdio).await?;
        self.relays
            .lock()
            .insert(key(c, e), Arc::new(tokio::sync::Mutex::new(relay)));
        Ok(())
    }
}

#[async_trait::async_trait]
impl Pod for Sandbox {
    fn id(&self) -> &str {
        &self.id
    }

    fn release_network(&self) {
        if let Some(mut n) = self.network.lock().take() {
            n.teardown();
        }
    }

    fn host_pids(&self) -> Vec<u32> {
        let mut v = Vec::new();
        v.extend(self.vm.lock().as_ref().and_then(|vm| vm.pid()));
        v.extend(self.backend.lock().as_ref().and_then(|b| b.pid()));
        v.extend(self.virtiofs.lock().as_ref().and_then(VirtioFs::pid));
        v
    }

    async fn attach_image(
        &self,
        layers: &Layers,
        name: &str,
        work_dir: PathBuf,
        phases: &Phases,
    ) -> Result<AttachedImage, PodError> {
        self.guest()?;
        let image = self
            .images
            .attach(layers, name, work_dir, &self.qmp, &self.agent)
            .await?;
        phases.mark("rootfs_attached");
        Ok(image)
    }

    async fn detach_image(&self, image: &AttachedImage) -> Result<(), PodError> {
        if self.gone.lock().is_some() {
            self.images.forget(image).await;
            return Ok(());
        }
        // The reference is released either way.
        self.torn_down(self.images.detach(image, &self.qmp, &self.agent).await)
    }

    async fn release_image(&self, image: &AttachedImage) -> Result<(), PodError> {
        self.images.forget(image).await;
        Ok(())
    }

    async fn create_container(
        &self,
        c: NewContainer<'_>,
        phases: &Phases,
    ) -> Result<u32, PodError> {
        self.guest()?;
        let resolv_conf = c.spec.resolv_conf().map_err(SandboxError::Spec)?;
        let guest = c.spec.for_guest(&self.mounts).map_err(SandboxError::Spec)?;
        self.blocks.attach(c.id, &guest.blocks, &self.qmp).await?;
        let copied = match self
            .volumes
            .acquire(c.id, &guest.volumes, &self.agent)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.blocks.release(c.id, Some(&self.qmp)).await;
                return Err(e.into());
            }
        };
        if copied.copied > 0 {
            tracing::info!(container = %c.id, volumes = copied.copied, bytes = copied.bytes,
                elapsed_us = copied.elapsed_us, "file volumes copied");
        }
        let mut req = CreateContainerRequest::new();
        req.container_id = c.id.to_string();
        req.oci_spec = guest.json;
        req.resolv_conf = resolv_conf;
        let mut root = Rootfs::new();
        root.storage_id = c.image.storage_id.clone();
        if self.has_scratch {
            // The writable layer on the encrypted scratch disk.
            root.upper_storage_id = crate::storage::scratch::STORAGE_ID.into();
        }
        req.rootfs = MessageField::some(root);
        req.stdio = MessageField::some(c.stdio.wanted());
        let created = self.answer(agent::rpc(
            "CreateContainer",
            self.agent
                .containers
                .create_container(agent::ctx(), &req)
                .await,
        ));
        let resp = match created {
            Ok(r) => r,
            Err(e) => {
                self.volumes.release(c.id, Some(&self.agent)).await;
                self.blocks.release(c.id, Some(&self.qmp)).await;
                return Err(e);
            }
        };
        if let Err(e) = self.attach_stdio(c.id, "", c.stdio).await {
            let _ = self
                .agent
                .containers
                .remove_container(agent::ctx(), &creq(c.id))
                .await;
            self.volumes.release(c.id, Some(&self.agent)).await;
            self.blocks.release(c.id, Some(&self.qmp)).await;
            return Err(e);
        }
        phases.mark("container_created");
        Ok(resp.pid)
    }

    async fn exec(&self, e: NewExec<'_>) -> Result<(), PodError> {
        let mut req = ExecProcessRequest::new();
        req.container_id = e.container.to_string();
        req.exec_id = e.exec.to_string();
        req.process = e.process.to_vec();
        req.stdio = MessageField::some(e.stdio.wanted());
        self.answer(agent::rpc(
            "ExecProcess",
            self.agent.containers.exec_process(agent::ctx(), &req).await,
        ))?;
        if let Err(err) = self.attach_stdio(e.container, e.exec, e.stdio).await {
            let _ = self
                .agent
                .containers
                .delete_process(agent::ctx(), &preq(e.container, e.exec))
                .await;
            return Err(err);
        }
        Ok(())
    }

    async fn start(&self, container: &str, exec: &str) -> Result<u32, PodError> {
        let r = self.answer(agent::rpc(
            "StartProcess",
            self.agent
                .containers
                .start_process(agent::ctx(), &preq(container, exec))
                .await,
        ))?;
        Ok(r.pid)
    }

    async fn wait(&self, container: &str, exec: &str) -> ExitInfo {
        let waited = self
            .agent
            .containers
            .wait_process(agent::ctx_unbounded(), &preq(container, exec))
            .await;
        let (exit, sent) = match waited {
            Ok(w) => (
                ExitInfo {
                    status: u32::try_from(w.exit_status).unwrap_or(255),
                    at: std::time::SystemTime::UNIX_EPOCH
                        + Duration::from_nanos(u64::try_from(w.exited_at_ns).unwrap_or(0)),
                },
                Some(crate::stdio::Sent {
                    stdout: w.stdout_bytes,
                    stderr: w.stderr_bytes,
                    pending: w.output_pending,
                }),
            ),
            Err(e) => {
                let e = veil_protocol::status::RemoteError::from(e);
                tracing::warn!(%container, %exec, error = %e, "lost the process");
                (
                    ExitInfo {
                        status: 255,
                        at: std::time::SystemTime::now(),
                    },
                    None,
                )
            }
        };
        if let Some(relay) = self.relay(container, exec) {
            let mut relay = relay.lock().await;
            // Input first: a terminal's connection carries both directions
            // and only closes (EOF for its output) once our side is done.
            relay.close_stdin();
            if !relay.finish_output(sent).await {
                tracing::warn!(%container, %exec, "output incomplete at the exit");
            }
        }
        if exec.is_empty() && self.gone.lock().is_none() {
            // Before the exit is reported: kubelet reads the message then.
            self.volumes.copy_back(container, &self.agent).await;
        }
        exit
    }

    async fn signal(
        &self,
        container: &str,
        exec: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), PodError> {
        let mut s = SignalProcessRequest::new();
        s.container_id = container.to_string();
        s.exec_id = exec.to_string();
        s.signal = signal;
        s.all = all;
        self.answer(agent::rpc(
            "SignalProcess",
            self.agent.containers.signal_process(agent::ctx(), &s).await,
        ))?;
        Ok(())
    }

    async fn delete_process(&self, container: &str, exec: &str) -> Result<(), PodError> {
        self.relays.lock().remove(&key(container, exec));
        if self.gone.lock().is_some() {
            return Ok(());
        }
        self.torn_down(agent::rpc(
            "DeleteProcess",
            self.agent
                .containers
                .delete_process(agent::ctx(), &preq(container, exec))
                .await,
        ))
    }

    async fn remove_container(&self, container: &str) -> Result<(), PodError> {
        if self.gone.lock().is_none() {
            self.torn_down(agent::rpc(
                "RemoveContainer",
                self.agent
                    .containers
                    .remove_container(agent::ctx(), &creq(container))
                    .await,
            ))?;
        }
        let alive = self.gone.lock().is_none();
        self.volumes
            .release(container, alive.then_some(&self.agent))
            .await;
        self.blocks
            .release(container, alive.then_some(&self.qmp))
            .await;
        self.relays.lock().retain(|(c, _), _| c != container);
        Ok(())
    }

    async fn pids(&self, container: &str) -> Result<Vec<u32>, PodError> {
        let r = self.answer(agent::rpc(
            "ListPids",
            self.agent
                .containers
                .list_pids(agent::ctx(), &creq(container))
                .await,
        ))?;
        Ok(r.pids)
    }

    async fn stats(&self, container: &str) -> Result<ContainerStats, PodError> {
        self.answer(agent::rpc(
            "StatsContainer",
            self.agent
                .containers
                .stats_container(agent::ctx(), &creq(container))
                .await,
        ))
    }

    async fn freeze(&self, container: &str, frozen: bool) -> Result<(), PodError> {
        let c = self.agent.containers.clone();
        if frozen {
            self.answer(agent::rpc(
                "PauseContainer",
                c.pause_container(agent::ctx(), &creq(container)).await,
            ))?;
        } else {
            self.answer(agent::rpc(
                "ResumeContainer",
                c.resume_container(agent::ctx(), &creq(container)).await,
            ))?;
        }
        Ok(())
    }

    async fn update(&self, container: &str, resources: &[u8]) -> Result<(), PodError> {
        let mut u = UpdateContainerRequest::new();
        u.container_id = container.to_string();
        u.resources = resources.to_vec();
        self.answer(agent::rpc(
            "UpdateContainer",
            self.agent
                .containers
                .update_container(agent::ctx(), &u)
                .await,
        ))?;
        Ok(())
    }

    async fn close_stdin(&self, container: &str, exec: &str) -> Result<(), PodError> {
        let relay = self
            .relay(container, exec)
            .ok_or_else(|| SandboxError::NoRelay(format!("{container}/{exec}")))?;
        let sent = relay.lock().await.end_stdin().await;
        let mut req = CloseStdinRequest::new();
        req.container_id = container.to_string();
        req.exec_id = exec.to_string();
        req.counted = sent.is_some();
        req.stdin_bytes = sent.unwrap_or(0);
        self.answer(agent::rpc(
            "CloseStdin",
            self.agent.containers.close_stdin(agent::ctx(), &req).await,
        ))?;
        Ok(())
    }

    async fn resize(
        &self,
        container: &str,
        exec: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), PodError> {
        let mut r = ResizeTerminalRequest::new();
        r.container_id = container.to_string();
        r.exec_id = exec.to_string();
        r.rows = rows;
        r.cols = cols;
        self.answer(agent::rpc(
            "ResizeTerminal",
            self.agent
                .containers
                .resize_terminal(agent::ctx(), &r)
                .await,
        ))?;
        Ok(())
    }

    async fn next_event(&self) -> Option<PodEvent> {
        use veil_protocol::agent::event::Kind as EventKind;
        loop {
            let ev = self
                .agent
                .events
                .get_event(
                    agent::ctx_unbounded(),
                    &veil_protocol::agent::GetEventRequest::new(),
                )
                .await
                .ok()?;
            match ev.kind {
                Some(EventKind::Oom(o)) => {
                    return Some(PodEvent::Oom {
                        container: o.container_id,
                    })
                }
                // Exits reach the shim through WaitProcess.
                Some(EventKind::Exit(_)) | None => continue,
                // A kind this shim does not know (a newer agent).
                Some(_) => continue,
            }
        }
    }

    async fn shutdown(&self, marks: &Phases) {
        for s in &self.services {
            s.abort();
        }
        self.volumes.stop_all().await;
        let died = self.is_gone();
        self.gone
            .lock()
            .get_or_insert_with(|| "it was shut down".to_string());
        if !died {
            let short = || ttrpc::context::with_timeout(Duration::from_secs(2).as_nanos() as i64);
            let _ = self
                .agent
                .sandbox
                .destroy_sandbox(short(), &DestroySandboxRequest::new())
                .await;
            let _ = self
                .agent
                .guest
                .shutdown(short(), &ShutdownRequest::new())
                .await;
        }
        marks.mark_once("agent_stopped");
        let vm = self.vm.lock().take();
        if let Some(mut vm) = vm {
            let exited = tokio::task::spawn_blocking(move || {
                let done = vm.wait_exit(Duration::from_secs(2));
                vm.kill();
                done
            })
            .await
            .unwrap_or(false);
            tracing::debug!(exited, "VM stopped");
        }
        marks.mark_once("vm_stopped");
        if let Some(mut b) = self.backend.lock().take() {
            b.stop();
        }
        if let Some(mut f) = self.virtiofs.lock().take() {
            f.stop();
        }
        marks.mark_once("backend_stopped");
        self.release_network();
        self.relays.lock().clear();
        self.images.release_all().await;
        self.dir.cleanup();
        marks.mark_once("state_removed");
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for s in &self.services {
            s.abort();
        }
        self.stop_host_processes();
        self.release_network();
        self.dir.cleanup();
    }
}
