//! veil attestation, verifier side: from evidence to verified claims, and the values they are
//! compared with.
//!
//! | module | owns |
//! |---|---|
//! | [`verify`] | signature / chain / field checks per TEE, producing [`verify::Claims`] |
//! | [`measure`] | the SNP launch digest and the simulated measurement (`veil measure`) |
//! | [`reference`] | reference-values JSON |
//! | [`sim_ca`] | the simulated root and chip keys ("generated at install time"), [`sim_ca::SimChip`] for the shim's simulated firmware |
//! | [`sim_report`] | issuing simulated chip certificates, building and signing simulated reports |
//!
//! The evidence formats themselves are `veil_attestation::evidence`'s; what the verified claims
//! unlock is the broker's policy (`veil-kbs`).

pub mod measure;
pub mod reference;
pub mod sim_ca;
pub mod sim_report;
pub mod verify;

pub use measure::sim::sim_measurement;
pub use verify::{verify_evidence, Claims, TrustAnchors, VerifyError};
