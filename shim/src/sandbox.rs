//! The pod VM: booting it (vsock transport, QEMU, the agent's health check,
//! QMP), attaching container images to it, and tearing it all down.
//!
//! One [`Sandbox`] per shim. It owns the VMM process, the vsock backend, the
//! pod directory and the images attached to the VM; it does not own the
//! containers (see [`crate::task`]).
//!
//! Seams for later issues: [`HostService`] is how a service the shim offers
//! the guest over vsock (the simulated firmware of issue 5) is started with
//! the VM, with [`LaunchInfo`] — exactly what was launched, for the simulated
//! measurement; `HandlerConfig::scratch_disk_mib` attaches the pod's scratch
//! disk at boot (issue 6).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::DirBuilderExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use veil_protocol::agent::{
    AddStorageRequest, CreateSandboxRequest, DestroySandboxRequest, RemoveStorageRequest,
    ShutdownRequest, StorageSource,
};
use veil_protocol::vsock::GuestTransport;

use crate::{
    agent::{self, Agent, AgentError},
    config::{Config, HandlerConfig, TeeKind, VsockMode},
    phases::Phases,
    process::SpawnOptions,
    rootfs::{Image, ImageStore, RootfsError},
    state::{PodDir, StateError},
    storage::scratch,
    vmm::{
        accel,
        qemu::Qemu,
        qmp::{Qmp, QmpError},
        BootDisk, Machine, RunningVm, SnpParams, TdxParams, Tee, VmSpec, Vmm, VmmError,
        VsockDevice,
    },
    vsock::{self, AgentReady, HybridVsockBackend, ReadyError, ReadyListener, VsockError},
};

/// The kernel command line every pod VM boots with (before the handler's
/// `kernel_params`).
pub const BASE_CMDLINE: &str = "console=ttyS0 quiet acpi=off reboot=t panic=-1";

/// What the agent prints on the console once it serves (the end of the
/// "kernel boot" phase).
const AGENT_SERVING_MARK: &str = "agent API serving";

