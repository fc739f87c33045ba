//! The pod's scratch disk, host side: a sparse file in the configured
//! `scratch_dir` (removed with the pod directory, which records it),
//! attached to the VM at boot, which the agent formats with LUKS2 under a
//! key the host never sees. This module says how the guest finds it and what
//! to ask of the agent; the file itself is made with the VM (see
//! [`crate::sandbox`]).

use std::path::{Path, PathBuf};

use veil_protocol::agent::{AddStorageRequest, ScratchParams, StorageSource};

/// The disk's serial, by which the guest finds it.
pub const SERIAL: &str = "veil-scratch";
/// The storage id the pod's containers name (upper layers, volumes).
pub const STORAGE_ID: &str = "scratch";
/// The scratch file of pod `sandbox_id` in `scratch_dir` (the id is one
/// path component: checked by the pod directory first).
pub fn path(scratch_dir: &Path, sandbox_id: &str) -> PathBuf {
    scratch_dir.join(format!("{sandbox_id}.img"))
}

/// The AddStorage request that unlocks (or formats) and mounts the disk,
/// with dm-integrity under dm-crypt when `integrity`.
pub fn add_request(integrity: bool) -> AddStorageRequest {
    let mut r = AddStorageRequest::new();
    r.storage_id = STORAGE_ID.into();
    r.source = StorageSource::BLOCK_SERIAL.into();
    r.locator = SERIAL.into();
    r.fstype = "ext4".into();
    r.read_only = false;
    r.wait_ms = 30_000;
    let mut p = ScratchParams::new();
    p.integrity = integrity;
    r.scratch = Some(p).into();
    r
}

/// The guest-side bind source of an emptyDir-like volume `name` on the
/// scratch disk (created by the agent on first use).
pub fn volume_source(name: &str) -> String {
    format!("storage:{STORAGE_ID}/volumes/{name}")
}
