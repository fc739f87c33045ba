//! The pod's scratch disk, host side: a sparse file in the pod directory,
//! attached to the VM at boot, which the agent formats with LUKS2 under a
//! key the host never sees. This module says how the guest finds it and what
//! to ask of the agent; the file itself is made with the VM (see
//! [`crate::sandbox`]).

use veil_protocol::agent::{AddStorageRequest, ScratchParams, StorageSource};

/// The disk's serial, by which the guest finds it.
pub const SERIAL: &str = "veil-scratch";
/// The storage id the pod's containers name (upper layers, volumes).
pub const STORAGE_ID: &str = "scratch";
/// File name in the pod directory.
pub const FILE: &str = "scratch.img";

/// The AddStorage request that unlocks (or formats) and mounts the disk.
pub fn add_request() -> AddStorageRequest {
    let mut r = AddStorageRequest::new();
    r.storage_id = STORAGE_ID.into();
    r.source = StorageSource::BLOCK_SERIAL.into();
    r.locator = SERIAL.into();
    r.fstype = "ext4".into();
    r.read_only = false;
    r.wait_ms = 30_000;
    r.scratch = Some(ScratchParams::new()).into();
    r
}

/// The guest-side bind source of an emptyDir-like volume `name` on the
/// scratch disk (created by the agent on first use).
pub fn volume_source(name: &str) -> String {
    format!("storage:{STORAGE_ID}/volumes/{name}")
}
