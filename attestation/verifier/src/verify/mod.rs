//! Verification: from parsed [`Evidence`] and the session's expected `report_data` to [`Claims`].
//!
//! Each TEE's cryptographic and structural checks live in its own file; every check has its own
//! error variant naming what failed. Whether the resulting claims unlock a given resource
//! (reference measurements, minimum TCB, simulated allowed, host data) is decided by
//! the broker's policy (`veil_kbs::policy`), not here.

pub mod amd;
pub mod sim;
pub mod snp;
pub mod tdx;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use veil_attestation::evidence::snp::TcbVersion;
use veil_attestation::evidence::Evidence;
use veil_attestation::Tee;
use veil_common::{Classify, Kind};

/// Why evidence did not verify.
#[derive(Debug, Error)]
pub enum VerifyError {
    /// SEV-SNP verification failed.
    #[error("SEV-SNP verification failed")]
    Snp(#[source] snp::SnpVerifyError),
    /// TDX verification failed.
    #[error("TDX verification failed")]
    Tdx(#[source] tdx::TdxVerifyError),
    /// Simulated-TEE verification failed.
    #[error("simulated-TEE verification failed")]
    Sim(#[source] sim::SimVerifyError),
}

impl Classify for VerifyError {
    fn kind(&self) -> Kind {
        match self {
            VerifyError::Snp(e) => e.kind(),
            VerifyError::Tdx(e) => e.kind(),
            VerifyError::Sim(e) => e.kind(),
        }
    }
}

/// The trust anchors and offline material a verifier uses.
#[derive(Debug, Clone, Default)]
pub struct TrustAnchors {
    /// SEV-SNP: offline endorsement-key store, roots (AMD's pinned by default), CRLs.
    pub snp: snp::SnpTrust,
    /// TDX: collateral and accepted TCB statuses.
    pub tdx: tdx::TdxTrust,
    /// Simulated TEE: the simulated root public key, if this broker accepts simulated evidence
    /// at all (policy must still allow it per resource).
    pub sim_root: Option<p384::ecdsa::VerifyingKey>,
}

/// What verified evidence establishes about the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The TEE kind.
    pub tee: Tee,
    /// Launch measurement (SNP / simulated: MEASUREMENT, 48 bytes; TDX: MRTD), hex.
    pub measurement: String,
    /// SNP / simulated: REPORTED_TCB.
    pub tcb: Option<TcbVersion>,
    /// SNP / simulated: HOST_DATA (32 bytes); TDX: MRCONFIGID (48 bytes), hex.
    pub host_data: String,
    /// TDX: RTMR0..3, hex.
    pub rtmrs: Vec<String>,
    /// SNP: the processor generation whose root signed the endorsement key; TDX: the TCB
    /// status.
    pub platform: Option<String>,
    /// SNP / simulated: the VMPL that requested the report (policy decides which it accepts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmpl: Option<u32>,
    /// SNP: which key signed the report, `VCEK` or `VLEK`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
}

/// Verifies `evidence` against the session's `expected_report_data` at `now_secs`.
pub fn verify_evidence(
    evidence: &Evidence,
    expected_report_data: &[u8; 64],
    anchors: &TrustAnchors,
    now_secs: u64,
) -> Result<Claims, VerifyError> {
    match evidence {
        Evidence::Snp(e) => {
            let v = snp::verify_snp(e, expected_report_data, &anchors.snp, now_secs)
                .map_err(VerifyError::Snp)?;
            Ok(Claims {
                tee: Tee::Snp,
                measurement: hex::encode(e.report.measurement()),
                tcb: Some(v.tcb),
                host_data: hex::encode(evidence.host_data()),
                rtmrs: Vec::new(),
                platform: Some(v.generation.name().to_string()),
                vmpl: Some(e.report.vmpl()),
                signing_key: Some(v.signing_key.name().to_string()),
            })
        }
        Evidence::Tdx(e) => {
            let v = tdx::verify_tdx(e, expected_report_data, &anchors.tdx, now_secs)
                .map_err(VerifyError::Tdx)?;
            let td = &e.quote.report;
            Ok(Claims {
                tee: Tee::Tdx,
                measurement: hex::encode(td.mr_td),
                tcb: None,
                host_data: hex::encode(evidence.host_data()),
                rtmrs: td.rtmr.iter().map(hex::encode).collect(),
                platform: Some(v.tcb_status),
                vmpl: None,
                signing_key: None,
            })
        }
        Evidence::Sim { report, chip_cert } => {
            let root = anchors
                .sim_root
                .as_ref()
                .ok_or(VerifyError::Sim(sim::SimVerifyError::NoSimRoot))?;
            sim::verify_sim(report, chip_cert, root, expected_report_data)
                .map_err(VerifyError::Sim)?;
            Ok(Claims {
                tee: Tee::VeilSim,
                measurement: hex::encode(report.measurement()),
                tcb: Some(TcbVersion::from_u64(report.reported_tcb_raw(), None)),
                host_data: hex::encode(evidence.host_data()),
                rtmrs: Vec::new(),
                platform: Some("simulated".to_string()),
                vmpl: Some(report.vmpl()),
                signing_key: None,
            })
        }
    }
}
