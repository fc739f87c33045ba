//! The simulated TEE's firmware: answers the guest's report requests (vsock
//! host port 1027, [`veil_protocol::simfw`]) with SEV-SNP-layout reports
//! signed by the simulated chip key.
//!
//! The launch measurement is computed here, once per pod, from what the shim
//! launched — kernel, initrd, command line, vCPU count, firmware — with
//! `veil_verifier::sim_measurement`, the function `veil measure --mode sim`
//! uses for reference values. It is computed before QEMU starts (the service
//! starts first), from the same files QEMU is given.
//!
//! Only a pod whose handler says `tee = "sim"` gets this service, and it
//! refuses to sign for any other launch: it is never a fallback for a real
//! TEE. The evidence says `veil-sim`, which a broker accepts only where its
//! policy allows simulated evidence. Whoever holds the chip key (the node)
//! can forge reports: the simulated TEE exists for CI, not for secrets.

use std::{path::Path, sync::Arc, time::Duration};

use tokio::net::{UnixListener, UnixStream};
use veil_protocol::simfw;
use veil_verifier::sim_ca::{SimCaError, SimChip};

use crate::{
    config::TeeKind,
    sandbox::launch::{HostService, LaunchInfo},
};

/// How long a guest may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The simulated firmware of one pod.
#[derive(Debug)]
pub struct SimFirmware {
    chip: Result<SimChip, String>,
}

/// Why a report cannot be produced.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// The chip keys were not loaded.
    #[error("simulated firmware has no chip key: {0}")]
    NoKeys(String),
    /// The pod is not a simulated-TEE pod.
    #[error("this pod was launched as tee {0:?}, not as a simulated TEE")]
    NotSimulated(TeeKind),
    /// Reading a launched file failed.
    #[error("cannot measure the launched {what}")]
    Measure {
        /// What file.
        what: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

impl SimFirmware {
    /// Loads the chip key and certificate from a `veil sim-ca init` directory.
    pub fn load(dir: &Path) -> Result<Self, SimCaError> {
        Ok(SimFirmware {
            chip: Ok(SimChip::load(dir)?),
        })
    }

    /// A firmware without keys: it answers every request with why.
    pub fn unavailable(dir: &Path, why: &SimCaError) -> Self {
        SimFirmware {
            chip: Err(format!(
                "{} (run `veil sim-ca init --dir {}`)",
                crate::error_chain(why),
                dir.display()
            )),
        }
    }

    /// A firmware with this chip (tests).
    pub fn with_chip(chip: SimChip) -> Self {
        SimFirmware { chip: Ok(chip) }
    }
}

/// The simulated launch measurement of `launch`, from its files.
pub fn measure(launch: &LaunchInfo) -> Result<[u8; 48], FirmwareError> {
    if launch.tee != TeeKind::Sim {
        return Err(FirmwareError::NotSimulated(launch.tee));
    }
    let read = |what: &'static str, p: &Path| {
        std::fs::read(p).map_err(|source| FirmwareError::Measure { what, source })
    };
    let kernel = read("kernel", &launch.kernel)?;
    let initrd = read("initrd", &launch.initrd)?;
    let firmware = match &launch.firmware {
        Some(f) => Some(read("firmware", f)?),
        None => None,
    };
    Ok(veil_verifier::sim_measurement(
        &kernel,
        &initrd,
        &launch.cmdline,
        launch.vcpus,
        firmware.as_deref(),
    ))
}

/// Signs the evidence for one request: the `tee-evidence` JSON bytes.
fn answer(
    chip: &Result<SimChip, String>,
    measurement: &Result<[u8; 48], String>,
    host_data: Option<&[u8; 32]>,
    report_data: &[u8; 64],
) -> Result<Vec<u8>, String> {
    let chip = chip.as_ref().map_err(|e| e.clone())?;
    let m = measurement.as_ref().map_err(|e| e.clone())?;
    let ev = chip.evidence(report_data, m, host_data);
    serde_json::to_vec(&ev).map_err(|e| e.to_string())
}

/// The launch measurement, once computed (`None` until then).
type Measured = Option<Arc<Result<[u8; 48], String>>>;

async fn handle(
    mut conn: UnixStream,
    chip: Arc<Result<SimChip, String>>,
    mut measurement: tokio::sync::watch::Receiver<Measured>,
    host_data: Option<[u8; 32]>,
) {
    let rd = match tokio::time::timeout(REQUEST_TIMEOUT, simfw::read_request(&mut conn)).await {
        Ok(Ok(rd)) => rd,
        Ok(Err(e)) => {
            tracing::debug!(error = %crate::error_chain(&e), "bad simulated firmware request");
            let _ = simfw::write_response(&mut conn, Err("malformed request")).await;
            return;
        }
        Err(_) => return,
    };
    // `None` only if the measuring task ended without a result.
    let measurement = measurement
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|m| m.clone())
        .unwrap_or_else(|| Arc::new(Err("the launch measurement was never computed".into())));
    let result = answer(&chip, &measurement, host_data.as_ref(), &rd);
    match &result {
        Ok(_) => tracing::debug!(
            measurement = %measurement.as_ref().as_ref().map(hex::encode).unwrap_or_default(),
            "signed a simulated report"
        ),
        Err(e) => tracing::warn!(error = %e, "simulated firmware refused a report"),
    }
    let r = simfw::write_response(&mut conn, result.as_deref().map_err(|e| e.as_str())).await;
    if let Err(e) = r {
        tracing::debug!(error = %crate::error_chain(&e), "simulated firmware answer not delivered");
    }
}

