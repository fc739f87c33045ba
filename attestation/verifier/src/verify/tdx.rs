//! TDX verification: the quote's ECDSA signature, QE report and PCK chain through `dcap-qvl`
//! with collateral read from a file (no network), then the TD report fields veil relies on:
//! `REPORTDATA` bound to the session, debug attribute off. `MRTD`, RTMRs and `MRCONFIGID` are
//! compared with reference values by the broker's policy.

use std::path::Path;

use dcap_qvl::QuoteCollateralV3;
use subtle::ConstantTimeEq;
use thiserror::Error;

use veil_attestation::evidence::TdxEvidence;
use veil_common::{Classify, Kind};

/// TCB statuses accepted from `dcap-qvl` unless configured otherwise.
pub const DEFAULT_ACCEPTED_STATUSES: &[&str] = &["UpToDate"];

/// Why a TDX quote was not accepted.
#[derive(Debug, Error)]
pub enum TdxVerifyError {
    /// The broker has no TDX collateral configured.
    #[error("no TDX collateral is configured on this broker")]
    NoCollateral,
    /// The collateral file could not be read.
    #[error("TDX collateral file {path} could not be read")]
    CollateralRead {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The collateral is not `dcap-qvl` collateral JSON.
    #[error("TDX collateral is not dcap-qvl QuoteCollateralV3 JSON")]
    CollateralParse(#[source] serde_json::Error),
    /// `dcap-qvl` rejected the quote (signature, QE report, PCK chain or collateral).
    #[error("TDX quote signature or collateral check failed")]
    Signature(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The platform TCB status is not one the broker accepts.
    #[error("TDX TCB status {0} is not accepted")]
    TcbStatus(String),
    /// The TD is debuggable.
    #[error("TD attributes have the debug bit set")]
    DebugEnabled,
    /// `REPORTDATA` is not bound to this session.
    #[error("TDX REPORTDATA is not bound to this session's nonce and key")]
    ReportDataMismatch,
}

impl Classify for TdxVerifyError {
    fn kind(&self) -> Kind {
        match self {
            TdxVerifyError::NoCollateral => Kind::FailedPrecondition,
            TdxVerifyError::CollateralRead { .. } => Kind::Internal,
            TdxVerifyError::CollateralParse(_) => Kind::InvalidArgument,
            TdxVerifyError::Signature(_)
            | TdxVerifyError::TcbStatus(_)
            | TdxVerifyError::DebugEnabled
            | TdxVerifyError::ReportDataMismatch => Kind::PermissionDenied,
        }
    }
}

/// What the broker needs to verify TDX quotes offline.
#[derive(Debug, Clone, Default)]
pub struct TdxTrust {
    /// Collateral (PCK CRL, TCB info, QE identity and their chains), as `dcap-qvl` JSON.
    pub collateral: Option<QuoteCollateralV3>,
    /// Accepted TCB statuses; [`DEFAULT_ACCEPTED_STATUSES`] when empty.
    pub accepted_statuses: Vec<String>,
}

impl TdxTrust {
    /// Loads `dcap-qvl` collateral JSON from a file.
    pub fn load_collateral(path: &Path) -> Result<QuoteCollateralV3, TdxVerifyError> {
        let bytes = std::fs::read(path).map_err(|source| TdxVerifyError::CollateralRead {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(TdxVerifyError::CollateralParse)
    }
}

/// Outcome of a TDX verification.
#[derive(Debug, Clone)]
pub struct TdxVerified {
    /// The TCB status `dcap-qvl` reported.
    pub tcb_status: String,
}

/// Verifies a TDX quote at time `now_secs` (Unix seconds).
pub fn verify_tdx(
    evidence: &TdxEvidence,
    expected_report_data: &[u8; 64],
    trust: &TdxTrust,
    now_secs: u64,
) -> Result<TdxVerified, TdxVerifyError> {
    let collateral = trust
        .collateral
        .as_ref()
        .ok_or(TdxVerifyError::NoCollateral)?;
    let verified = dcap_qvl::verify::verify(&evidence.raw, collateral, now_secs)
        .map_err(|e| TdxVerifyError::Signature(e.into()))?;
    let accepted: Vec<&str> = if trust.accepted_statuses.is_empty() {
        DEFAULT_ACCEPTED_STATUSES.to_vec()
    } else {
        trust.accepted_statuses.iter().map(String::as_str).collect()
    };
    if !accepted.contains(&verified.status.as_str()) {
        return Err(TdxVerifyError::TcbStatus(verified.status));
    }
    check_td_fields(evidence, expected_report_data)?;
    Ok(TdxVerified {
        tcb_status: verified.status,
    })
}

/// The TD-report checks that do not need the signature: debug off and `REPORTDATA` binding.
pub fn check_td_fields(
    evidence: &TdxEvidence,
    expected_report_data: &[u8; 64],
) -> Result<(), TdxVerifyError> {
    let td = &evidence.quote.report;
    if td.debug() {
        return Err(TdxVerifyError::DebugEnabled);
    }
    if !bool::from(td.report_data.ct_eq(expected_report_data)) {
        return Err(TdxVerifyError::ReportDataMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds() {
        let json = serde_json::from_slice::<QuoteCollateralV3>(b"{").unwrap_err();
        for (e, k) in [
            (TdxVerifyError::NoCollateral, Kind::FailedPrecondition),
            (
                TdxVerifyError::CollateralRead {
                    path: "x".into(),
                    source: std::io::Error::other("x"),
                },
                Kind::Internal,
            ),
            (TdxVerifyError::CollateralParse(json), Kind::InvalidArgument),
            (
                TdxVerifyError::Signature("bad".into()),
                Kind::PermissionDenied,
            ),
            (
                TdxVerifyError::TcbStatus("OutOfDate".into()),
                Kind::PermissionDenied,
            ),
            (TdxVerifyError::DebugEnabled, Kind::PermissionDenied),
            (TdxVerifyError::ReportDataMismatch, Kind::PermissionDenied),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }
}
