//! Evidence: what a guest sends in the KBS `tee-evidence` field, parsed strictly.
//!
//! `tee-evidence` is Trustee's composite evidence (`kbs_types::CompositeEvidence`):
//! `{"primary_evidence": <per TEE, below>, "additional_evidence": ""}`. veil attests the CPU TEE
//! only, so `additional_evidence` (device attesters' evidence) must be empty. The primary
//! evidence per TEE is what Trustee's attesters produce and its verifiers read:
//!
//! | tee | primary evidence |
//! |---|---|
//! | `snp` | `{"attestation_report": <sev AttestationReport serde form>, "cert_chain": [<sev CertTableEntry>] \| null}` ([`snp_json`]) |
//! | `tdx` | `{"cc_eventlog": b64(CCEL ACPI table) \| null, "quote": b64(quote v4/v5)}` (the event log is carried, not replayed) |
//! | `veil-sim` | `{"report": b64(0x4A0 bytes), "chip_cert": {...}}` ([`sim::SimEvidence`]; veil's own) |
//!
//! Base64 is the standard alphabet with padding.

pub mod sim;
pub mod snp;
pub mod snp_json;
pub mod tdx;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use veil_common::{Classify, Kind};

use crate::protocol::CompositeEvidence;
use crate::tee::Tee;

/// Largest primary evidence JSON accepted (an SNP report with a full certificate chain in the
/// `sev` serde form is about 20 KiB; a TDX quote with its PCK chain about 7 KiB as base64).
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
    /// The composite evidence carries device (additional) evidence, which veil does not verify.
    #[error(
        "additional (device) evidence is not supported: only the CPU TEE's evidence is verified"
    )]
    AdditionalEvidence,
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
            EvidenceError::AdditionalEvidence => Kind::Unimplemented,
            EvidenceError::Snp(e) => e.kind(),
            EvidenceError::Tdx(e) => e.kind(),
            EvidenceError::Sim(e) => e.kind(),
        }
    }
}

/// Trustee's TDX evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TdxEvidenceJson {
    /// Base64 of the CC event log ACPI table, if the guest has one.
    pub cc_eventlog: Option<String>,
    /// Base64 of the quote.
    pub quote: String,
}

/// SNP evidence: the report and, optionally, the host's certificate table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnpEvidence {
    /// The report.
    pub report: snp::SnpReport,
    /// The certificate table (VCEK or VLEK, ASK/ASVK, ARK, CRL), when the host attached one.
    pub cert_table: Option<snp::CertTable>,
}

/// TDX evidence: the raw quote (kept for `dcap-qvl`) and its parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdxEvidence {
    /// The raw quote bytes.
    pub raw: Vec<u8>,
    /// The parsed quote.
    pub quote: tdx::TdxQuote,
    /// The CC event log, if sent (carried for the record; RTMRs are matched by policy).
    pub cc_eventlog: Option<Vec<u8>>,
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

fn b64(tee: Tee, field: &'static str, s: &str) -> Result<Vec<u8>, EvidenceError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|source| EvidenceError::Base64 { tee, field, source })
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

    /// The launch measurement the evidence claims (SNP / simulated MEASUREMENT, TDX MRTD), hex.
    pub fn measurement_hex(&self) -> String {
        match self {
            Evidence::Snp(s) => hex::encode(s.report.measurement()),
            Evidence::Tdx(t) => hex::encode(t.quote.report.mr_td),
            Evidence::Sim { report, .. } => hex::encode(report.measurement()),
        }
    }

    /// The data the host bound at launch (veil: the init-data digest): SNP and simulated
    /// HOST_DATA (32 bytes), TDX MRCONFIGID (48 bytes).
    pub fn host_data(&self) -> Vec<u8> {
        match self {
            Evidence::Snp(s) => s.report.host_data().to_vec(),
            Evidence::Tdx(t) => t.quote.report.mr_config_id.to_vec(),
            Evidence::Sim { report, .. } => report.host_data().to_vec(),
        }
    }

    /// Parses composite `tee-evidence` for `tee`.
    pub fn from_composite(tee: Tee, ev: &CompositeEvidence) -> Result<Self, EvidenceError> {
        if !ev.additional_evidence.is_empty() {
            return Err(EvidenceError::AdditionalEvidence);
        }
        Self::from_primary(tee, &ev.primary_evidence)
    }

    /// Parses primary evidence for `tee` (a JSON object, or a string holding one).
    pub fn from_primary(tee: Tee, value: &Value) -> Result<Self, EvidenceError> {
        let shape = |source| EvidenceError::Shape { tee, source };
        let owned;
        let value = match value {
            Value::String(s) => {
                if s.len() > MAX_EVIDENCE_JSON_LEN {
                    return Err(EvidenceError::TooLong(s.len()));
                }
                owned = serde_json::from_str::<Value>(s).map_err(shape)?;
                &owned
            }
            v => v,
        };
        let bytes = serde_json::to_vec(value).map_err(shape)?;
        if bytes.len() > MAX_EVIDENCE_JSON_LEN {
            return Err(EvidenceError::TooLong(bytes.len()));
        }
        match tee {
            Tee::Snp => {
                let w: snp_json::SnpEvidenceJson = serde_json::from_slice(&bytes).map_err(shape)?;
                let report = w
                    .attestation_report
                    .to_report()
                    .map_err(EvidenceError::Snp)?;
                let cert_table = w
                    .cert_chain
                    .as_deref()
                    .map(snp_json::cert_table_from_chain)
                    .transpose()
                    .map_err(EvidenceError::Snp)?;
                Ok(Evidence::Snp(SnpEvidence { report, cert_table }))
            }
            Tee::Tdx => {
                let w: TdxEvidenceJson = serde_json::from_slice(&bytes).map_err(shape)?;
                let raw = b64(tee, "quote", &w.quote)?;
                let quote = tdx::TdxQuote::parse(&raw).map_err(EvidenceError::Tdx)?;
                let cc_eventlog = match w.cc_eventlog.as_deref() {
                    None | Some("") => None,
                    Some(s) => Some(b64(tee, "cc_eventlog", s)?),
                };
                Ok(Evidence::Tdx(Box::new(TdxEvidence {
                    raw,
                    quote,
                    cc_eventlog,
                })))
            }
            Tee::VeilSim => {
                let e = sim::SimEvidence::from_json(&bytes).map_err(EvidenceError::Sim)?;
                let report = e.report().map_err(EvidenceError::Sim)?;
                Ok(Evidence::Sim {
                    report,
                    chip_cert: e.chip_cert,
                })
            }
        }
    }
}

