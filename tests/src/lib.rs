//! Shared support for veil's integration and end-to-end tests.
//!
//! One place for the fixtures every test needs: where the built artefacts are
//! ([`artefacts`]), a booted pod VM with its vsock backend that cleans up after
//! itself even when the test panics ([`vm`]), the agent in host mode
//! ([`agent`]), busybox root filesystems and OCI specs ([`rootfs`]), OCI
//! image archives built offline ([`oci`]), a private containerd with the
//! veil runtime registered ([`containerd`]) and a CRI client to it ([`cri`]), node-install fixtures ([`node`]), a key broker with a simulated
//! TEE for attestation tests ([`kbs`]) and the confidential-storage helpers
//! ([`storage`]), network namespaces made by the test ([`netns`]) and a CNI bridge
//! network with containerd inside one ([`podnet`]).
//!
//! Tests that need something missing (kernel, QEMU, vhost-device-vsock) fail
//! with a message naming it; nothing is skipped silently.

pub mod agent;
pub mod artefacts;
pub mod containerd;
pub mod cri;
pub mod kbs;
pub mod netns;
pub mod node;
pub mod oci;
pub mod podnet;
pub mod rootfs;
pub mod storage;
pub mod vm;

pub use artefacts::Artefacts;
pub use vm::{TestVm, VmOptions};

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Stops a child this process started: SIGTERM, up to `grace` to exit, then
/// SIGKILL; reaped either way.
pub fn stop_child(child: &mut std::process::Child, grace: std::time::Duration) {
    use std::time::{Duration, Instant};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
