//! A booted pod VM for tests: vhost-device-vsock + QEMU microvm + the agent.
//!
//! Everything is owned by [`TestVm`]: dropping it (also while a failing test
//! unwinds) kills QEMU and the vsock backend by PID and removes the temp dir.
//! Both children also get SIGKILL if the test thread dies (PR_SET_PDEATHSIG).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use veil_shim::{
    process::SpawnOptions,
    vmm::{accel, qemu::Qemu, Accel, AccelChoice, BootDisk, RunningVm, VmSpec, Vmm, VsockDevice},
    vsock::{AgentReady, HybridVsockBackend, ReadyListener},
};

use crate::Artefacts;

/// The kernel command line the tests boot with: the shim's.
pub use veil_shim::sandbox::BASE_CMDLINE;

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Initrd to boot (the agent's by default).
    pub initrd: PathBuf,
    /// Extra kernel command-line words.
    pub extra_cmdline: String,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM in MiB.
    pub memory_mib: u32,
    /// Accelerator choice (`auto` runs the KVM canary).
    pub accel: AccelChoice,
    /// Disks attached at boot (on a SCSI controller; the guest finds them
    /// by serial).
    pub disks: Vec<BootDisk>,
}

impl VmOptions {
    /// Defaults: the agent initrd, 1 vCPU, 256 MiB, accel auto. Extra kernel
    /// command-line words come from `VEIL_TEST_CMDLINE` (e.g. `veil.log=debug`).
    pub fn agent(a: &Artefacts) -> Self {
        VmOptions {
            initrd: a.initrd.clone(),
            extra_cmdline: std::env::var("VEIL_TEST_CMDLINE").unwrap_or_default(),
            vcpus: 1,
            memory_mib: 256,
            accel: AccelChoice::Auto,
            disks: Vec::new(),
        }
    }
}

/// A running test VM.
pub struct TestVm {
    // Field order is drop order: QEMU first, then its backend, then the files.
    vm: Box<dyn RunningVm>,
    backend: HybridVsockBackend,
    /// Serial console output.
    pub console_log: PathBuf,
    /// When QEMU was spawned.
    pub started: Instant,
    /// The accelerator used.
    pub accel: Accel,
    /// Kernel, initrd, command line and vCPUs as launched.
    launched: (PathBuf, PathBuf, String, u32),
    ready: std::sync::Mutex<ReadyState>,
    dir: tempfile::TempDir,
}

/// Where the agent's readiness call stands.
enum ReadyState {
    Waiting(ReadyListener),
    Ready(#[allow(dead_code)] AgentReady),
    Taken,
}

impl TestVm {
    /// Starts the vsock backend and QEMU. Returns once QEMU is spawned; the
    /// guest boots in the background.
    pub fn boot(a: &Artefacts, opts: &VmOptions) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("veil-test-vm.").tempdir()?;
        let spawn = SpawnOptions {
            die_with_parent_thread: true,
            ..Default::default()
        };
        let backend = HybridVsockBackend::start(
            &a.vhost_device_vsock,
            dir.path(),
            dir.path(),
            3,
            spawn.clone(),
        )
        .context("starting vhost-device-vsock")?;
        // Listen for the agent's readiness call before the guest can make it.
        let ready = ReadyListener::bind(&backend.uds_path)?;
        let accel = accel::resolve(opts.accel);
        let console_log = dir.path().join("console.log");
        let spec = VmSpec {
            kernel: a.kernel.clone(),
            initrd: opts.initrd.clone(),
            cmdline: format!("{BASE_CMDLINE} {}", opts.extra_cmdline)
                .trim()
                .to_string(),
            vcpus: opts.vcpus,
            memory_mib: opts.memory_mib,
            accel,
            vsock: VsockDevice::VhostUser {
                socket: backend.vhost_socket.clone(),
            },
            console_log: console_log.clone(),
            vmm_log: dir.path().join("qemu.log"),
            qmp_socket: None,
            machine: Default::default(),
            scsi_controller: !opts.disks.is_empty(),
            disks: opts.disks.clone(),
            virtio_fs: None,
            nics: Vec::new(),
        };
        let launched = (
            spec.kernel.clone(),
            spec.initrd.clone(),
            spec.cmdline.clone(),
            spec.vcpus,
        );
        let started = Instant::now();
        let vm = Qemu {
            binary: a.qemu.clone(),
        }
        .launch(&spec, spawn)
        .context("launching QEMU")?;
        Ok(TestVm {
            vm,
            backend,
            console_log,
            started,
            accel,
            launched,
            ready: std::sync::Mutex::new(ReadyState::Waiting(ready)),
            dir,
        })
    }