/// Errors of the pod VM.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The pod directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// The vsock transport.
    #[error("vsock")]
    Vsock(#[from] VsockError),
    /// The agent's readiness call.
    #[error("waiting for the agent")]
    Ready(#[from] ReadyError),
    /// The VMM.
    #[error("VMM")]
    Vmm(#[from] VmmError),
    /// QMP.
    #[error("QMP")]
    Qmp(#[from] QmpError),
    /// The agent.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The root image.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// A file for the VM (scratch disk).
    #[error("cannot create {path}")]
    File {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Every SCSI target of the controller is in use.
    #[error("no free SCSI target for another disk")]
    NoSlot,
    /// The VM ended while starting: what QEMU itself said (its stderr, e.g.
    /// a refused device or a missing file), then the tail of the console.
    #[error("the VM exited during boot; QEMU said:\n{0}\nconsole:\n{1}")]
    Died(String, String),
    /// The pod's attestation set-up (broker, simulated TEE keys).
    #[error("attestation set-up")]
    Attest(#[from] crate::attest::AttestSetupError),
}

/// Exactly what a pod VM was launched with: the input of the simulated TEE's
/// launch measurement (issue 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchInfo {
    /// The handler's TEE.
    pub tee: TeeKind,
    /// Kernel file.
    pub kernel: PathBuf,
    /// Initrd file.
    pub initrd: PathBuf,
    /// Firmware file, if any.
    pub firmware: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count.
    pub vcpus: u32,
}

/// A service the shim offers the guest on a vsock port (guest-initiated
/// connections), started before the VM boots. The simulated firmware of the
/// simulated TEE plugs in here.
pub trait HostService: Send + Sync {
    /// The vsock port the guest connects to.
    fn port(&self) -> u32;
    /// Starts serving connections that arrive on the host-side unix socket
    /// `listener` (hybrid vsock). The service stops when the task is aborted.
    fn serve(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        launch: LaunchInfo,
    ) -> tokio::task::JoinHandle<()>;
}

/// Everything needed to boot a pod VM.
pub struct BootParams<'a> {
    /// The pod (CRI sandbox) id.
    pub id: &'a str,
    /// Global settings (binaries, state and image dirs).
    pub config: &'a Config,
    /// The handler's settings.
    pub handler: &'a HandlerConfig,
    /// The pod's hostname.
    pub hostname: String,
    /// Services the guest may call (none for plain pods).
    pub host_services: Vec<Arc<dyn HostService>>,
}

/// A disk hot-added for container images.
#[derive(Debug)]
struct Attached {
    storage_id: String,
    node: String,
    target: u32,
    users: usize,
}

/// A booted pod VM.
pub struct Sandbox {
    /// The pod id.
    pub id: String,
    dir: PodDir,
    vm: Mutex<Option<Box<dyn RunningVm>>>,
    backend: Mutex<Option<HybridVsockBackend>>,
    _vhost_device: Option<std::fs::File>,
    qmp: tokio::sync::Mutex<Qmp>,
    /// The agent in the VM.
    pub agent: Agent,
    store: ImageStore,
    images: tokio::sync::Mutex<BTreeMap<String, Attached>>,
    services: Vec<tokio::task::JoinHandle<()>>,
    /// The agent's readiness connection, kept open (its log channel).
    _ready_call: Option<AgentReady>,
    /// What was launched.
    pub launch: LaunchInfo,
    /// Whether the pod has its encrypted scratch disk (container writable
    /// layers and emptyDir volumes live there).
    pub has_scratch: bool,
}

/// The kernel command line of `h`'s pods: the base line, the measured
/// attestation words, the handler's `kernel_params`.
pub fn cmdline(h: &HandlerConfig) -> Result<String, SandboxError> {
    let attest_words = crate::attest::guest_cmdline(h)?;
    Ok(
        [BASE_CMDLINE, attest_words.as_str(), h.kernel_params.trim()]
            .iter()
            .filter(|w| !w.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// What a pod VM of `h` is launched with — the input of its simulated
/// measurement, so an operator (or a test) computes the reference value of
/// a handler from its configuration alone.
pub fn launch_info(h: &HandlerConfig) -> Result<LaunchInfo, SandboxError> {
    Ok(LaunchInfo {
        tee: h.tee,
        kernel: h.kernel.clone(),
        initrd: h.initrd.clone(),
        firmware: matches!(h.tee, TeeKind::Snp | TeeKind::Tdx).then(|| h.firmware.clone()),
        cmdline: cmdline(h)?,
        vcpus: h.vcpus,
    })
}

fn spawn_opts() -> SpawnOptions {
    // The shim's runtime is single-threaded on the main thread, which lives as
    // long as the shim: a crashed shim takes QEMU and the backend with it.
    SpawnOptions {
        die_with_parent_thread: true,
    }
}

/// The image store configured by `config`.
pub fn image_store(config: &Config, handler: &HandlerConfig) -> ImageStore {
    ImageStore {
        dir: config.image_dir.clone(),
        format: handler.rootfs_format,
        mkfs_erofs: config.mkfs_erofs.clone(),
        mkfs_ext4: config.mkfs_ext4.clone(),
    }
}

/// Parts of a VM being booted; dropping it tears them down.
struct Partial {
    dir: PodDir,
    vm: Option<Box<dyn RunningVm>>,
    backend: Option<HybridVsockBackend>,
    services: Vec<tokio::task::JoinHandle<()>>,
    defused: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.defused {
            return;
        }
        for s in &self.services {
            s.abort();
        }
        if let Some(mut vm) = self.vm.take() {
            vm.kill();
        }
        if let Some(mut b) = self.backend.take() {
            b.stop();
        }
        self.dir.cleanup();
    }
}

impl Sandbox {
    /// Boots the pod VM and waits for its agent; records the boot phases.
    pub async fn boot(p: BootParams<'_>, phases: &Phases) -> Result<Self, SandboxError> {
        let dir = PodDir::at(&p.config.state_dir, p.id)?;
        dir.create()?;
        let mut partial = Partial {
            dir: dir.clone(),
            vm: None,
            backend: None,
            services: Vec::new(),
            defused: false,
        };
        let h = p.handler;
        let accel = accel::resolve(h.accel);
        let use_vhost = match h.vsock {
            VsockMode::Vhost => true,
            VsockMode::Hybrid => false,
            VsockMode::Auto => vsock::vhost_available(),
        };
        let mut ready = None;
        let (device, transport, vhost_file) = if use_vhost {
            let (cid, file) = vsock::allocate_cid(h.first_cid, 4096)?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
            (
                VsockDevice::Vhost { cid, fd: Some(fd) },
                GuestTransport::Vhost { cid },
                Some(file),
            )
        } else {
            let backend = HybridVsockBackend::start(
                &p.config.vhost_device_vsock,
                &dir.path,
                3,
                spawn_opts(),
            )?;
            if let Some(pid) = backend.pid() {
                dir.record_pid("vsock", pid)?;
            }
            let dev = VsockDevice::VhostUser {
                socket: backend.vhost_socket.clone(),
            };
            let t = GuestTransport::Hybrid {
                uds_path: backend.uds_path.clone(),
            };
            // The agent calls us once it serves; dialling it earlier can wedge
            // the backend.
            ready = Some(ReadyListener::bind(&backend.uds_path)?);
            partial.backend = Some(backend);
            (dev, t, None)
        };
        let machine = match h.tee {
            TeeKind::None | TeeKind::Sim => Machine::Microvm,
            TeeKind::Snp => Machine::Q35 {
                tee: Tee::Snp(SnpParams::default()),
                firmware: h.firmware.clone(),
            },
            TeeKind::Tdx => Machine::Q35 {
                tee: Tee::Tdx(TdxParams {
                    sept_ve_disable: true,
                    mrconfigid_b64: None,
                }),
                firmware: h.firmware.clone(),
            },
        };
        let launch = launch_info(h)?;
        let cmdline = launch.cmdline.clone();
        let mut disks = Vec::new();
        if h.scratch_disk_mib > 0 {
            let path = scratch::path(&p.config.scratch_dir, p.id);
            let file_err = |path: &std::path::Path| {
                let path = path.to_path_buf();
                move |source| SandboxError::File { path, source }
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p.config.scratch_dir)
                .map_err(file_err(&p.config.scratch_dir))?;
            // Recorded first: the pod's cleanup removes it whatever happens.
            dir.record_file("scratch", &path)?;
            let f = std::fs::File::create(&path).map_err(file_err(&path))?;
            f.set_len(h.scratch_disk_mib * 1024 * 1024)
                .map_err(file_err(&path))?;
            disks.push(BootDisk {
                path,
                serial: scratch::SERIAL.into(),
                read_only: false,
            });
        }
        let attest_services = crate::attest::host_services(h)?;
        for svc in p.host_services.iter().chain(&attest_services) {
            if let Some(path) = transport.host_listener_path(svc.port()) {
                let l =
                    tokio::net::UnixListener::bind(&path).map_err(|source| SandboxError::File {
                        path: path.clone(),
                        source,
                    })?;
                partial.services.push(svc.clone().serve(l, launch.clone()));
            }
        }
        let qmp_path = dir.file("qmp.sock");
        let console = dir.file("console.log");
        let spec = VmSpec {
            kernel: h.kernel.clone(),
            initrd: h.initrd.clone(),
            cmdline,
            vcpus: h.vcpus,
            memory_mib: h.memory_mib,
            accel,
            vsock: device,
            console_log: console.clone(),
            vmm_log: dir.file("qemu.log"),
            qmp_socket: Some(qmp_path.clone()),
            machine,
            scsi_controller: true,
            disks,
        };
        let vm = Qemu {
            binary: p.config.qemu.clone(),
        }
        .launch(&spec, spawn_opts())?;
        if let Some(pid) = vm.pid() {
            dir.record_pid("qemu", pid)?;
        }
        partial.vm = Some(vm);
        phases.mark("vmm_spawned");
        tracing::debug!(?accel, "VMM spawned");

        let watch_console = async {
            loop {
                if std::fs::read_to_string(&console)
                    .map(|c| c.contains(AGENT_SERVING_MARK))
                    .unwrap_or(false)
                {
                    phases.mark("kernel_booted");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        let timeout = Duration::from_millis(h.boot_timeout_ms);
        let connect = async {
            let mut call: Option<AgentReady> = None;
            if let Some(l) = ready.as_mut() {
                call = Some(l.wait(timeout).await.map_err(SandboxError::Ready)?);
            }
            let agent = Agent::connect(transport.clone(), timeout).await?;
            Ok::<_, SandboxError>((agent, call))
        };
        tokio::pin!(connect);
        tokio::pin!(watch_console);
        let mut console_seen = false;
        let agent = loop {
            tokio::select! {
                a = &mut connect => break a,
                () = &mut watch_console, if !console_seen => console_seen = true,
            }
        };
        let (agent, ready_call) = match agent {
            Ok(a) => a,
            Err(e) => {
                let vm_alive = partial.vm.as_mut().is_some_and(|v| v.is_running());
                if !vm_alive {
                    let text = std::fs::read_to_string(&console).unwrap_or_default();
                    let vmm = std::fs::read_to_string(dir.file("qemu.log")).unwrap_or_default();
                    return Err(SandboxError::Died(tail(&vmm, 2000), tail(&text, 2000)));
                }
                return Err(e);
            }
        };
        if !console_seen
            && std::fs::read_to_string(&console)
                .map(|c| c.contains(AGENT_SERVING_MARK))
                .unwrap_or(false)
        {
            phases.mark("kernel_booted");
        }
        phases.mark("agent_ready");
        let qmp = Qmp::connect(&qmp_path, Duration::from_secs(10)).await?;

        let mut req = CreateSandboxRequest::new();
        req.sandbox_id = p.id.to_string();
        // The pod shares the node's network (no pod network yet): the node's
        // resolver configuration, and localhost plus the pod's name.
        req.hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
            p.hostname
        )
        .into_bytes();
        req.resolv_conf = std::fs::read("/etc/resolv.conf")
            .map(|mut r| {
                r.truncate(64 * 1024);
                r
            })
            .unwrap_or_default();
        req.hostname = p.hostname;
        agent::rpc(
            "CreateSandbox",
            agent.sandbox.create_sandbox(agent::ctx(), &req).await,
        )?;
        crate::attest::attest_pod(&agent, h, phases).await?;
        let has_scratch = h.scratch_disk_mib > 0;
        if has_scratch {
            // Formatted (or opened) under the key the broker released, or an
            // ephemeral one in a plain pod: the agent decides, not the host.
            agent::rpc(
                "AddStorage",
                agent
                    .sandbox
                    .add_storage(agent::ctx(), &scratch::add_request())
                    .await,
            )?;
            phases.mark("scratch_ready");
        }

        let vm = partial.vm.take();
        let backend = partial.backend.take();
        let services = std::mem::take(&mut partial.services);
        // Everything is owned by the Sandbox now.
        partial.defused = true;
        drop(partial);
        Ok(Sandbox {
            id: p.id.to_string(),
            dir,
            vm: Mutex::new(vm),
            backend: Mutex::new(backend),
            _vhost_device: vhost_file,
            qmp: tokio::sync::Mutex::new(qmp),
            agent,
            store: image_store(p.config, p.handler),
            images: tokio::sync::Mutex::new(BTreeMap::new()),
            services,
            _ready_call: ready_call,
            launch,
            has_scratch,
        })
    }

    /// The shared image store this pod uses.
    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    /// PIDs of the VMM and the vsock backend.
    pub fn pids(&self) -> Vec<u32> {
        let mut v = Vec::new();
        if let Ok(vm) = self.vm.lock() {
            v.extend(vm.as_ref().and_then(|vm| vm.pid()));
        }
        if let Ok(b) = self.backend.lock() {
            v.extend(b.as_ref().and_then(|b| b.pid()));
        }
        v
    }

    /// Makes `image` (already held by this pod in the store) available in the
    /// guest, through dm-verity when it has a hash tree; returns its storage
    /// id. `name` is the image as the pod names it (the key into a
    /// confidential pod's image policy). An image already attached is shared.
    pub async fn attach_image(&self, image: &Image, name: &str) -> Result<String, SandboxError> {
        let mut images = self.images.lock().await;
        if let Some(a) = images.get_mut(&image.key) {
            a.users += 1;
            return Ok(a.storage_id.clone());
        }
        let used: BTreeSet<u32> = images.values().map(|a| a.target).collect();
        let target = (0..256)
            .find(|t| !used.contains(t))
            .ok_or(SandboxError::NoSlot)?;
        let node = format!("img{target}");
        let serial = format!("veil-img{target}");
        self.qmp
            .lock()
            .await
            .hot_add_disk(&node, &image.path, &serial, target, true)
            .await?;
        let storage_id = format!("img-{}", image.key);
        let mut req = AddStorageRequest::new();
        req.storage_id = storage_id.clone();
        req.source = StorageSource::BLOCK_SERIAL.into();
        req.locator = serial;
        req.fstype = image.fstype.to_string();
        req.read_only = true;
        req.wait_ms = 30_000;
        req.verity = image.verity.as_ref().map(|v| v.params(name)).into();
        if let Err(e) = agent::rpc(
            "AddStorage",
            self.agent.sandbox.add_storage(agent::ctx(), &req).await,
        ) {
            let _ = self.qmp.lock().await.hot_remove_disk(&node).await;
            return Err(e.into());
        }
        images.insert(
            image.key.clone(),
            Attached {
                storage_id: storage_id.clone(),
                node,
                target,
                users: 1,
            },
        );
        Ok(storage_id)
    }

    /// Drops one use of image `key`; the last use detaches it from the guest
    /// and releases the pod's reference in the store.
    pub async fn detach_image(&self, key: &str) -> Result<(), SandboxError> {
        let mut images = self.images.lock().await;
        let Some(a) = images.get_mut(key) else {
            return Ok(());
        };
        a.users = a.users.saturating_sub(1);
        if a.users > 0 {
            return Ok(());
        }
        let a = images.remove(key).ok_or(SandboxError::NoSlot)?;
        let mut req = RemoveStorageRequest::new();
        req.storage_id = a.storage_id.clone();
        let removed = agent::rpc(
            "RemoveStorage",
            self.agent.sandbox.remove_storage(agent::ctx(), &req).await,
        );
        if removed.is_ok() {
            self.qmp.lock().await.hot_remove_disk(&a.node).await?;
        }
        let store = self.store.clone();
        let (k, holder) = (key.to_string(), self.id.clone());
        let _ = tokio::task::spawn_blocking(move || store.release(&k, &holder)).await;
        removed.map(|_| ()).map_err(Into::into)
    }

    /// Stops the VM (asking the guest first), the backend and the services,
    /// releases the pod's images and removes the pod directory. Idempotent.
    pub async fn shutdown(&self) {
        for s in &self.services {
            s.abort();
        }
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
        let vm = self.vm.lock().ok().and_then(|mut v| v.take());
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
        if let Some(mut b) = self.backend.lock().ok().and_then(|mut b| b.take()) {
            b.stop();
        }
        let store = self.store.clone();
        let id = self.id.clone();
        let _ = tokio::task::spawn_blocking(move || store.release_holder(&id)).await;
        self.dir.cleanup();
    }
}

fn tail(s: &str, n: usize) -> String {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for s in &self.services {
            s.abort();
        }
        if let Some(mut vm) = self.vm.lock().ok().and_then(|mut v| v.take()) {
            vm.kill();
        }
        if let Some(mut b) = self.backend.lock().ok().and_then(|mut b| b.take()) {
            b.stop();
        }
        self.dir.cleanup();
    }
}
