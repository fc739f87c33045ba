//! Booting a pod VM: the pod directory, the vsock transport (a guest CID or
//! a hybrid backend), the host services for the guest, the scratch disk,
//! QEMU, the agent's readiness and health, QMP, then the guest's sandbox set-up:
//! its shared files, attestation, and the encrypted scratch disk.
//!
//! [`boot`] returns the parts as a [`Booted`]; until then, a failure at any
//! step tears down what was started ([`Partial`]).

use std::{os::unix::fs::DirBuilderExt, path::PathBuf, sync::Arc, time::Duration};

use veil_common::{Classify, Kind};
use veil_protocol::{agent::CreateSandboxRequest, vsock::GuestTransport};

use super::launch::{HostService, LaunchInfo};
use crate::network::PodNetwork;
use crate::volumes::shared::{self, SharedError, VirtioFs};
use crate::{
    agent::{self, Agent, AgentError},
    config::{Config, HandlerConfig, TeeKind, VsockMode},
    jail::{Credentials, PodJail},
    phases::Phases,
    process::SpawnOptions,
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
/// `kernel_params`). `rcupdate.rcu_expedited=1`: a task that waits for an RCU
/// grace period (moving a task between cgroups, unmounting, tearing down a
/// namespace) is released by IPIs to the guest's one or two vCPUs instead of
/// the grace-period kthread's timers, which under TCG wait for the host's
/// clock (`docs/boot.md`).
pub const BASE_CMDLINE: &str =
    "console=ttyS0 quiet acpi=off reboot=t panic=-1 rcupdate.rcu_expedited=1";

/// Errors booting the pod VM.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
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
    /// A file for the VM (scratch disk, a service socket).
    #[error("cannot create {path}")]
    File {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VM ended while starting: what QEMU itself said (its stderr, e.g.
    /// a refused device or a missing file), then the tail of the console.
    #[error("the VM exited during boot; QEMU said:\n{0}\nconsole:\n{1}")]
    Died(String, String),
    /// The VM did not become ready within the boot deadline, stretched for
    /// the node's load.
    #[error("the pod VM was not ready after {expired}: {stage}")]
    NotReady {
        /// How long, and under what load.
        expired: crate::patience::Expired,
        /// How far it got.
        stage: &'static str,
    },
    /// The pod's attestation set-up (broker, simulated TEE keys).
    #[error("attestation set-up")]
    Attest(#[from] crate::attest::AttestSetupError),
    /// The pod's network (taps and redirects in its namespace).
    #[error("pod network")]
    Network(#[from] crate::network::NetworkError),
    /// The virtio-fs share of a `shared_dirs` handler.
    #[error("host-shared directories (virtio-fs)")]
    Shared(#[from] SharedError),
    /// The jail of the pod's QEMU and vsock backend.
    #[error("the pod's jail")]
    Jail(#[from] crate::jail::JailError),
    /// `shared_dirs` on a machine that cannot have it.
    #[error("{0}")]
    SharedDirs(String),
}

impl Classify for BootError {
    fn kind(&self) -> Kind {
        match self {
            BootError::State(e) => e.kind(),
            BootError::Vsock(e) => e.kind(),
            BootError::Ready(e) => e.kind(),
            BootError::Vmm(e) => e.kind(),
            BootError::Qmp(e) => e.kind(),
            BootError::Agent(e) => e.kind(),
            BootError::File { .. } | BootError::Died(..) => Kind::Internal,
            BootError::Attest(e) => e.kind(),
            BootError::Shared(e) => e.kind(),
            BootError::Network(e) => e.kind(),
            BootError::Jail(e) => e.kind(),
            BootError::SharedDirs(_) => Kind::FailedPrecondition,
            BootError::NotReady { .. } => Kind::DeadlineExceeded,
        }
    }
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
    /// The pod's policy document (init-data; empty: none).
    pub policy: Vec<u8>,
    /// The pod's network namespace (CNI's), if it has one: its interfaces
    /// become the VM's NICs. `None`: loopback only.
    pub netns: Option<PathBuf>,
    /// The sandbox container's image, hot-added during the boot.
    pub first_image: Option<FirstImage<'a>>,
}

/// The image of the container a pod boots for, to hot-add ahead.
pub struct FirstImage<'a> {
    /// The pod's images.
    pub images: &'a super::images::Images,
    /// The image, built (or found in the store) while the VM boots; the
    /// hot-add waits for that build rather than asking the store again.
    pub built: &'a super::images::Built,
}

/// A booted pod VM, its parts owned by the caller from here on.
pub struct Booted {
    /// The pod directory.
    pub dir: PodDir,
    /// The VMM.
    pub vm: Box<dyn RunningVm>,
    /// The hybrid vsock backend, if any.
    pub backend: Option<HybridVsockBackend>,
    /// The `/dev/vhost-vsock` descriptor holding the guest CID, if any.
    pub vhost_device: Option<std::fs::File>,
    /// QMP.
    pub qmp: Qmp,
    /// The agent.
    pub agent: Agent,
    /// The host services' tasks.
    pub services: Vec<tokio::task::JoinHandle<()>>,
    /// The agent's readiness connection, kept open.
    pub ready_call: Option<AgentReady>,
    /// What was launched.
    pub launch: LaunchInfo,
    /// Whether the pod has its encrypted scratch disk.
    pub has_scratch: bool,
    /// The virtio-fs share's daemon, if the handler shares host directories.
    pub virtiofs: Option<VirtioFs>,
    /// The pod's network on the host (taps and redirects), if it has one.
    pub network: Option<PodNetwork>,
}

/// The kernel command line of `h`'s pods: the base line, the measured
/// attestation words, the handler's `kernel_params`.
pub fn cmdline(h: &HandlerConfig) -> Result<String, BootError> {
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
pub fn launch_info(h: &HandlerConfig) -> Result<LaunchInfo, BootError> {
    Ok(LaunchInfo {
        tee: h.tee,
        kernel: h.kernel.clone(),
        initrd: h.initrd.clone(),
        firmware: matches!(h.tee, TeeKind::Snp | TeeKind::Tdx).then(|| h.firmware.clone()),
        cmdline: cmdline(h)?,
        vcpus: h.vcpus,
        host_data: None,
    })
}

fn spawn_opts(jail: Option<Credentials>) -> SpawnOptions {
    // The shim's runtime is single-threaded on the main thread, which lives as
    // long as the shim: a crashed shim takes QEMU and the backend with it.
    SpawnOptions {
        die_with_parent_thread: true,
        jail,
        write_only_below: None,
    }
}

/// Parts of a VM being booted; dropping it tears them down.
struct Partial {
    dir: PodDir,
    vm: Option<Box<dyn RunningVm>>,
    backend: Option<HybridVsockBackend>,
    virtiofs: Option<VirtioFs>,
    network: Option<PodNetwork>,
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
        if let Some(mut f) = self.virtiofs.take() {
            f.stop();
        }
        if let Some(mut n) = self.network.take() {
            n.teardown();
        }
        self.dir.cleanup();
    }
}

fn machine(h: &HandlerConfig, host_data: Option<&[u8]>) -> Machine {
    use base64::Engine;
    let b64 = host_data.map(|d| base64::engine::general_purpose::STANDARD.encode(d));
    match h.tee {
        TeeKind::None | TeeKind::Sim => Machine::Microvm,
        TeeKind::Snp => Machine::Q35 {
            tee: Tee::Snp(SnpParams {
                host_data_b64: b64,
                ..SnpParams::default()
            }),
            firmware: h.firmware.clone(),
        },
        TeeKind::Tdx => Machine::Q35 {
            tee: Tee::Tdx(TdxParams {
                sept_ve_disable: true,
                mrconfigid_b64: b64,
            }),
            firmware: h.firmware.clone(),
        },
    }
}

/// Creates the pod's sparse scratch file (recorded in the pod directory
/// first, so the pod's cleanup removes it whatever happens).
fn scratch_disk(
    p: &BootParams<'_>,
    dir: &PodDir,
    jail: Option<&PodJail>,
) -> Result<Option<BootDisk>, BootError> {
    let h = p.handler;
    if h.scratch_disk_mib == 0 {
        return Ok(None);
    }
    let path = scratch::path(&p.config.scratch_dir, p.id);
    let file_err = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| BootError::File { path, source }
    };
    // Missing parents get the usual mode (a jailed QEMU passes through them
    // to its disk); the scratch dir itself is not listable.
    if let Some(parent) = p.config.scratch_dir.parent() {
        std::fs::create_dir_all(parent).map_err(file_err(parent))?;
    }
    match std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&p.config.scratch_dir)
    {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(file_err(&p.config.scratch_dir)(e))
        }
        _ => {}
    }
    dir.record_file("scratch", &path)?;
    let f = std::fs::File::create(&path).map_err(file_err(&path))?;
    f.set_len(h.scratch_disk_mib * 1024 * 1024)
        .map_err(file_err(&path))?;
    if let Some(j) = jail {
        // The pod's QEMU alone may open it: its uid's, mode 0600, reached
        // through a searchable (not listable) scratch dir.
        crate::jail::make_searchable(&p.config.scratch_dir)?;
        j.give(&path, 0o600)?;
        crate::jail::check_reach(
            "the scratch disk",
            &path,
            crate::jail::Access::ReadWrite,
            &j.creds,
        )?;
    }
    Ok(Some(BootDisk {
        path,
        serial: scratch::SERIAL.into(),
        read_only: false,
    }))
}

/// Boots the pod VM and waits for its agent; records the boot phases.
pub async fn boot(p: BootParams<'_>, phases: &Phases) -> Result<Booted, BootError> {
    let dir = PodDir::at(&p.config.state_dir, p.id)?;
    dir.create()?;
    // From here on the pod's cleanup also ends its uid lease.
    let jail = PodJail::prepare(&p.config.state_dir, &dir.path, p.id, &p.config.jail);
    let mut partial = Partial {
        dir: dir.clone(),
        vm: None,
        backend: None,
        virtiofs: None,
        network: None,
        services: Vec::new(),
        defused: false,
    };
    let jail = jail?;
    // The jailed processes' sockets and console: the directory they own.
    let vm_dir = jail.as_ref().map_or(dir.path.clone(), |j| j.dir.clone());
    let h = p.handler;
    let accel = accel::resolve(h.accel);
    let use_vhost = match h.vsock {
        VsockMode::Vhost => true,
        VsockMode::Hybrid => false,
        VsockMode::Auto => vsock::vhost_available(),
    };
    let mut ready = None;
    let (device, transport, vhost_device) = if use_vhost {
        let (cid, file) = vsock::allocate_cid(h.first_cid, 4096)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        (
            VsockDevice::Vhost { cid, fd: Some(fd) },
            GuestTransport::Vhost { cid },
            Some(file),
        )
    } else {
        let creds = match &jail {
            Some(j) => Some(j.backend_credentials(&p.config.vhost_device_vsock)?),
            None => None,
        };
        let backend = HybridVsockBackend::start(
            &p.config.vhost_device_vsock,
            &dir.path,
            &vm_dir,
            3,
            spawn_opts(creds),
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
        let listener = ReadyListener::bind(&backend.uds_path)?;
        if let Some(j) = &jail {
            // The backend connects to it for the guest.
            j.give(listener.path(), 0o600)?;
        }
        ready = Some(listener);
        partial.backend = Some(backend);
        (dev, t, None)
    };
    let mut launch = launch_info(h)?;
    launch.host_data = crate::attest::init_data_host_data(h, &p.policy);
    let disks: Vec<BootDisk> = scratch_disk(&p, &dir, jail.as_ref())?.into_iter().collect();
    let attest_services: Vec<Arc<dyn HostService>> = crate::attest::host_services(h)?;
    for svc in &attest_services {
        if let Some(path) = transport.host_listener_path(svc.port()) {
            let l = tokio::net::UnixListener::bind(&path).map_err(|source| BootError::File {
                path: path.clone(),
                source,
            })?;
            if let Some(j) = &jail {
                j.give(&path, 0o600)?;
            }
            partial
                .services
                .push(Arc::clone(svc).serve(l, launch.clone()));
        }
    }
    let virtio_fs = if h.shared_dirs {
        if !matches!(machine(h, None), Machine::Microvm) {
            return Err(BootError::SharedDirs(format!(
                "shared_dirs needs a microvm pod (tee none or sim); handler has tee {:?}",
                h.tee
            )));
        }
        // virtiofsd stays root: it serves files with the guest's owners
        // and modes (setuid, chown, DAC override) and confines itself
        // (namespaces, pivot into the shared dir, seccomp). Only the
        // pod's QEMU may connect to it.
        let fs = VirtioFs::start(&p.config.virtiofsd, &dir.path, spawn_opts(None))?;
        if let Some(j) = &jail {
            j.give(&fs.socket, 0o600)?;
        }
        if let Some(pid) = fs.pid() {
            dir.record_pid("virtiofsd", pid)?;
        }
        let dev = (fs.socket.clone(), shared::TAG.to_string());
        partial.virtiofs = Some(fs);
        Some(dev)
    } else {
        None
    };
    let nics = match &p.netns {
        Some(ns) => {
            let net = PodNetwork::setup(ns).await?;
            let mut nics = net.nics();
            // Kernel vhost-net needs KVM's ioeventfds; TCG uses QEMU's own
            // virtio-net.
            for n in &mut nics {
                n.vhost &= accel == accel::Accel::Kvm;
            }
            partial.network = Some(net);
            nics
        }
        None => Vec::new(),
    };
    let qmp_path = vm_dir.join("qmp.sock");
    let console = vm_dir.join("console.log");
    let qemu_creds = match &jail {
        Some(j) => {
            let mut devices: Vec<&std::path::Path> = Vec::new();
            if accel == accel::Accel::Kvm {
                devices.push(std::path::Path::new("/dev/kvm"));
            }
            if nics.iter().any(|n| n.vhost) {
                devices.push(std::path::Path::new("/dev/vhost-net"));
            }
            if h.tee == TeeKind::Snp {
                devices.push(std::path::Path::new("/dev/sev"));
            }
            Some(j.qemu_credentials(&p.config.qemu, &devices)?)
        }
        None => None,
    };
    let spec = VmSpec {
        kernel: h.kernel.clone(),
        initrd: h.initrd.clone(),
        cmdline: launch.cmdline.clone(),
        vcpus: h.vcpus,
        memory_mib: h.memory_mib,
        accel,
        vsock: device,
        console_log: console.clone(),
        vmm_log: dir.file("qemu.log"),
        qmp_socket: Some(qmp_path.clone()),
        machine: machine(h, launch.host_data.as_deref()),
        scsi_controller: true,
        disks,
        virtio_fs,
        nics,
    };
    let launched = Qemu {
        binary: p.config.qemu.clone(),
    }
    .launch(&spec, spawn_opts(qemu_creds));
    // QEMU holds its own tap descriptors now (or failed): the taps live as
    // long as the VM.
    if let Some(n) = partial.network.as_mut() {
        n.release_taps();
    }
    let vm = launched?;
    if let Some(pid) = vm.pid() {
        dir.record_pid("qemu", pid)?;
    }
    partial.vm = Some(vm);
    phases.mark("vmm_spawned");
    tracing::debug!(?accel, "VMM spawned");

    let console_says_serving = || {
        std::fs::read_to_string(&console)
            .map(|c| c.contains(veil_protocol::AGENT_SERVING_MARK))
            .unwrap_or(false)
    };
    let watch_console = async {
        loop {
            if console_says_serving() {
                phases.mark("kernel_booted");
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    // The boot deadline stretches with the node's load (crate::patience);
    // the waits inside it get its ceiling.
    let timeout = Duration::from_millis(h.boot_timeout_ms);
    let inner = crate::patience::ceiling(timeout);
    let connect = crate::patience::wait(timeout, async {
        let mut call: Option<AgentReady> = None;
        if let Some(l) = ready.as_mut() {
            call = Some(l.wait(inner).await.map_err(BootError::Ready)?);
        }
        let agent = Agent::connect(transport.clone(), inner).await?;
        Ok::<_, BootError>((agent, call))
    });
    tokio::pin!(connect);
    tokio::pin!(watch_console);
    let mut console_seen = false;
    let connected = loop {
        tokio::select! {
            a = &mut connect => break a.unwrap_or_else(|expired| Err(BootError::NotReady {
                expired,
                stage: if console_seen || console_says_serving() {
                    "its kernel booted and the agent serves, but did not answer"
                } else {
                    "the agent had not started serving"
                },
            })),
            () = &mut watch_console, if !console_seen => console_seen = true,
        }
    };
    let (agent, ready_call) = match connected {
        Ok(a) => a,
        Err(e) => {
            let vm_alive = partial.vm.as_mut().is_some_and(|v| v.is_running());
            if !vm_alive {
                let text = std::fs::read_to_string(&console).unwrap_or_default();
                let vmm = std::fs::read_to_string(dir.file("qemu.log")).unwrap_or_default();
                return Err(BootError::Died(tail(&vmm, 2000), tail(&text, 2000)));
            }
            return Err(e);
        }
    };
    if !console_seen && console_says_serving() {
        phases.mark("kernel_booted");
    }
    phases.mark("agent_ready");
    let mut qmp = Qmp::connect(&qmp_path, crate::patience::scaled(Duration::from_secs(10))).await?;

    // The guest's set-up, while the first image's disk is hot-added (the
    // guest scans for it meanwhile).
    let setup = async {
        crate::attest::deliver_policy(&agent, h, &p.policy).await?;
        let mut req = CreateSandboxRequest::new();
        req.sandbox_id = p.id.to_string();
        // localhost plus the pod's name. The pod's resolv.conf comes with its
        // first application container (its spec binds the file containerd wrote
        // from the pod's DNS config): none until then.
        req.hosts = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
            p.hostname
        )
        .into_bytes();
        req.hostname = p.hostname.clone();
        if let Some(n) = &partial.network {
            let (interfaces, routes) = n.guest_config();
            req.interfaces = interfaces;
            req.routes = routes;
        }
        agent::rpc(
            "CreateSandbox",
            agent.sandbox.create_sandbox(agent::ctx(), &req).await,
        )?;
        if let Some(n) = partial.network.as_mut() {
            n.start_port_forward(transport.clone()).await?;
            // Taps wired on the host, the guest's interfaces configured,
            // PortForward relayed.
            phases.mark("network_ready");
        }
        crate::attest::attest_pod(&agent, h, phases).await?;
        let has_scratch = h.scratch_disk_mib > 0;
        if has_scratch {
            // Formatted (or opened) under the key the broker released, or an
            // ephemeral one in a plain pod: the agent decides, not the host.
            agent::rpc(
                "AddStorage",
                agent
                    .sandbox
                    .add_storage(agent::ctx(), &scratch::add_request(h.scratch_integrity))
                    .await,
            )?;
            phases.mark("scratch_ready");
        }
        if partial.virtiofs.is_some() {
            agent::rpc(
                "AddStorage",
                agent
                    .sandbox
                    .add_storage(agent::ctx(), &shared::add_request())
                    .await,
            )?;
        }
        Ok::<_, BootError>(has_scratch)
    };
    let plug = async {
        if let Some(f) = &p.first_image {
            f.images.plug_ahead(f.built, &mut qmp).await;
        }
    };
    let (has_scratch, ()) = tokio::join!(setup, plug);
    let has_scratch = has_scratch?;

    let Some(vm) = partial.vm.take() else {
        return Err(BootError::Died(String::new(), String::new()));
    };
    let backend = partial.backend.take();
    let virtiofs = partial.virtiofs.take();
    let network = partial.network.take();
    let services = std::mem::take(&mut partial.services);
    // Everything is owned by the caller now.
    partial.defused = true;
    Ok(Booted {
        dir,
        vm,
        backend,
        vhost_device,
        qmp,
        agent,
        services,
        ready_call,
        launch,
        has_scratch,
        virtiofs,
        network,
    })
}

fn tail(s: &str, n: usize) -> String {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_string()
}
