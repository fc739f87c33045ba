//! Evidence: what a guest sends in the KBS `tee-evidence` field, parsed strictly.
//!
//! Evidence travels as raw hardware bytes, base64-encoded inside a small JSON object per TEE:
//!
//! | tee | JSON |
//! |---|---|
//! | `snp` | `{"report": b64(0x4A0 bytes), "cert_table": b64(certificate table)?}` |
//! | `tdx` | `{"quote": b64(quote v4/v5), "cc_eventlog": ...?}` (the event log is ignored) |
//! | `veil-sim` | `{"report": b64(0x4A0 bytes), "chip_cert": {...}}` ([`sim::SimEvidence`]) |
//!
//! A Trustee-style composite wrapper `{"primary_evidence": X, "additional_evidence": ""}` is
//! unwrapped to `X`. Base64 is the standard alphabet with padding.

pub mod sim;
pub mod snp;
pub mod tdx;

use base64::Engine;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use veil_common::{Classify, Kind};

use crate::tee::Tee;

/// Largest evidence JSON accepted (a TDX quote with its PCK chain is ~6 KiB as base64; an SNP
/// report with a full certificate table is under 16 KiB).
pub const MAX_EVIDENCE_JSON_LEN: usize = 128 * 1024;

/// Why evidence could not be parsed.
#[derive(Debug, Error)]
pub enum EvidenceError {
    /// Larger than accepted.
    #[error("evidence is {0} bytes, more than the limit")]
    TooLong(usize),
    /// Not JSON of the shape this TEE uses.
    #[error("{tee} evidence is not JSON of the expected shape")]
    Shape {
        /// The TEE the evidence claims.
        tee: Tee,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A base64 field did not decode.
    #[error("{tee} evidence field `{field}` is not base64")]
    Base64 {
        /// The TEE.
        tee: Tee,
        /// The field.
        field: &'static str,
        /// The decode error.
        #[source]
        source: base64::DecodeError,
    },
    /// The SNP report or certificate table is malformed.
    #[error("SNP evidence is malformed")]
    Snp(#[source] snp::SnpParseError),
    /// The TDX quote is malformed.
    #[error("TDX evidence is malformed")]
    Tdx(#[source] tdx::TdxParseError),
    /// The simulated evidence is malformed.
    #[error("simulated evidence is malformed")]
    Sim(#[source] sim::SimEvidenceError),
}

impl Classify for EvidenceError {
    fn kind(&self) -> Kind {
        match self {
            EvidenceError::TooLong(_)
            | EvidenceError::Shape { .. }
            | EvidenceError::Base64 { .. } => Kind::InvalidArgument,
            EvidenceError::Snp(e) => e.kind(),
            EvidenceError::Tdx(e) => e.kind(),
            EvidenceError::Sim(e) => e.kind(),
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct SnpWire {
    report: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cert_table: Option<String>,
}

#[derive(Deserialize)]
struct TdxWire {
    quote: String,
    #[serde(default)]
    #[allow(dead_code)] // reason: accepted for Trustee compatibility, not used by the verifier
    cc_eventlog: Option<serde_json::Value>,
}

/// SNP evidence: the report and, optionally, the host's certificate table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnpEvidence {
    /// The report.
    pub report: snp::SnpReport,
    /// The certificate table (VCEK/ASK/ARK), when the host attached one.
    pub cert_table: Option<snp::CertTable>,
}

/// TDX evidence: the raw quote (kept for `dcap-qvl`) and its parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdxEvidence {
    /// The raw quote bytes.
    pub raw: Vec<u8>,
    /// The parsed quote.
    pub quote: tdx::TdxQuote,
}

/// Parsed evidence of any supported TEE.
#[derive(Debug, Clone)]
pub enum Evidence {
    /// AMD SEV-SNP.
    Snp(SnpEvidence),
    /// Intel TDX.
    Tdx(Box<TdxEvidence>),
    /// veil's simulated TEE.
    Sim {
        /// The parsed report.
        report: snp::SnpReport,
        /// The chip certificate.
        chip_cert: sim::SimChipCert,
    },
}

impl Evidence {
    /// Which TEE produced it.
    pub fn tee(&self) -> Tee {
        match self {
            Evidence::Snp(_) => Tee::Snp,
            Evidence::Tdx(_) => Tee::Tdx,
            Evidence::Sim { .. } => Tee::VeilSim,
        }
    }

    /// Parses the `tee-evidence` JSON value for `tee`.
    pub fn from_value(tee: Tee, value: &serde_json::Value) -> Result<Self, EvidenceError> {
        let value = match value.get("primary_evidence") {
            Some(inner) if value.get("additional_evidence").is_some() => inner,
            _ => value,
        };
        // Evidence may also arrive as a JSON string holding JSON (Trustee's attesters do this).
        let owned;
        let value = match value {
            serde_json::Value::String(s) => {
                owned = serde_json::from_str::<serde_json::Value>(s)
                    .map_err(|source| EvidenceError::Shape { tee, source })?;
                &owned
            }
            v => v,
        };
        let bytes =
            serde_json::to_vec(value).map_err(|source| EvidenceError::Shape { tee, source })?;
        Self::from_json(tee, &bytes)
    }

    /// Parses evidence JSON bytes for `tee`.
    pub fn from_json(tee: Tee, bytes: &[u8]) -> Result<Self, EvidenceError> {
        if bytes.len() > MAX_EVIDENCE_JSON_LEN {
            return Err(EvidenceError::TooLong(bytes.len()));
        }
        let b64 = |field: &'static str, s: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|source| EvidenceError::Base64 { tee, field, source })
        };
        match tee {
            Tee::Snp => {
                let w: SnpWire = serde_json::from_slice(bytes)
                    .map_err(|source| EvidenceError::Shape { tee, source })?;
                let report = snp::SnpReport::parse(&b64("report", &w.report)?)
                    .map_err(EvidenceError::Snp)?;
                let cert_table = match w.cert_table {
                    Some(t) => Some(
                        snp::CertTable::parse(&b64("cert_table", &t)?)
                            .map_err(EvidenceError::Snp)?,
                    ),
                    None => None,
                };
                Ok(Evidence::Snp(SnpEvidence { report, cert_table }))
            }
            Tee::Tdx => {
                let w: TdxWire = serde_json::from_slice(bytes)
                    .map_err(|source| EvidenceError::Shape { tee, source })?;
                let raw = b64("quote", &w.quote)?;
                let quote = tdx::TdxQuote::parse(&raw).map_err(EvidenceError::Tdx)?;
                Ok(Evidence::Tdx(Box::new(TdxEvidence { raw, quote })))
            }
            Tee::VeilSim => {
                let e = sim::SimEvidence::from_json(bytes).map_err(EvidenceError::Sim)?;
                let report = e.report().map_err(EvidenceError::Sim)?;
                Ok(Evidence::Sim {
                    report,
                    chip_cert: e.chip_cert,
                })
            }
        }
    }
}

/// Builds SNP evidence JSON from raw bytes (the guest attester's side).
pub fn snp_evidence_json(report: &[u8], cert_table: Option<&[u8]>) -> serde_json::Value {
    let e = base64::engine::general_purpose::STANDARD;
    serde_json::json!(SnpWire {
        report: e.encode(report),
        cert_table: cert_table.map(|t| e.encode(t)),
    })
}

/// Builds TDX evidence JSON from a raw quote (the guest attester's side).
pub fn tdx_evidence_json(quote: &[u8]) -> serde_json::Value {
    serde_json::json!({ "quote": base64::engine::general_purpose::STANDARD.encode(quote) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_the_callers_and_keeps_its_cause() {
        let json = serde_json::from_slice::<serde_json::Value>(b"{").unwrap_err();
        let b64 = base64::engine::general_purpose::STANDARD
            .decode("!")
            .unwrap_err();
        for e in [
            EvidenceError::TooLong(0),
            EvidenceError::Shape {
                tee: Tee::Snp,
                source: json,
            },
            EvidenceError::Base64 {
                tee: Tee::Tdx,
                field: "quote",
                source: b64,
            },
            EvidenceError::Snp(snp::SnpParseError::ReportLength(0)),
            EvidenceError::Tdx(tdx::TdxParseError::TooLong(0)),
            EvidenceError::Sim(sim::SimEvidenceError::TooLong(0)),
        ] {
            assert_eq!(e.kind(), Kind::InvalidArgument, "{e}");
        }
        let e = Evidence::from_json(Tee::Snp, br#"{"report":"AA=="}"#).unwrap_err();
        assert_eq!(
            veil_common::error_chain(&e),
            "SNP evidence is malformed: SNP report is 1 bytes, expected 0x4A0 (1184)"
        );
    }
}
