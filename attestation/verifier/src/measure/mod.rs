//! Launch measurements: what a correctly launched guest's evidence must report.
//!
//! [`snp`] computes the SEV-SNP launch digest of QEMU + OVMF; [`sim`] computes the simulated
//! TEE's measurement (the same function the shim uses for what it launched). `veil measure`
//! writes either as reference values ([`crate::reference`]).

pub mod sim;
pub mod snp;
