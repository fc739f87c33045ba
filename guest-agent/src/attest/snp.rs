//! The AMD SEV-SNP attester: the guest's report from the AMD secure processor,
//! through configfs-tsm (preferred: it also gives the host's certificate
//! table) or the `/dev/sev-guest` `SNP_GET_REPORT` ioctl.
//!
//! Both paths are behind seams ([`super::tsm::TsmFs`], [`SevGuest`]) and are
//! unit-tested against fakes; this machine has no SEV-SNP, so the real
//! configfs and ioctl calls have not run on hardware here.

use std::{path::Path, sync::Arc};

use veil_attestation::{
    client::{Attester, AttesterError},
    evidence::{snp::SnpReport, snp::REPORT_LEN, snp_evidence_json},
    Tee,
};

use super::tsm::{self, TsmError, TsmFs};

/// configfs-tsm provider name of SEV-SNP.
pub const TSM_PROVIDER: &str = "sev_guest";
/// The SEV guest device.
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";
/// Size of the `snp_report_resp` buffer the ioctl fills.
pub const REPORT_RESP_LEN: usize = 4000;
/// Offset of the report in the `MSG_REPORT_RSP` payload.
const RESP_REPORT_OFFSET: usize = 0x20;

/// Why no SNP report was produced.
#[derive(Debug, thiserror::Error)]
pub enum SnpError {
    /// configfs-tsm failed.
    #[error("SNP report through configfs-tsm")]
    Tsm(#[from] TsmError),
    /// The ioctl failed.
    #[error("SNP_GET_REPORT on {SEV_GUEST_DEVICE} failed (firmware error {fw_error:#x}, VMM error {vmm_error:#x})")]
    Ioctl {
        /// `fw_error` half of `exitinfo2`.
        fw_error: u32,
        /// `vmm_error` half of `exitinfo2`.
        vmm_error: u32,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The device cannot be opened.
    #[error("cannot open {SEV_GUEST_DEVICE}")]
    Open(#[source] std::io::Error),
    /// The firmware's response carries a non-zero status.
    #[error("SNP firmware answered MSG_REPORT_RSP status {0:#x}")]
    Status(u32),
    /// The response's report size is not a report's.
    #[error("SNP firmware answered a report of {0} bytes")]
    ReportSize(u32),
    /// The report does not parse.
    #[error("SNP report is malformed: {0}")]
    Malformed(String),
    /// The report binds other data than what was asked.
    #[error("SNP report does not carry the requested report_data")]
    ReportData,
    /// Neither configfs-tsm nor `/dev/sev-guest` exists.
    #[error("no SEV-SNP guest interface ({0} nor {SEV_GUEST_DEVICE})")]
    Unavailable(String),
}

/// The `/dev/sev-guest` report call, behind a seam for tests.
pub trait SevGuest: Send + Sync {
    /// `SNP_GET_REPORT` for `user_data` at `vmpl`: the raw 4000-byte
    /// `snp_report_resp` buffer.
    fn get_report(&self, user_data: &[u8; 64], vmpl: u32) -> Result<Vec<u8>, SnpError>;
}

/// The real `/dev/sev-guest`.
#[derive(Debug)]
pub struct SevGuestDevice {
    file: std::fs::File,
}

mod ioctl {
    /// `struct snp_guest_request_ioctl` (include/uapi/linux/sev-guest.h).
    #[repr(C)]
    pub struct SnpGuestRequestIoctl {
        pub msg_version: u8,
        pub req_data: u64,
        pub resp_data: u64,
        pub exitinfo2: u64,
    }

    /// `struct snp_report_req`.
    #[repr(C)]
    pub struct SnpReportReq {
        pub user_data: [u8; 64],
        pub vmpl: u32,
        pub rsvd: [u8; 28],
    }

    // SNP_GET_REPORT = _IOWR('S', 0x0, struct snp_guest_request_ioctl)
    nix::ioctl_readwrite!(snp_get_report, b'S', 0x0, SnpGuestRequestIoctl);
}

impl SevGuestDevice {
    /// Opens `path` (normally [`SEV_GUEST_DEVICE`]).
    pub fn open(path: &Path) -> Result<Self, SnpError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(SnpError::Open)?;
        Ok(SevGuestDevice { file })
    }
}

impl SevGuest for SevGuestDevice {
    fn get_report(&self, user_data: &[u8; 64], vmpl: u32) -> Result<Vec<u8>, SnpError> {
        use std::os::fd::AsRawFd;
        let req = ioctl::SnpReportReq {
            user_data: *user_data,
            vmpl,
            rsvd: [0; 28],
        };
        let mut resp = vec![0u8; REPORT_RESP_LEN];
        let mut arg = ioctl::SnpGuestRequestIoctl {
            msg_version: 1,
            req_data: &req as *const _ as u64,
            resp_data: resp.as_mut_ptr() as u64,
            exitinfo2: 0,
        };
        // SAFETY: `self.file` is an open /dev/sev-guest; `arg` points to a
        // correctly laid out `snp_guest_request_ioctl` whose `req_data` and
        // `resp_data` point to a live `snp_report_req` and a live buffer of
        // the 4000 bytes `snp_report_resp` has, both outliving the call.
        let r = unsafe { ioctl::snp_get_report(self.file.as_raw_fd(), &mut arg) };
        match r {
            Ok(_) => Ok(resp),
            Err(e) => Err(SnpError::Ioctl {
                fw_error: arg.exitinfo2 as u32,
                vmm_error: (arg.exitinfo2 >> 32) as u32,
                source: e.into(),
            }),
        }
    }
}

/// The report in an `snp_report_resp` buffer (`MSG_REPORT_RSP`: status,
/// report size, 24 reserved bytes, the report).
pub fn report_from_response(resp: &[u8]) -> Result<Vec<u8>, SnpError> {
    let word = |off: usize| -> Result<u32, SnpError> {
        resp.get(off..off + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or(SnpError::Malformed(format!(
                "response of {} bytes",
                resp.len()
            )))
    };
    let status = word(0)?;
    if status != 0 {
        return Err(SnpError::Status(status));
    }
    let size = word(4)?;
    if size as usize != REPORT_LEN {
        return Err(SnpError::ReportSize(size));
    }
    resp.get(RESP_REPORT_OFFSET..RESP_REPORT_OFFSET + REPORT_LEN)
        .map(<[u8]>::to_vec)
        .ok_or(SnpError::ReportSize(size))
}

/// Where the attester gets reports from.
#[derive(Clone)]
pub enum SnpSource {
    /// configfs-tsm (report and certificate table).
    Tsm(Arc<dyn TsmFs>),
    /// `/dev/sev-guest` (report only: the broker then needs the VCEK offline).
    Device(Arc<dyn SevGuest>),
}

/// Produces SEV-SNP evidence at VMPL 0.
#[derive(Clone)]
pub struct SnpAttester {
    source: SnpSource,
}

impl SnpAttester {
    /// An attester over `source`.
    pub fn new(source: SnpSource) -> Self {
        SnpAttester { source }
    }

    /// The guest's interface: configfs-tsm under `tsm_root` if present, else
    /// the device at `device`.
    pub fn system(tsm_root: &Path, device: &Path) -> Result<Self, SnpError> {
        if tsm::ConfigFsTsm::available(tsm_root) {
            return Ok(Self::new(SnpSource::Tsm(Arc::new(tsm::ConfigFsTsm::new(
                tsm_root,
            )))));
        }
        if device.exists() {
            return Ok(Self::new(SnpSource::Device(Arc::new(
                SevGuestDevice::open(device)?,
            ))));
        }
        Err(SnpError::Unavailable(tsm_root.display().to_string()))
    }

    /// The report and certificate table for `report_data`. Blocking.
    pub fn report(&self, report_data: &[u8; 64]) -> Result<(Vec<u8>, Option<Vec<u8>>), SnpError> {
        let (report, certs) = match &self.source {
            SnpSource::Tsm(fs) => {
                let r = tsm::request(fs.as_ref(), TSM_PROVIDER, report_data, true)?;
                (r.outblob, r.auxblob)
            }
            SnpSource::Device(dev) => (
                report_from_response(&dev.get_report(report_data, 0)?)?,
                None,
            ),
        };
        let parsed = SnpReport::parse(&report).map_err(|e| SnpError::Malformed(e.to_string()))?;
        if parsed.report_data() != *report_data {
            return Err(SnpError::ReportData);
        }
        Ok((report, certs))
    }
}

impl Attester for SnpAttester {
    fn tee(&self) -> Tee {
        Tee::Snp
    }

    fn evidence<'a>(
        &'a self,
        report_data: [u8; 64],
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<serde_json::Value, AttesterError>> + Send + 'a>,
    > {
        let this = self.clone();
        Box::pin(async move {
            let (report, certs) =
                tokio::task::spawn_blocking(move || this.report(&report_data)).await??;
            Ok(snp_evidence_json(&report, certs.as_deref())?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::tsm::fake::FakeTsm;

    /// Report field offsets (SEV-SNP ABI, ATTESTATION_REPORT).
    mod layout {
        pub const VERSION: usize = 0x00;
        pub const SIG_ALGO: usize = 0x34;
        pub const REPORT_DATA: usize = 0x50;
        pub const MEASUREMENT: usize = 0x90;
        pub const CHIP_ID: usize = 0x1A0;
    }

    /// A report-shaped buffer carrying `rd` (unsigned: the broker checks
    /// signatures, the guest only the shape and the binding).
    fn fake_report(rd: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; REPORT_LEN];
        r[layout::VERSION..layout::VERSION + 4].copy_from_slice(&2u32.to_le_bytes());
        r[layout::SIG_ALGO..layout::SIG_ALGO + 4].copy_from_slice(&1u32.to_le_bytes());
        r[layout::REPORT_DATA..layout::REPORT_DATA + rd.len()].copy_from_slice(rd);
        r[layout::MEASUREMENT..layout::MEASUREMENT + 48].copy_from_slice(&[0xab; 48]);
        r[layout::CHIP_ID..layout::CHIP_ID + 64].copy_from_slice(&[0xcd; 64]);
        r
    }

    /// A host certificate table holding one VCEK-typed entry.
    fn cert_table() -> Vec<u8> {
        use veil_attestation::evidence::snp::{guid, CertEntry, CertTable};
        CertTable {
            entries: vec![CertEntry {
                guid: guid::VCEK.into(),
                data: b"a VCEK".to_vec(),
            }],
        }
        .encode()
    }

    struct FakeDevice {
        status: u32,
        size: u32,
        tamper: bool,
    }

    impl SevGuest for FakeDevice {
        fn get_report(&self, user_data: &[u8; 64], vmpl: u32) -> Result<Vec<u8>, SnpError> {
            assert_eq!(vmpl, 0, "veil asks for VMPL 0 reports");
            let mut resp = vec![0u8; REPORT_RESP_LEN];
            resp[0..4].copy_from_slice(&self.status.to_le_bytes());
            resp[4..8].copy_from_slice(&self.size.to_le_bytes());
            let mut rd = *user_data;
            if self.tamper {
                rd[0] ^= 1;
            }
            resp[0x20..0x20 + REPORT_LEN].copy_from_slice(&fake_report(&rd));
            Ok(resp)
        }
    }

    fn device(status: u32, size: u32, tamper: bool) -> SnpAttester {
        SnpAttester::new(SnpSource::Device(Arc::new(FakeDevice {
            status,
            size,
            tamper,
        })))
    }

    #[tokio::test]
    async fn configfs_tsm_gives_report_and_certificate_table_as_evidence() {
        let mut fs = FakeTsm::new(TSM_PROVIDER, Box::new(|rd: &[u8]| fake_report(rd)));
        fs.aux = Some(cert_table());
        let fs = Arc::new(fs);
        let a = SnpAttester::new(SnpSource::Tsm(fs.clone()));
        assert_eq!(a.tee(), Tee::Snp);
        let ev = a.evidence([9; 64]).await.unwrap();
        assert_eq!(
            ev,
            snp_evidence_json(&fake_report(&[9; 64]), Some(&cert_table())).unwrap()
        );
        // Trustee's shape: the report in the sev serde form, the table as cert_chain.
        assert_eq!(ev["attestation_report"]["report_data"][0], 9);
        assert_eq!(ev["cert_chain"][0]["cert_type"], "VCEK");
        assert_eq!(fs.live(), 0);
        // A TDX kernel's configfs-tsm is refused by name.
        let tdx = SnpAttester::new(SnpSource::Tsm(Arc::new(FakeTsm::new(
            "tdx_guest",
            Box::new(|rd: &[u8]| fake_report(rd)),
        ))));
        let e = crate::error_chain(&*tdx.evidence([0; 64]).await.unwrap_err());
        assert!(e.contains("provider is \"tdx_guest\""), "{e}");
    }

    #[tokio::test]
    async fn sev_guest_ioctl_responses_are_checked() {
        let ev = device(0, REPORT_LEN as u32, false)
            .evidence([5; 64])
            .await
            .unwrap();
        assert_eq!(ev, snp_evidence_json(&fake_report(&[5; 64]), None).unwrap());
        assert!(ev["cert_chain"].is_null());
        let e = device(0x16, REPORT_LEN as u32, false)
            .report(&[0; 64])
            .unwrap_err();
        assert!(matches!(e, SnpError::Status(0x16)), "{e}");
        let e = device(0, 12, false).report(&[0; 64]).unwrap_err();
        assert!(matches!(e, SnpError::ReportSize(12)), "{e}");
        let e = device(0, REPORT_LEN as u32, true)
            .report(&[0; 64])
            .unwrap_err();
        assert!(matches!(e, SnpError::ReportData), "{e}");
        assert!(matches!(
            report_from_response(&[0u8; 6]),
            Err(SnpError::Malformed(_))
        ));
    }

    #[test]
    fn without_any_interface_the_attester_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let e = SnpAttester::system(&dir.path().join("tsm"), &dir.path().join("sev-guest"))
            .err()
            .unwrap();
        assert!(matches!(e, SnpError::Unavailable(_)), "{e}");
        std::fs::create_dir(dir.path().join("tsm")).unwrap();
        assert!(SnpAttester::system(&dir.path().join("tsm"), &dir.path().join("x")).is_ok());
    }
}