impl HostService for SimFirmware {
    fn port(&self) -> u32 {
        veil_protocol::SIM_FIRMWARE_VSOCK_PORT
    }

    fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        launch: LaunchInfo,
    ) -> tokio::task::JoinHandle<()> {
        let chip = Arc::new(self.chip.clone());
        // The init-data digest, bound into every report as HOST_DATA.
        let host_data: Option<[u8; 32]> =
            launch.host_data.as_deref().and_then(|h| h.try_into().ok());
        // Measured from the files the VMM is given, on a blocking thread
        // beside the boot (hashing the kernel and initrd would hold the
        // shim's one runtime thread): the guest asks for its first report
        // only once its agent runs, and a request waits for the result.
        let (measured, measurement) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let r = match tokio::task::spawn_blocking(move || measure(&launch)).await {
                Ok(r) => r.map_err(|e| crate::error_chain(&e)),
                Err(e) => Err(format!("measuring the launched files did not finish: {e}")),
            };
            match &r {
                Ok(m) => tracing::info!(
                    measurement = %hex::encode(m),
                    "simulated TEE launch measurement"
                ),
                Err(e) => tracing::warn!(error = %e, "no simulated launch measurement"),
            }
            let _ = measured.send(Some(Arc::new(r)));
        });
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        tokio::spawn(handle(conn, chip.clone(), measurement.clone(), host_data));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "simulated firmware accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_attestation::evidence::{sim::SimEvidence, snp::SnpReport};

    fn launch(dir: &Path, tee: TeeKind) -> LaunchInfo {
        std::fs::write(dir.join("k"), b"kernel").unwrap();
        std::fs::write(dir.join("i"), b"initrd").unwrap();
        LaunchInfo {
            tee,
            kernel: dir.join("k"),
            initrd: dir.join("i"),
            firmware: None,
            cmdline: "console=ttyS0 veil.tee=sim".into(),
            vcpus: 2,
            host_data: None,
        }
    }

    async fn ask(path: &Path, rd: &[u8; 64]) -> Result<Vec<u8>, simfw::SimFwError> {
        let mut c = UnixStream::connect(path).await.unwrap();
        simfw::request(&mut c, rd).await
    }

    #[tokio::test]
    async fn signs_reports_over_the_launch_measurement_and_report_data() {
        let dir = tempfile::tempdir().unwrap();
        veil_verifier::sim_ca::init_sim_ca(&dir.path().join("ca"), false).unwrap();
        let fw = Arc::new(SimFirmware::load(&dir.path().join("ca")).unwrap());
        let sock = dir.path().join("fw.sock");
        let task = fw.serve(
            UnixListener::bind(&sock).unwrap(),
            launch(dir.path(), TeeKind::Sim),
        );
        let rd = [0x5a; 64];
        let body = ask(&sock, &rd).await.unwrap();
        let ev = SimEvidence::from_json(&body).unwrap();
        let report: SnpReport = ev.report().unwrap();
        assert_eq!(report.report_data(), rd);
        assert_eq!(
            report.measurement(),
            veil_verifier::sim_measurement(
                b"kernel",
                b"initrd",
                "console=ttyS0 veil.tee=sim",
                2,
                None
            )
        );
        // Garbage gets an error answer, not a report.
        let mut c = UnixStream::connect(&sock).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut c, &[0u8; simfw::REQUEST_LEN])
            .await
            .unwrap();
        assert!(matches!(
            simfw::read_response(&mut c).await,
            Err(simfw::SimFwError::Refused(_))
        ));
        task.abort();
    }

    #[tokio::test]
    async fn never_signs_for_a_pod_that_is_not_simulated_nor_without_keys() {
        let dir = tempfile::tempdir().unwrap();
        veil_verifier::sim_ca::init_sim_ca(&dir.path().join("ca"), false).unwrap();
        let fw = Arc::new(SimFirmware::load(&dir.path().join("ca")).unwrap());
        let sock = dir.path().join("fw.sock");
        let task = fw.serve(
            UnixListener::bind(&sock).unwrap(),
            launch(dir.path(), TeeKind::Snp),
        );
        match ask(&sock, &[0; 64]).await {
            Err(simfw::SimFwError::Refused(m)) => {
                assert!(m.contains("not as a simulated TEE"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        task.abort();

        let missing = dir.path().join("none");
        let err = SimChip::load(&missing).unwrap_err();
        let fw = Arc::new(SimFirmware::unavailable(&missing, &err));
        let sock = dir.path().join("fw2.sock");
        let task = fw.serve(
            UnixListener::bind(&sock).unwrap(),
            launch(dir.path(), TeeKind::Sim),
        );
        match ask(&sock, &[0; 64]).await {
            Err(simfw::SimFwError::Refused(m)) => assert!(m.contains("veil sim-ca init"), "{m}"),
            other => panic!("{other:?}"),
        }
        task.abort();
    }
}
