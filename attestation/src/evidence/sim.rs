//! veil's simulated TEE evidence: an SEV-SNP-layout report signed (ECDSA P-384) by a simulated
//! chip key, plus that chip key's certificate from the simulated root.
//!
//! Owns the simulated chip certificate format, the report builder the shim's simulated firmware
//! calls ([`sign_sim_report`]) and the parse of simulated evidence. Key files are
//! [`crate::sim_ca`]'s; verification is [`crate::verify::sim`]'s.
//!
//! Chip certificate (JSON): `{"format": "veil-sim-chip-cert-v1", "chip_public_key": hex(SEC1
//! uncompressed P-384 point), "signature": hex(DER ECDSA P-384/SHA-384 by the root over
//! "veil-sim-chip-cert-v1\0" || SEC1 point)}`. The report's `CHIP_ID` is SHA-512 of the SEC1
//! point, so a report names the chip that signed it.

use p384::ecdsa::{signature::Signer, Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};
use thiserror::Error;

use super::snp::{layout, SnpParseError, SnpReport, TcbVersion, REPORT_LEN, SIGNATURE_OFFSET};

/// The chip certificate format tag.
pub const CHIP_CERT_FORMAT: &str = "veil-sim-chip-cert-v1";
/// Domain separator signed together with the chip key.
pub const CHIP_CERT_DOMAIN: &[u8] = b"veil-sim-chip-cert-v1\0";
/// Default guest policy in simulated reports: SMT allowed, reserved bit 17 set, debug off.
pub const DEFAULT_SIM_POLICY: u64 = 0x3_0000;
/// Largest simulated evidence JSON we parse.
pub const MAX_SIM_EVIDENCE_LEN: usize = 16 * 1024;

