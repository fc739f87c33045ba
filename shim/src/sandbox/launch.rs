//! What a pod VM is launched with, and the services the host offers the
//! guest: shared by the boot ([`super::boot`]) and the attestation services
//! ([`crate::attest`]) that plug into it.

use std::{path::PathBuf, sync::Arc};

use crate::config::TeeKind;

/// Exactly what a pod VM was launched with: the input of the simulated
/// TEE's launch measurement.
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
    /// The host data bound into the TEE's reports (the init-data digest:
    /// SHA-256 for SNP and the simulated TEE, SHA-384 for TDX); `None`:
    /// zeros, no init-data. Not part of the measurement.
    pub host_data: Option<Vec<u8>>,
}

/// A service the shim offers the guest on a vsock port (guest-initiated
/// connections), started before the VM boots. The simulated firmware of the
/// simulated TEE and the key broker relay plug in here.
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