    /// Waits up to `timeout` for the agent's readiness call (once; later calls
    /// return at once). Returns the agent's version the first time.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Option<String>> {
        let state = std::mem::replace(&mut *self.lock_ready(), ReadyState::Taken);
        let mut listener = match state {
            ReadyState::Waiting(l) => l,
            other => {
                *self.lock_ready() = other;
                return Ok(None);
            }
        };
        let r = match listener.wait(timeout).await {
            Ok(r) => r,
            Err(e) => {
                // Keep listening: a later wait may still see the call.
                *self.lock_ready() = ReadyState::Waiting(listener);
                return Err(e).with_context(|| {
                    format!("waiting for the agent; console:\n{}", self.console())
                });
            }
        };
        let version = r.version.clone();
        *self.lock_ready() = ReadyState::Ready(r);
        Ok(Some(version))
    }

    fn lock_ready(&self) -> std::sync::MutexGuard<'_, ReadyState> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connects to guest vsock `port` once the agent has reported ready, both
    /// within `timeout`.
    pub async fn connect(&self, port: u32, timeout: Duration) -> Result<tokio::net::UnixStream> {
        let start = std::time::Instant::now();
        self.wait_ready(timeout).await?;
        veil_protocol::vsock::connect_hybrid(
            &self.backend.uds_path,
            port,
            timeout.saturating_sub(start.elapsed()),
        )
        .await
        .with_context(|| {
            format!(
                "connecting to guest port {port}; console:\n{}",
                self.console()
            )
        })
    }

    /// A ttrpc client to the agent API (vsock port 1024).
    pub async fn agent_client(&self, timeout: Duration) -> Result<ttrpc::r#async::Client> {
        let stream = self
            .connect(veil_protocol::AGENT_VSOCK_PORT, timeout)
            .await?;
        let std_stream = stream.into_std()?;
        std_stream.set_nonblocking(true)?;
        Ok(ttrpc::r#async::Client::new(
            std::os::fd::IntoRawFd::into_raw_fd(std_stream),
        ))
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console_log).unwrap_or_default()
    }

    /// PIDs of QEMU and the vsock backend (to check they are gone after drop).
    pub fn pids(&self) -> Vec<u32> {
        self.vm
            .pid()
            .into_iter()
            .chain(self.backend.pid())
            .collect()
    }

    /// Waits for the VM to end by itself (guest power-off).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        self.vm.wait_exit(timeout)
    }

    /// The VM's temp directory.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// What was launched, as the shim records it for a pod of `tee` (the
    /// input of the simulated launch measurement).
    pub fn launch_info(&self, tee: veil_shim::config::TeeKind) -> veil_shim::sandbox::LaunchInfo {
        let (kernel, initrd, cmdline, vcpus) = self.launched.clone();
        veil_shim::sandbox::LaunchInfo {
            tee,
            kernel,
            initrd,
            firmware: None,
            cmdline,
            vcpus,
            host_data: None,
        }
    }

    /// Where the guest's connections to host vsock `port` arrive (bind a
    /// listener there before the guest dials).
    pub fn host_listener_path(&self, port: u32) -> PathBuf {
        let mut p = self.backend.uds_path.as_os_str().to_owned();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.vm.kill();
        self.backend.stop();
    }
}

/// True if a process with this PID exists (and is not a zombie of ours).
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}
