//! veil's simulated TEE evidence format: an SEV-SNP-layout report signed (ECDSA P-384) by a
//! simulated chip key, plus that chip key's certificate from the simulated root.
//!
//! Owns the format and its strict parse (what the guest checks before sending it on). Signing
//! reports and issuing chip certificates is the simulated firmware's (`veil_verifier::sim_ca`),
//! verifying them the verifier's (`veil_verifier::verify::sim`).
//!
//! Evidence (JSON): `{"report": b64(0x4A0 bytes), "chip_cert": {...}}`.
//!
//! Chip certificate (JSON): `{"format": "veil-sim-chip-cert-v1", "chip_public_key": hex(SEC1
//! uncompressed P-384 point), "signature": hex(DER ECDSA P-384/SHA-384 by the root over
//! "veil-sim-chip-cert-v1\0" || SEC1 point)}`. The report's `CHIP_ID` is SHA-512 of the SEC1
//! point, so a report names the chip that signed it.

use base64::Engine;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use veil_common::{Classify, Kind};

use super::snp::{SnpParseError, SnpReport};

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

impl Classify for SimEvidenceError {
    fn kind(&self) -> Kind {
        match self {
            SimEvidenceError::Json(_)
            | SimEvidenceError::TooLong(_)
            | SimEvidenceError::Base64(_)
            | SimEvidenceError::Report(_)
            | SimEvidenceError::ChipCert(_) => Kind::InvalidArgument,
        }
    }
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
    /// The SEC1 bytes of the chip key, checked for format and hex (not for being on the curve).
    pub fn public_key_sec1(&self) -> Result<Vec<u8>, SimEvidenceError> {
        if self.format != CHIP_CERT_FORMAT {
            return Err(SimEvidenceError::ChipCert("unknown format"));
        }
        hex::decode(&self.chip_public_key)
            .map_err(|_| SimEvidenceError::ChipCert("public key is not hex"))
    }

    /// The to-be-signed bytes: the domain separator and the SEC1 key as given.
    pub fn tbs(&self) -> Result<Vec<u8>, SimEvidenceError> {
        let mut tbs = CHIP_CERT_DOMAIN.to_vec();
        tbs.extend_from_slice(&self.public_key_sec1()?);
        Ok(tbs)
    }

    /// The root's DER signature bytes.
    pub fn signature_der(&self) -> Result<Vec<u8>, SimEvidenceError> {
        hex::decode(&self.signature).map_err(|_| SimEvidenceError::ChipCert("signature is not hex"))
    }
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
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&self.report)
            .map_err(SimEvidenceError::Base64)?;
        SnpReport::parse(&raw).map_err(SimEvidenceError::Report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_invalid_argument() {
        let json = serde_json::from_slice::<SimEvidence>(b"{").unwrap_err();
        let b64 = base64::engine::general_purpose::STANDARD
            .decode("!")
            .unwrap_err();
        for e in [
            SimEvidenceError::Json(json),
            SimEvidenceError::TooLong(1),
            SimEvidenceError::Base64(b64),
            SimEvidenceError::Report(SnpParseError::ReportLength(0)),
            SimEvidenceError::ChipCert("x"),
        ] {
            assert_eq!(e.kind(), Kind::InvalidArgument, "{e}");
        }
    }

    #[test]
    fn parse_is_strict() {
        assert!(matches!(
            SimEvidence::from_json(&vec![b' '; MAX_SIM_EVIDENCE_LEN + 1]),
            Err(SimEvidenceError::TooLong(_))
        ));
        let e = SimEvidence::from_json(
            br#"{"report":"AA==","chip_cert":{"format":"x","chip_public_key":"","signature":""}}"#,
        )
        .unwrap();
        assert!(matches!(e.report(), Err(SimEvidenceError::Report(_))));
        assert!(matches!(
            e.chip_cert.tbs(),
            Err(SimEvidenceError::ChipCert("unknown format"))
        ));
        assert!(SimEvidence::from_json(br#"{"report":"","chip_cert":{"format":"x","chip_public_key":"","signature":""},"extra":1}"#).is_err());
    }
}
