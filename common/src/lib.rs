//! veil's shared vocabulary, used by the shim, the agent, the attestation
//! crates and the broker alike, so that each rule exists once:
//!
//! - [`error`]: the error [`Kind`]s every error type classifies itself into
//!   ([`Classify`]), and [`error_chain`], the one way an error is printed;
//! - [`id`]: the one identifier rule (sandbox, container, exec and storage
//!   ids), the same on both sides of the agent API.
//!
//! It has no dependency beyond `thiserror`: the mapping of a kind to a ttrpc
//! code lives in `veil-protocol`, which owns the wire.

pub mod error;
pub mod id;

pub use error::{error_chain, Classify, Kind};
pub use id::{validate_id, IdError};