/// Why simulated evidence is malformed.
#[derive(Debug, Error)]
pub enum SimEvidenceError {
    /// The evidence is not the expected JSON object.
    #[error("simulated evidence is not valid JSON of the expected shape")]
    Json(#[source] serde_json::Error),
    /// Larger than we accept.
    #[error("simulated evidence is {0} bytes, more than the limit")]
    TooLong(usize),
    /// The report field is not base64.
    #[error("simulated evidence report is not base64")]
    Base64(#[source] base64::DecodeError),
    /// The report bytes are not an SNP-layout report.
    #[error("simulated evidence report is malformed")]
    Report(#[source] SnpParseError),
    /// The chip certificate is malformed.
    #[error("simulated chip certificate is malformed: {0}")]
    ChipCert(&'static str),
}

/// The simulated chip's certificate, issued by the simulated root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimChipCert {
    /// Must be [`CHIP_CERT_FORMAT`].
    pub format: String,
    /// Hex of the SEC1 uncompressed P-384 public key.
    pub chip_public_key: String,
    /// Hex of the root's DER ECDSA signature.
    pub signature: String,
}

impl SimChipCert {
    /// Issues a chip certificate: the root signs the chip's public key.
    pub fn issue(root: &SigningKey, chip_public: &VerifyingKey) -> Self {
        let sec1 = chip_public.to_encoded_point(false);
        let mut tbs = CHIP_CERT_DOMAIN.to_vec();
        tbs.extend_from_slice(sec1.as_bytes());
        let sig: Signature = root.sign(&tbs);
        SimChipCert {
            format: CHIP_CERT_FORMAT.into(),
            chip_public_key: hex::encode(sec1.as_bytes()),
            signature: hex::encode(sig.to_der().as_bytes()),
        }
    }

    /// The chip public key, decoded.
    pub fn public_key(&self) -> Result<VerifyingKey, SimEvidenceError> {
        if self.format != CHIP_CERT_FORMAT {
            return Err(SimEvidenceError::ChipCert("unknown format"));
        }
        let sec1 = hex::decode(&self.chip_public_key)
            .map_err(|_| SimEvidenceError::ChipCert("public key is not hex"))?;
        VerifyingKey::from_sec1_bytes(&sec1)
            .map_err(|_| SimEvidenceError::ChipCert("public key is not a P-384 point"))
    }

    /// The to-be-signed bytes.
    pub fn tbs(&self) -> Result<Vec<u8>, SimEvidenceError> {
        let key = self.public_key()?;
        let mut tbs = CHIP_CERT_DOMAIN.to_vec();
        tbs.extend_from_slice(key.to_encoded_point(false).as_bytes());
        Ok(tbs)
    }

    /// The root's signature, decoded.
    pub fn root_signature(&self) -> Result<Signature, SimEvidenceError> {
        let der = hex::decode(&self.signature)
            .map_err(|_| SimEvidenceError::ChipCert("signature is not hex"))?;
        Signature::from_der(&der).map_err(|_| SimEvidenceError::ChipCert("signature is not DER"))
    }
}

/// The chip ID a simulated report carries: SHA-512 of the chip's SEC1 public key.
pub fn sim_chip_id(chip_public: &VerifyingKey) -> [u8; 64] {
    let mut out = [0u8; 64];
    out.copy_from_slice(&Sha512::digest(
        chip_public.to_encoded_point(false).as_bytes(),
    ));
    out
}

/// Everything a simulated report says, beyond the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimReportParams {
    /// Bound by the guest (the KBS runtime-data digest, zero-padded).
    pub report_data: [u8; 64],
    /// The launch measurement ([`crate::measure::sim::sim_measurement`]).
    pub measurement: [u8; 48],
    /// Host data (veil: the init-data digest), zero when unused.
    pub host_data: [u8; 32],
    /// Guest policy; [`DEFAULT_SIM_POLICY`] unless testing the debug bit.
    pub policy: u64,
    /// VMPL of the requester (0 for the agent).
    pub vmpl: u32,
    /// The TCB the simulated chip claims.
    pub tcb: TcbVersion,
}

impl SimReportParams {
    /// Parameters with the default policy, VMPL 0, zero TCB and zero host data.
    pub fn new(report_data: [u8; 64], measurement: [u8; 48]) -> Self {
        SimReportParams {
            report_data,
            measurement,
            host_data: [0u8; 32],
            policy: DEFAULT_SIM_POLICY,
            vmpl: 0,
            tcb: TcbVersion::default(),
        }
    }
}

fn encode_tcb(t: &TcbVersion) -> u64 {
    u64::from_le_bytes([t.bootloader, t.tee, 0, 0, 0, 0, t.snp, t.microcode])
}

/// Builds and signs a simulated report (SEV-SNP layout, version 2) with the chip key.
pub fn build_sim_report(chip: &SigningKey, p: &SimReportParams) -> SnpReport {
    let mut r = [0u8; REPORT_LEN];
    r[layout::VERSION..layout::VERSION + 4].copy_from_slice(&2u32.to_le_bytes());
    r[layout::POLICY..layout::POLICY + 8].copy_from_slice(&p.policy.to_le_bytes());
    r[layout::VMPL..layout::VMPL + 4].copy_from_slice(&p.vmpl.to_le_bytes());
    r[layout::SIG_ALGO..layout::SIG_ALGO + 4].copy_from_slice(&1u32.to_le_bytes());
    let tcb = encode_tcb(&p.tcb).to_le_bytes();
    for off in [
        layout::CURRENT_TCB,
        layout::REPORTED_TCB,
        layout::COMMITTED_TCB,
        layout::LAUNCH_TCB,
    ] {
        r[off..off + 8].copy_from_slice(&tcb);
    }
    r[layout::REPORT_DATA..layout::REPORT_DATA + 64].copy_from_slice(&p.report_data);
    r[layout::MEASUREMENT..layout::MEASUREMENT + 48].copy_from_slice(&p.measurement);
    r[layout::HOST_DATA..layout::HOST_DATA + 32].copy_from_slice(&p.host_data);
    let mut report_id = [0u8; 32];
    let _ = rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut report_id);
    r[layout::REPORT_ID..layout::REPORT_ID + 32].copy_from_slice(&report_id);
    r[layout::CHIP_ID..layout::CHIP_ID + 64].copy_from_slice(&sim_chip_id(chip.verifying_key()));
    let sig: Signature = chip.sign(&r[..super::snp::SIGNED_LEN]);
    let (rb, sb) = sig.split_bytes();
    let mut r_le: Vec<u8> = rb.to_vec();
    r_le.reverse();
    let mut s_le: Vec<u8> = sb.to_vec();
    s_le.reverse();
    r[SIGNATURE_OFFSET..SIGNATURE_OFFSET + 48].copy_from_slice(&r_le);
    r[SIGNATURE_OFFSET + 72..SIGNATURE_OFFSET + 120].copy_from_slice(&s_le);
    SnpReport::from_raw_unchecked(r)
}

/// The simulated firmware's entry point: a signed report (0x4A0 bytes) binding `report_data`,
/// `measurement` and `host_data` (zero when `None`), default policy, VMPL 0.
pub fn sign_sim_report(
    chip: &SigningKey,
    report_data: &[u8; 64],
    measurement: &[u8; 48],
    host_data: Option<&[u8; 32]>,
) -> Vec<u8> {
    let mut p = SimReportParams::new(*report_data, *measurement);
    if let Some(h) = host_data {
        p.host_data = *h;
    }
    build_sim_report(chip, &p).as_bytes().to_vec()
}

/// Simulated evidence as it travels in the KBS `tee-evidence` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimEvidence {
    /// Base64 (standard) of the 0x4A0-byte report.
    pub report: String,
    /// The chip certificate.
    pub chip_cert: SimChipCert,
}

impl SimEvidence {
    /// Wraps a report and the chip's certificate.
    pub fn new(report: &[u8], chip_cert: SimChipCert) -> Self {
        use base64::Engine;
        SimEvidence {
            report: base64::engine::general_purpose::STANDARD.encode(report),
            chip_cert,
        }
    }

    /// Parses evidence JSON bytes strictly.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SimEvidenceError> {
        if bytes.len() > MAX_SIM_EVIDENCE_LEN {
            return Err(SimEvidenceError::TooLong(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(SimEvidenceError::Json)
    }

    /// Decodes and parses the report.
    pub fn report(&self) -> Result<SnpReport, SimEvidenceError> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&self.report)
            .map_err(SimEvidenceError::Base64)?;
        SnpReport::parse(&raw).map_err(SimEvidenceError::Report)
    }
}
