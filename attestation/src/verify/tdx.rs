//! TDX verification: the quote's ECDSA signature, QE report and PCK chain through `dcap-qvl`
//! with collateral read from a file (no network), then the TD report fields veil relies on:
//! `REPORTDATA` bound to the session, debug attribute off. `MRTD`, RTMRs and `MRCONFIGID` are
//! compared with reference values by [`crate::kbs::policy`].

use std::path::Path;

use dcap_qvl::QuoteCollateralV3;
use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::evidence::TdxEvidence;

/// TCB statuses accepted from `dcap-qvl` unless configured otherwise.
pub const DEFAULT_ACCEPTED_STATUSES: &[&str] = &["UpToDate"];

/// Why a TDX quote was not accepted.
#[derive(Debug, Error)]
pub enum TdxVerifyError {
    /// The broker has no TDX collateral configured.
    #[error("no TDX collateral is configured on this broker")]
    NoCollateral,
    /// The collateral file could not be read or parsed.
    #[error("TDX collateral file could not be loaded: {0}")]
    Collateral(String),
    /// `dcap-qvl` rejected the quote (signature, QE report, PCK chain or collateral).
    #[error("TDX quote signature or collateral check failed: {0}")]
    Signature(String),
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
        let bytes = std::fs::read(path)
            .map_err(|e| TdxVerifyError::Collateral(format!("{}: {e}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|e| TdxVerifyError::Collateral(e.to_string()))
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
        .map_err(|e| TdxVerifyError::Signature(format!("{e:#}")))?;
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
