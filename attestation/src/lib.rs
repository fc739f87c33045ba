//! veil attestation: evidence, verification, reference values and the key broker.
//!
//! | module | owns |
//! |---|---|
//! | [`tee`] | TEE kind names on the wire |
//! | [`evidence`] | strict parsers: SEV-SNP report + certificate table, TDX quote, simulated report |
//! | [`verify`] | signature / chain / field checks per TEE, producing [`verify::Claims`] |
//! | [`measure`] | SNP launch digest and the simulated measurement |
//! | [`reference`] | reference-values JSON |
//! | [`sim_ca`] | simulated root and chip keys ("generated at install time") |
//! | [`kbs`] | the key broker: Trustee KBS protocol, sessions, policy, store, JWE, admin, audit |
//! | [`client`] | the guest side: RCAR client with an ephemeral P-256 key, JWE decryption |

pub mod client;
pub mod evidence;
pub mod kbs;
pub mod measure;
pub mod reference;
pub mod sim_ca;
pub mod tee;
pub mod verify;

pub use measure::sim::sim_measurement;
pub use tee::Tee;
