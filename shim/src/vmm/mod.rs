//! The VMM backend: what the shim needs from a virtual machine monitor, behind a
//! small trait, and its QEMU implementation.
//!
//! This module owns launching and stopping the VM process. It does not own the
//! vsock backend (see [`crate::vsock`]) nor what runs inside the guest.

use veil_common::{Classify, Kind};
pub mod accel;
pub mod confidential;
pub mod qemu;
pub mod qmp;

use std::path::PathBuf;

pub use accel::{Accel, AccelChoice};
pub use confidential::{SnpParams, TdxParams, Tee};

/// Errors of the VMM backend.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM process could not be started.
    #[error("cannot start the VMM")]
    Spawn(#[source] crate::process::ProcessError),
    /// A file the VM needs is missing.
    #[error("{what} not found at {path}")]
    MissingFile {
        /// What the file is (kernel, initrd, firmware).
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The spec asks for something this VMM or machine type cannot do.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// A QMP exchange failed.
    #[error("QMP {0}")]
    Qmp(#[from] qmp::QmpError),
}

impl Classify for VmmError {
    fn kind(&self) -> Kind {
        match self {
            VmmError::Spawn(e) => e.kind(),
            VmmError::MissingFile { .. } => Kind::FailedPrecondition,
            VmmError::InvalidSpec(_) => Kind::InvalidArgument,
            VmmError::Qmp(e) => e.kind(),
        }
    }
}

/// How the guest's vsock device is provided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockDevice {
    /// Kernel vhost-vsock with this guest CID.
    Vhost {
        /// Guest context ID (≥ 3).
        cid: u32,
        /// An open `/dev/vhost-vsock` whose CID is already set (see
        /// [`crate::vsock::allocate_cid`]), inherited by QEMU as this fd number.
        fd: Option<i32>,
    },
    /// A vhost-user backend (vhost-device-vsock) listening on this socket.
    VhostUser {
        /// The backend's vhost-user socket.
        socket: PathBuf,
    },
}

/// The machine model the VM is built on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Machine {
    /// QEMU `microvm`: no firmware, no PCI, virtio-mmio, PVH kernel entry.
    /// Plain and simulated-TEE pods.
    #[default]
    Microvm,
    /// QEMU `q35` with firmware and a confidential-guest object (SEV-SNP or
    /// TDX pods). Needs KVM and the matching host support.
    Q35 {
        /// Which TEE and its launch parameters.
        tee: Tee,
        /// Guest firmware (OVMF built for the TEE).
        firmware: PathBuf,
    },
}

/// A disk attached when the VM starts (cold-plugged): the pod's scratch disk
/// rides here. Container images are hot-added instead (see
/// [`qmp::Qmp::hot_add_disk`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDisk {
    /// Image file on the host.
    pub path: PathBuf,
    /// Serial the guest finds it by (1-20 printable ASCII characters).
    pub serial: String,
    /// Attached read-only.
    pub read_only: bool,
}

/// Everything needed to launch one pod VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Uncompressed kernel (`vmlinux`, PVH entry) for microvm.
    pub kernel: PathBuf,
    /// Initrd (cpio).
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Accelerator, already resolved.
    pub accel: Accel,
    /// The vsock device.
    pub vsock: VsockDevice,
    /// File receiving the serial console.
    pub console_log: PathBuf,
    /// File receiving the VMM's own stdout/stderr.
    pub vmm_log: PathBuf,
    /// QMP control socket, if wanted.
    pub qmp_socket: Option<PathBuf>,
    /// Machine model (microvm unless the pod is SNP or TDX).
    pub machine: Machine,
    /// Add a virtio-scsi controller (`scsi0`) so disks can be hot-added.
    pub scsi_controller: bool,
    /// Disks attached at start.
    pub disks: Vec<BootDisk>,
    /// A virtio-fs device: virtiofsd's vhost-user socket and the tag the
    /// guest mounts it by (needs shared guest memory, which microvm has).
    pub virtio_fs: Option<(PathBuf, String)>,
    /// virtio-net devices backed by taps (the pod network).
    pub nics: Vec<Nic>,
}

/// A virtio-net device backed by an open tap descriptor that QEMU inherits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The tap's descriptor number in the shim (inherited by QEMU).
    pub tap_fd: i32,
    /// The guest NIC's MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The MTU offered to the guest (`host_mtu`).
    pub mtu: u32,
    /// Use kernel vhost-net (`/dev/vhost-net` exists).
    pub vhost: bool,
}

/// A running VM. Dropping it stops the VM.
pub trait RunningVm: Send {
    /// The VMM process's PID.
    fn pid(&self) -> Option<u32>;
    /// True while the VMM process runs.
    fn is_running(&mut self) -> bool;
    /// Waits up to `timeout` for the VM to end by itself (guest power-off).
    fn wait_exit(&mut self, timeout: std::time::Duration) -> bool;
    /// Stops the VM at once.
    fn kill(&mut self);
}

/// A virtual machine monitor that can launch pod VMs.
pub trait Vmm {
    /// Launches a VM; returns once the VMM process is running.
    fn launch(
        &self,
        spec: &VmSpec,
        opts: crate::process::SpawnOptions,
    ) -> Result<Box<dyn RunningVm>, VmmError>;
}
