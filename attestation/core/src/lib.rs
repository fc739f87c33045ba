//! veil attestation, guest side: what a confidential guest needs to attest to a key broker.
//!
//! | module | owns |
//! |---|---|
//! | [`tee`] | TEE kind names on the wire |
//! | [`evidence`] | evidence *formats*: strict parsers and builders of the SEV-SNP report and certificate table, the TDX quote, the simulated report envelope |
//! | [`protocol`] | the Trustee KBS protocol's wire payloads, JCS and the `report_data` binding |
//! | [`resource`] | [`ResourcePath`], the one `repo/type/tag` rule (guest, shim and broker alike) |
//! | [`jwe`] | ECDH-ES+A256KW / A256GCM on P-256: how resources are wrapped to the TEE key |
//! | [`client`] | the RCAR client with an ephemeral P-256 key and a pinned-certificate TLS |
//!
//! Verification (signatures, certificate chains, reference values, measurements) is
//! `veil-verifier`'s; the broker is `veil-kbs`. This crate stays small and pure Rust because it is
//! linked into the static guest agent.

pub mod client;
pub mod evidence;
pub mod jwe;
pub mod protocol;
pub mod resource;
pub mod tee;

pub use resource::{ResourcePath, ResourcePathError};
pub use tee::Tee;
