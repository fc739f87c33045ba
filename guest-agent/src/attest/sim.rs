//! The simulated TEE's attester: asks the shim's simulated firmware (host
//! vsock port [`veil_protocol::SIM_FIRMWARE_VSOCK_PORT`], framing in
//! [`veil_protocol::simfw`]) for a report over the report data.
//!
//! The answer comes from the host and proves nothing by itself: the broker
//! verifies it under the simulated root, and releases only where its policy
//! allows simulated evidence. The guest checks the shape and that the report
//! binds its own report data, so a confused host fails here, early.

use std::{future::Future, pin::Pin, sync::Arc};

use veil_attestation::{
    client::{Attester, AttesterError},
    evidence::sim::SimEvidence,
    Tee,
};

use veil_protocol::vsock::dial_host;

/// Opens a connection to the simulated firmware.
pub type Dial = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = std::io::Result<Box<dyn FirmwareConn>>> + Send>>
        + Send
        + Sync,
>;

/// A byte stream to the firmware.
pub trait FirmwareConn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> FirmwareConn for T {}

/// Why no simulated evidence was produced.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The firmware cannot be reached.
    #[error("simulated firmware (host vsock port {port}) not reachable; is this a veil-sim pod with hybrid vsock?")]
    Connect {
        /// Port dialled.
        port: u32,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed or the firmware refused.
    #[error("simulated firmware")]
    Exchange(#[from] veil_protocol::simfw::SimFwError),
    /// The answer is not simulated evidence.
    #[error("simulated firmware answered malformed evidence: {0}")]
    Malformed(String),
    /// The report binds other data than what was asked.
    #[error("simulated report does not carry the requested report_data")]
    ReportData,
}

/// Produces simulated evidence through the shim.
#[derive(Clone)]
pub struct SimAttester {
    dial: Dial,
    port: u32,
}

impl SimAttester {
    /// The firmware on host vsock port 1027.
    pub fn vsock() -> Self {
        let port = veil_protocol::SIM_FIRMWARE_VSOCK_PORT;
        SimAttester {
            dial: Arc::new(move || {
                Box::pin(async move {
                    dial_host(port)
                        .await
                        .map(|s| Box::new(s) as Box<dyn FirmwareConn>)
                })
            }),
            port,
        }
    }

    /// A firmware reached through `dial` (tests).
    pub fn with_dial(dial: Dial) -> Self {
        SimAttester { dial, port: 0 }
    }

    /// Simulated evidence JSON over `report_data`.
    pub async fn get(&self, report_data: &[u8; 64]) -> Result<serde_json::Value, SimError> {
        let mut conn = (self.dial)().await.map_err(|source| SimError::Connect {
            port: self.port,
            source,
        })?;
        let body = veil_protocol::simfw::request(&mut conn, report_data).await?;
        let ev = SimEvidence::from_json(&body).map_err(|e| SimError::Malformed(e.to_string()))?;
        let report = ev
            .report()
            .map_err(|e| SimError::Malformed(e.to_string()))?;
        if report.report_data() != *report_data {
            return Err(SimError::ReportData);
        }
        serde_json::from_slice(&body).map_err(|e| SimError::Malformed(e.to_string()))
    }
}

impl Attester for SimAttester {
    fn tee(&self) -> Tee {
        Tee::VeilSim
    }

    fn evidence<'a>(
        &'a self,
        report_data: [u8; 64],
    ) -> Pin<Box<dyn Future<Output = Result<serde_json::Value, AttesterError>> + Send + 'a>> {
        Box::pin(async move { Ok(self.get(&report_data).await?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_verifier::sim_ca::SimChip;

    /// A firmware on an in-memory pipe answering with `answer(report_data)`.
    fn firmware(
        answer: impl Fn([u8; 64]) -> Result<Vec<u8>, String> + Send + Sync + 'static,
    ) -> SimAttester {
        let answer = Arc::new(answer);
        SimAttester::with_dial(Arc::new(move || {
            let answer = answer.clone();
            Box::pin(async move {
                let (a, mut b) = tokio::io::duplex(16 * 1024);
                tokio::spawn(async move {
                    let rd = veil_protocol::simfw::read_request(&mut b).await.unwrap();
                    let r = answer(rd);
                    veil_protocol::simfw::write_response(
                        &mut b,
                        r.as_deref().map_err(|e| e.as_str()),
                    )
                    .await
                    .unwrap();
                });
                Ok(Box::new(a) as Box<dyn FirmwareConn>)
            })
        }))
    }

    fn chip() -> SimChip {
        let dir = tempfile::tempdir().unwrap();
        veil_verifier::sim_ca::init_sim_ca(dir.path(), false).unwrap();
        SimChip::load(dir.path()).unwrap()
    }

    #[tokio::test]
    async fn gets_simulated_evidence_bound_to_its_report_data() {
        let c = chip();
        let a =
            firmware(move |rd| Ok(serde_json::to_vec(&c.evidence(&rd, &[1; 48], None)).unwrap()));
        assert_eq!(a.tee(), Tee::VeilSim);
        let ev = a.evidence([8; 64]).await.unwrap();
        let parsed = SimEvidence::from_json(&serde_json::to_vec(&ev).unwrap()).unwrap();
        assert_eq!(parsed.report().unwrap().report_data(), [8; 64]);
        assert_eq!(parsed.report().unwrap().measurement(), [1; 48]);
    }

    #[tokio::test]
    async fn refusals_garbage_and_unbound_reports_are_errors() {
        let e = crate::error_chain(
            &*firmware(|_| Err("no chip key".into()))
                .evidence([0; 64])
                .await
                .unwrap_err(),
        );
        assert!(e.contains("no chip key"), "{e}");
        let e = crate::error_chain(
            &*firmware(|_| Ok(b"{}".to_vec()))
                .evidence([0; 64])
                .await
                .unwrap_err(),
        );
        assert!(e.contains("malformed"), "{e}");
        let c = chip();
        let e = crate::error_chain(
            &*firmware(move |_| {
                Ok(serde_json::to_vec(&c.evidence(&[7; 64], &[1; 48], None)).unwrap())
            })
            .evidence([0; 64])
            .await
            .unwrap_err(),
        );
        assert!(
            e.contains("does not carry the requested report_data"),
            "{e}"
        );
    }
}
