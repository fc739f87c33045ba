//! containerd-shim-veil-v2: the host side of a veil pod.
//!
//! containerd runs one shim per pod; the shim boots the pod's microVM and relays
//! the containerd task API to the agent inside it. Module map:
//! - process life as containerd expects it: [`args`], [`bootstrap`];
//! - the task API: [`task`] (the edge: containerd's types become ours there),
//!   [`status`] (errors to ttrpc codes), [`events`] (task events to containerd);
//! - the pod: [`sandbox`] (the VM and what is attached to it), [`container`]
//!   (containers and processes as tracked), [`agent`] (the
//!   agent client), [`spec`] (host spec to guest spec), [`rootfs`] (root
//!   images), [`stdio`] (FIFOs to agent streams), [`state`] (the pod directory),
//!   [`phases`] (pod start timestamps);
//! - below: [`vmm`] (the VMM backend, QMP, accelerator choice), [`vsock`]
//!   (reaching the agent), [`process`] (child processes the shim owns);
//! - [`config`]: the configuration, `/etc/veil/config.toml`;
//! - [`storage`]: dm-verity trees of root images and the encrypted scratch
//!   disk (issue 6);
//! - [`attest`]: the host's part in remote attestation (the guest's measured
//!   attestation words, the simulated firmware, the key broker relay).

pub mod agent;
pub mod args;
pub mod attest;
pub mod bootstrap;
pub mod config;
pub mod container;
pub mod events;
pub mod metrics;
pub mod phases;
pub mod process;
pub mod rootfs;
pub mod sandbox;
pub mod spec;
pub mod state;
pub mod status;
pub mod stdio;
pub mod storage;
pub mod task;
pub mod vmm;
pub mod vsock;

/// Formats an error with all its sources, outermost first.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
