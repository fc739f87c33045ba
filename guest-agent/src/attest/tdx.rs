//! The Intel TDX attester: a TD quote through configfs-tsm (the kernel asks
//! the host's quoting service; `outblob` is the signed quote).
//!
//! The `/dev/tdx_guest` ioctl only returns a TD report (the quote still needs
//! the host's QGS), and the `tdx-guest` crate runs TDCALL in ring 0: neither
//! fits a userspace agent, so configfs-tsm is the one path. Unit-tested
//! against a fake configfs; this machine has no TDX, so the real call has not
//! run on hardware here.

use std::{path::Path, sync::Arc};

use veil_attestation::{
    client::{Attester, AttesterError},
    evidence::{tdx::TdxQuote, tdx_evidence_json},
    Tee,
};

use super::tsm::{self, TsmError, TsmFs};

/// configfs-tsm provider name of TDX.
pub const TSM_PROVIDER: &str = "tdx_guest";

/// Why no TDX quote was produced.
#[derive(Debug, thiserror::Error)]
pub enum TdxError {
    /// configfs-tsm failed.
    #[error("TDX quote through configfs-tsm")]
    Tsm(#[from] TsmError),
    /// The quote does not parse.
    #[error("TDX quote is malformed: {0}")]
    Malformed(String),
    /// The quote binds other data than what was asked.
    #[error("TDX quote does not carry the requested report_data")]
    ReportData,
    /// configfs-tsm is not there.
    #[error("no TDX guest interface (configfs-tsm at {0})")]
    Unavailable(String),
}

/// Produces TDX evidence (a quote).
#[derive(Clone)]
pub struct TdxAttester {
    fs: Arc<dyn TsmFs>,
}

impl TdxAttester {
    /// An attester over a configfs-tsm.
    pub fn new(fs: Arc<dyn TsmFs>) -> Self {
        TdxAttester { fs }
    }

    /// The guest's configfs-tsm under `tsm_root`.
    pub fn system(tsm_root: &Path) -> Result<Self, TdxError> {
        if !tsm::ConfigFsTsm::available(tsm_root) {
            return Err(TdxError::Unavailable(tsm_root.display().to_string()));
        }
        Ok(Self::new(Arc::new(tsm::ConfigFsTsm::new(tsm_root))))
    }

    /// A quote over `report_data`. Blocking.
    pub fn quote(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, TdxError> {
        let r = tsm::request(self.fs.as_ref(), TSM_PROVIDER, report_data, false)?;
        let q = TdxQuote::parse(&r.outblob).map_err(|e| TdxError::Malformed(e.to_string()))?;
        if q.report.report_data != *report_data {
            return Err(TdxError::ReportData);
        }
        Ok(r.outblob)
    }
}

impl Attester for TdxAttester {
    fn tee(&self) -> Tee {
        Tee::Tdx
    }

    fn evidence<'a>(
        &'a self,
        report_data: [u8; 64],
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<serde_json::Value, AttesterError>> + Send + 'a>,
    > {
        let this = self.clone();
        Box::pin(async move {
            let quote = tokio::task::spawn_blocking(move || this.quote(&report_data)).await??;
            // No CC event log: the broker matches RTMRs by policy, not by replaying a log.
            Ok(tdx_evidence_json(&quote, None))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::tsm::fake::FakeTsm;

    /// A structurally valid v4 quote carrying `rd` (zero signature: the broker
    /// verifies signatures, the guest only the shape and the binding).
    fn fake_quote(rd: &[u8]) -> Vec<u8> {
        const HEADER: usize = 48;
        let mut q = vec![0u8; HEADER + 584];
        q[0..2].copy_from_slice(&4u16.to_le_bytes());
        q[2..4].copy_from_slice(&2u16.to_le_bytes());
        q[4..8].copy_from_slice(&0x81u32.to_le_bytes());
        q[HEADER + 520..HEADER + 520 + rd.len()].copy_from_slice(rd);
        let sig_len = 64 + 64 + 384 + 64 + 2 + 6;
        q.extend_from_slice(&(sig_len as u32).to_le_bytes());
        q.extend_from_slice(&vec![0u8; sig_len]);
        q
    }

    #[tokio::test]
    async fn configfs_tsm_quote_becomes_evidence() {
        let fs = Arc::new(FakeTsm::new(
            TSM_PROVIDER,
            Box::new(|rd: &[u8]| fake_quote(rd)),
        ));
        let a = TdxAttester::new(fs.clone());
        assert_eq!(a.tee(), Tee::Tdx);
        let ev = a.evidence([4; 64]).await.unwrap();
        assert_eq!(ev, tdx_evidence_json(&fake_quote(&[4; 64]), None));
        assert!(ev["quote"].is_string());
        assert_eq!(fs.live(), 0);
    }

    #[test]
    fn garbage_unbound_or_foreign_quotes_are_refused() {
        let garbage = TdxAttester::new(Arc::new(FakeTsm::new(
            TSM_PROVIDER,
            Box::new(|_: &[u8]| b"not a quote".to_vec()),
        )));
        assert!(matches!(
            garbage.quote(&[0; 64]),
            Err(TdxError::Malformed(_))
        ));
        let unbound = TdxAttester::new(Arc::new(FakeTsm::new(
            TSM_PROVIDER,
            Box::new(|_: &[u8]| fake_quote(&[1; 64])),
        )));
        assert!(matches!(unbound.quote(&[2; 64]), Err(TdxError::ReportData)));
        let snp = TdxAttester::new(Arc::new(FakeTsm::new(
            "sev_guest",
            Box::new(|rd: &[u8]| fake_quote(rd)),
        )));
        assert!(matches!(
            snp.quote(&[0; 64]),
            Err(TdxError::Tsm(TsmError::Provider { .. }))
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            TdxAttester::system(&dir.path().join("none")),
            Err(TdxError::Unavailable(_))
        ));
    }
}
