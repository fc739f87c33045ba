//! Simulated-TEE verification: the SNP report checks, with the simulated root as trust anchor.
//!
//! The chip certificate must be signed by the configured simulated root, the report by that chip
//! key, and the report's CHIP_ID must name that chip. The report fields are checked exactly as for
//! SNP ([`super::snp::check_report_fields`]). Whether simulated evidence may unlock anything is a
//! policy decision (the broker's), off by default.

use p384::ecdsa::{signature::Verifier, VerifyingKey};
use thiserror::Error;

use super::snp::{check_report_fields, verify_report_signature, ReportCheckError};
use veil_attestation::evidence::sim::{SimChipCert, SimEvidenceError};
use veil_attestation::evidence::snp::SnpReport;
use veil_common::{Classify, Kind};

use crate::sim_report::{chip_cert_signature, chip_public_key, sim_chip_id};

/// Why simulated evidence was not accepted.
#[derive(Debug, Error)]
pub enum SimVerifyError {
    /// The broker has no simulated root configured, so it cannot verify simulated evidence.
    #[error("no simulated root is configured on this broker")]
    NoSimRoot,
    /// The chip certificate is malformed.
    #[error("simulated chip certificate is malformed")]
    ChipCert(#[source] SimEvidenceError),
    /// The chip certificate is not signed by the simulated root.
    #[error("simulated chip certificate is not signed by the simulated root")]
    ChipCertSignature,
    /// The report's CHIP_ID does not name the certified chip.
    #[error("simulated report chip ID does not match the chip certificate")]
    ChipIdMismatch,
    /// A check on the report itself failed.
    #[error("simulated report check failed")]
    Report(#[source] ReportCheckError),
}

impl Classify for SimVerifyError {
    fn kind(&self) -> Kind {
        match self {
            SimVerifyError::NoSimRoot => Kind::FailedPrecondition,
            SimVerifyError::ChipCert(e) => e.kind(),
            SimVerifyError::ChipCertSignature | SimVerifyError::ChipIdMismatch => {
                Kind::PermissionDenied
            }
            SimVerifyError::Report(e) => e.kind(),
        }
    }
}

/// Verifies simulated evidence under `root`.
pub fn verify_sim(
    report: &SnpReport,
    chip_cert: &SimChipCert,
    root: &VerifyingKey,
    expected_report_data: &[u8; 64],
) -> Result<(), SimVerifyError> {
    let tbs = chip_cert.tbs().map_err(SimVerifyError::ChipCert)?;
    let sig = chip_cert_signature(chip_cert).map_err(SimVerifyError::ChipCert)?;
    root.verify(&tbs, &sig)
        .map_err(|_| SimVerifyError::ChipCertSignature)?;
    let chip = chip_public_key(chip_cert).map_err(SimVerifyError::ChipCert)?;
    verify_report_signature(report, &chip).map_err(SimVerifyError::Report)?;
    if report.chip_id() != sim_chip_id(&chip) {
        return Err(SimVerifyError::ChipIdMismatch);
    }
    check_report_fields(report, expected_report_data).map_err(SimVerifyError::Report)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds() {
        for (e, k) in [
            (SimVerifyError::NoSimRoot, Kind::FailedPrecondition),
            (
                SimVerifyError::ChipCert(SimEvidenceError::ChipCert("x")),
                Kind::InvalidArgument,
            ),
            (SimVerifyError::ChipCertSignature, Kind::PermissionDenied),
            (SimVerifyError::ChipIdMismatch, Kind::PermissionDenied),
            (
                SimVerifyError::Report(ReportCheckError::DebugEnabled),
                Kind::PermissionDenied,
            ),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }
}
