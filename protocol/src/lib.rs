//! The veil agent API, shared by the shim (host) and the agent (guest).
//!
//! The API is defined in `protos/agent.proto`; this crate holds the Rust types and
//! the async ttrpc client and server bindings generated from it at build time,
//! the framing of the stdio stream connections ([`stream`]) and of the
//! simulated TEE's firmware call ([`simfw`]), the vsock transports both sides
//! use ([`vsock`]), and error kinds on the wire ([`status`]: the one mapping
//! of `veil_common::Kind` to ttrpc codes).
//! It owns the wire format only: validation of requests is the agent's job.

pub mod fdio;
pub mod simfw;
pub mod status;
pub mod stream;
pub mod vsock;

pub use veil_common as common;

/// Version of the agent API. Bumped on incompatible change.
pub const API_VERSION: u32 = 1;

/// vsock port on which the agent serves the API.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Host vsock port the agent dials once its API is serving, to say it is ready.
///
/// The host must not dial the guest before then: with hybrid vsock
/// (vhost-device-vsock), a `CONNECT` sent before the guest's vsock driver is up
/// can wedge the backend for good. The agent writes one line,
/// `READY <agent version>\n`, and keeps the connection open (a channel for
/// agent logs). With hybrid vsock the host listens on `<uds path>_1026`.
pub const AGENT_READY_VSOCK_PORT: u32 = 1026;

/// What the agent writes to the console (its log) once its API serves. The
/// shim reads the console for it to time the end of the kernel boot: both
/// sides use this constant, so neither parses the other's free text.
pub const AGENT_SERVING_MARK: &str = "agent API serving";

/// vsock port on which the agent accepts stdio stream connections.
pub const STREAM_VSOCK_PORT: u32 = 1025;

/// Host vsock port of the simulated TEE's firmware (simulated-TEE pods only):
/// the guest asks for a signed simulated report here ([`simfw`]). With hybrid
/// vsock the shim listens on `<uds path>_1027`.
pub const SIM_FIRMWARE_VSOCK_PORT: u32 = 1027;

/// Host vsock port of the key broker relay: the shim connects each guest
/// connection to the broker's TCP address and copies bytes both ways. TLS runs
/// end to end between the guest and the broker; the relay sees ciphertext
/// only. With hybrid vsock the shim listens on `<uds path>_1028`.
pub const KBS_RELAY_VSOCK_PORT: u32 = 1028;

/// Messages of the agent API (generated).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    unused_qualifications,
    unused_mut,
    non_upper_case_globals,
    non_camel_case_types,
    renamed_and_removed_lints
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// ttrpc clients and services of the agent API (generated).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    unused_qualifications,
    unused_mut,
    non_upper_case_globals,
    non_camel_case_types,
    renamed_and_removed_lints
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use ttrpc;