/// SNP primary evidence in Trustee's shape from raw bytes (the guest attester's side): the
/// report and, when the host supplied it, the certificate table (`SNP_GET_EXT_REPORT` /
/// configfs-tsm `auxblob`) as `cert_chain`.
pub fn snp_evidence_json(report: &[u8], cert_table: Option<&[u8]>) -> Result<Value, EvidenceError> {
    let report = snp::SnpReport::parse(report).map_err(EvidenceError::Snp)?;
    let attestation_report =
        snp_json::ReportJson::from_report(&report).map_err(EvidenceError::Snp)?;
    let cert_chain = match cert_table {
        None => None,
        Some(t) => Some(
            snp::CertTable::parse(t)
                .map_err(EvidenceError::Snp)?
                .entries
                .iter()
                .map(snp_json::CertEntryJson::from_entry)
                .collect(),
        ),
    };
    serde_json::to_value(snp_json::SnpEvidenceJson {
        attestation_report,
        cert_chain,
    })
    .map_err(|source| EvidenceError::Shape {
        tee: Tee::Snp,
        source,
    })
}

/// TDX primary evidence in Trustee's shape from a raw quote and, if the guest has one, its CC
/// event log (the attester's side).
pub fn tdx_evidence_json(quote: &[u8], cc_eventlog: Option<&[u8]>) -> Value {
    let e = base64::engine::general_purpose::STANDARD;
    serde_json::json!(TdxEvidenceJson {
        cc_eventlog: cc_eventlog.map(|l| e.encode(l)),
        quote: e.encode(quote),
    })
}

/// Composite evidence with `primary` as the only (CPU) evidence.
pub fn composite(primary: Value) -> CompositeEvidence {
    CompositeEvidence {
        primary_evidence: primary,
        additional_evidence: String::new(),
    }
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
        for (e, k) in [
            (EvidenceError::TooLong(0), Kind::InvalidArgument),
            (
                EvidenceError::Shape {
                    tee: Tee::Snp,
                    source: json,
                },
                Kind::InvalidArgument,
            ),
            (
                EvidenceError::Base64 {
                    tee: Tee::Tdx,
                    field: "quote",
                    source: b64,
                },
                Kind::InvalidArgument,
            ),
            (EvidenceError::AdditionalEvidence, Kind::Unimplemented),
            (
                EvidenceError::Snp(snp::SnpParseError::ReportLength(0)),
                Kind::InvalidArgument,
            ),
            (
                EvidenceError::Tdx(tdx::TdxParseError::TooLong(0)),
                Kind::InvalidArgument,
            ),
            (
                EvidenceError::Sim(sim::SimEvidenceError::TooLong(0)),
                Kind::InvalidArgument,
            ),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
        let e =
            Evidence::from_primary(Tee::Tdx, &serde_json::json!({"quote": "AA=="})).unwrap_err();
        assert_eq!(
            veil_common::error_chain(&e),
            "TDX evidence is malformed: TDX quote is truncated: need 48 bytes, have 1"
        );
    }

    #[test]
    fn composite_evidence_with_device_evidence_is_refused() {
        let mut c = composite(serde_json::json!({}));
        c.additional_evidence = r#"{"nvidia":["gpu","..."]}"#.into();
        assert!(matches!(
            Evidence::from_composite(Tee::Snp, &c),
            Err(EvidenceError::AdditionalEvidence)
        ));
    }

    #[test]
    fn tdx_shape_is_trustees() {
        let v = tdx_evidence_json(b"q", None);
        assert_eq!(v, serde_json::json!({"cc_eventlog": null, "quote": "cQ=="}));
        let v = tdx_evidence_json(b"q", Some(b"log"));
        assert_eq!(v["cc_eventlog"], "bG9n");
    }
}
