//! The VMM backend: what the shim needs from a virtual machine monitor, behind a
//! small trait, and its QEMU implementation.
//!
//! This module owns launching and stopping the VM process. It does not own the
//! vsock backend (see [`crate::vsock`]) nor what runs inside the guest.

pub mod accel;
pub mod qemu;

use std::path::PathBuf;

pub use accel::{Accel, AccelChoice};

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
}

/// How the guest's vsock device is provided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockDevice {
    /// Kernel vhost-vsock with this guest CID.
    Vhost {
        /// Guest context ID (≥ 3).
        cid: u32,
    },
    /// A vhost-user backend (vhost-device-vsock) listening on this socket.
    VhostUser {
        /// The backend's vhost-user socket.
        socket: PathBuf,
    },
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
