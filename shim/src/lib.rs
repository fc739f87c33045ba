//! containerd-shim-veil-v2: the host side of a veil pod.
//!
//! containerd runs one shim per pod; the shim boots the pod's microVM and relays
//! the containerd task API to the agent inside it. Module map:
//! - process life as containerd expects it: [`args`], [`bootstrap`],
//!   [`handshake`] (containerd 2.x's `-info`);
//! - the task API: [`task`] (the edge: containerd's types become ours there;
//!   containers and processes as containerd sees them), [`events`] (task
//!   events to containerd);
//! - [`pod`]: the seam between the task service and a pod, so the task
//!   lifecycle is tested against a fake pod;
//! - the pod VM: [`sandbox`] (the real pod: boot, images, relays), [`agent`]
//!   (the agent client), [`spec`] (host spec to guest spec), [`rootfs`] (root
//!   images), [`stdio`] (FIFOs to agent streams), [`state`] (the pod
//!   directory), [`phases`] (pod start timestamps);
//! - below: [`vmm`] (the VMM backend, QMP, accelerator choice), [`vsock`]
//!   (reaching the agent), [`process`] (child processes the shim owns),
//!   [`jail`] (the per-pod uid those processes run as);
//! - [`config`]: the configuration, `/etc/veil/config.toml`;
//! - [`sync`]: the one way shared state is locked;
//! - [`storage`]: dm-verity trees of root images and the encrypted scratch
//!   disk; [`volumes`]: pod volumes (file volumes copied into the guest and
//!   kept in step with kubelet);
//! - [`attest`]: the host's part in remote attestation (the guest's measured
//!   attestation words, the simulated firmware, the key broker relay).
//!
//! Every error type classifies itself (`veil_common::Classify`); the ttrpc
//! code of a kind is `veil_protocol::status`.

pub mod agent;
pub mod args;
pub mod attest;
pub mod bootstrap;
pub mod config;
pub mod events;
pub mod handshake;
pub mod jail;
pub mod metrics;
pub mod network;
pub mod patience;
pub mod phases;
pub mod pod;
pub mod process;
pub mod report;
pub mod rootfs;
pub mod sandbox;
pub mod spec;
pub mod state;
pub mod stdio;
pub mod storage;
pub mod sync;
pub mod task;
pub mod vmm;
pub mod volumes;
pub mod vsock;

pub use veil_common::error_chain;

#[cfg(test)]
mod kinds_tests;
