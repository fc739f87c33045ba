//! SEV-SNP verification: the VCEK chains to a pinned AMD root (ARK → ASK → VCEK), the VCEK signed
//! the report, the VCEK's TCB and chip-id extensions equal the report's, and the report's own
//! fields are acceptable (VMPL 0, debug off, `report_data` bound to this session).
//!
//! The AMD roots for Milan, Genoa and Turin are the ones the `sev` crate carries (pinned at build
//! time, never taken from the evidence). The VCEK comes from the evidence's certificate table or
//! from an offline store directory; nothing is fetched from the network. Measurement, TCB minimum
//! and host data are policy decisions, checked by the broker's policy.

use std::path::Path;

use der::{Decode, Encode};
use p384::ecdsa::{signature::Verifier, Signature, VerifyingKey};
use sev::certs::snp::{builtin, ca, Certificate, Chain, Verifiable};
use subtle::ConstantTimeEq;
use thiserror::Error;

use veil_attestation::evidence::snp::{guid, Generation, SnpReport, TcbVersion};
use veil_attestation::evidence::SnpEvidence;
use veil_common::{Classify, Kind};

const OID_BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";
const OID_HW_ID: &str = "1.3.6.1.4.1.3704.1.4";

/// Checks an SNP-layout report's own fields. Shared with the simulated TEE.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReportCheckError {
    /// The report signature does not verify under the chip key.
    #[error("report signature does not verify under the chip key")]
    SignatureInvalid,
    /// The signature bytes are not a valid P-384 (r, s).
    #[error("report signature is not a valid ECDSA P-384 signature")]
    SignatureMalformed,
    /// The report was requested from a VMPL other than 0.
    #[error("report was requested at VMPL {0}, only VMPL 0 is accepted")]
    VmplNotZero(u32),
    /// The guest policy allows debugging: the host could read guest memory.
    #[error("guest policy has the debug bit set")]
    DebugEnabled,
    /// `report_data` is not the digest of this session's nonce and TEE key.
    #[error("report_data is not bound to this session's nonce and key")]
    ReportDataMismatch,
}

/// Why an SNP report was not accepted.
#[derive(Debug, Error)]
pub enum SnpVerifyError {
    /// Neither the certificate table nor the store had a VCEK for this chip.
    #[error("no VCEK for this chip: none in the evidence's certificate table or the VCEK store")]
    NoVcek,
    /// The report is signed by a VLEK or no key; veil accepts VCEK-signed reports only.
    #[error("report signing key {0} is not the VCEK (0)")]
    NotVcekSigned(u32),
    /// The VCEK is not a parsable X.509 certificate.
    #[error("VCEK certificate does not parse")]
    VcekParse(#[source] std::io::Error),
    /// The VCEK does not chain to any pinned AMD root.
    #[error("VCEK does not chain to the pinned AMD ARK/ASK of {tried}")]
    ChainInvalid {
        /// Generations tried.
        tried: String,
    },
    /// The pinned roots could not be loaded (a build problem, not an attack).
    #[error("pinned AMD roots could not be loaded")]
    PinnedRoots(#[source] std::io::Error),
    /// The VCEK's key is not an EC P-384 key.
    #[error("VCEK public key is not EC P-384")]
    VcekKey,
    /// A TCB extension of the VCEK differs from the report's REPORTED_TCB.
    #[error("VCEK {component} SPL {cert} differs from the report's reported TCB {report}")]
    VcekTcbMismatch {
        /// The component.
        component: &'static str,
        /// Value in the certificate.
        cert: u8,
        /// Value in the report.
        report: u8,
    },
    /// A required VCEK extension is missing or malformed.
    #[error("VCEK extension {0} is missing or malformed")]
    VcekExtension(&'static str),
    /// The VCEK's hardware ID differs from the report's CHIP_ID.
    #[error("VCEK hardware ID differs from the report's chip ID")]
    VcekChipIdMismatch,
    /// A check on the report itself failed.
    #[error(transparent)]
    Report(#[from] ReportCheckError),
}

impl Classify for ReportCheckError {
    fn kind(&self) -> Kind {
        match self {
            ReportCheckError::SignatureMalformed => Kind::InvalidArgument,
            ReportCheckError::SignatureInvalid
            | ReportCheckError::VmplNotZero(_)
            | ReportCheckError::DebugEnabled
            | ReportCheckError::ReportDataMismatch => Kind::PermissionDenied,
        }
    }
}

impl Classify for SnpVerifyError {
    fn kind(&self) -> Kind {
        match self {
            SnpVerifyError::NoVcek => Kind::FailedPrecondition,
            SnpVerifyError::NotVcekSigned(_) => Kind::Unimplemented,
            SnpVerifyError::VcekParse(_)
            | SnpVerifyError::VcekKey
            | SnpVerifyError::VcekExtension(_) => Kind::InvalidArgument,
            SnpVerifyError::ChainInvalid { .. }
            | SnpVerifyError::VcekTcbMismatch { .. }
            | SnpVerifyError::VcekChipIdMismatch => Kind::PermissionDenied,
            SnpVerifyError::PinnedRoots(_) => Kind::Internal,
            SnpVerifyError::Report(e) => e.kind(),
        }
    }
}

/// Verifies the ECDSA P-384 signature of an SNP-layout report under `key`.
pub fn verify_report_signature(
    report: &SnpReport,
    key: &VerifyingKey,
) -> Result<(), ReportCheckError> {
    let sig = Signature::from_scalars(report.signature_r_be(), report.signature_s_be())
        .map_err(|_| ReportCheckError::SignatureMalformed)?;
    key.verify(report.signed_bytes(), &sig)
        .map_err(|_| ReportCheckError::SignatureInvalid)
}

/// Checks VMPL 0, debug off and `report_data` equal to `expected_report_data`.
pub fn check_report_fields(
    report: &SnpReport,
    expected_report_data: &[u8; 64],
) -> Result<(), ReportCheckError> {
    if report.vmpl() != 0 {
        return Err(ReportCheckError::VmplNotZero(report.vmpl()));
    }
    if report.debug_allowed() {
        return Err(ReportCheckError::DebugEnabled);
    }
    if !bool::from(report.report_data().ct_eq(expected_report_data)) {
        return Err(ReportCheckError::ReportDataMismatch);
    }
    Ok(())
}

fn pinned(generation: Generation) -> Result<ca::Chain, SnpVerifyError> {
    let (ark, ask) = match generation {
        Generation::Milan => (builtin::milan::ark(), builtin::milan::ask()),
        Generation::Genoa => (builtin::genoa::ark(), builtin::genoa::ask()),
        Generation::Turin => (builtin::turin::ark(), builtin::turin::ask()),
    };
    Ok(ca::Chain {
        ark: ark.map_err(SnpVerifyError::PinnedRoots)?,
        ask: ask.map_err(SnpVerifyError::PinnedRoots)?,
    })
}

/// Verifies that `vcek` chains to a pinned AMD root. Tries the report's generation when known,
/// otherwise all three. Returns the generation whose root signed it.
pub fn verify_vcek_chain(
    vcek: &Certificate,
    hint: Option<Generation>,
) -> Result<Generation, SnpVerifyError> {
    let candidates: Vec<Generation> = match hint {
        Some(g) => vec![g],
        None => vec![Generation::Milan, Generation::Genoa, Generation::Turin],
    };
    for g in &candidates {
        let chain = Chain {
            ca: pinned(*g)?,
            vek: vcek.clone(),
        };
        if (&chain).verify().is_ok() {
            return Ok(*g);
        }
    }
    Err(SnpVerifyError::ChainInvalid {
        tried: candidates
            .iter()
            .map(|g| g.name())
            .collect::<Vec<_>>()
            .join("/"),
    })
}

fn ext_value<'a>(cert: &'a x509_cert::Certificate, oid: &str) -> Option<&'a [u8]> {
    let exts = cert.tbs_certificate.extensions.as_ref()?;
    exts.iter()
        .find(|e| e.extn_id.to_string() == oid)
        .map(|e| e.extn_value.as_bytes())
}

fn ext_u8(
    cert: &x509_cert::Certificate,
    oid: &str,
    name: &'static str,
) -> Result<u8, SnpVerifyError> {
    let raw = ext_value(cert, oid).ok_or(SnpVerifyError::VcekExtension(name))?;
    u8::from_der(raw).map_err(|_| SnpVerifyError::VcekExtension(name))
}

fn ext_hwid(cert: &x509_cert::Certificate) -> Result<Vec<u8>, SnpVerifyError> {
    let raw = ext_value(cert, OID_HW_ID).ok_or(SnpVerifyError::VcekExtension("hwID"))?;
    if raw.len() == 64 {
        return Ok(raw.to_vec());
    }
    let os =
        der::asn1::OctetString::from_der(raw).map_err(|_| SnpVerifyError::VcekExtension("hwID"))?;
    Ok(os.as_bytes().to_vec())
}

/// Checks the VCEK's TCB and hardware-ID extensions against the report.
pub fn check_vcek_extensions(
    vcek: &Certificate,
    report: &SnpReport,
    generation: Generation,
) -> Result<(), SnpVerifyError> {
    let cert: x509_cert::Certificate = vcek.clone().into();
    let tcb = TcbVersion::from_u64(report.reported_tcb_raw(), Some(generation));
    let mut checks = vec![
        ("bootloader", OID_BL_SPL, tcb.bootloader),
        ("tee", OID_TEE_SPL, tcb.tee),
        ("snp", OID_SNP_SPL, tcb.snp),
        ("microcode", OID_UCODE_SPL, tcb.microcode),
    ];
    if generation == Generation::Turin {
        checks.push(("fmc", OID_FMC_SPL, tcb.fmc));
    }
    for (component, oid, report_value) in checks {
        let cert_value = ext_u8(&cert, oid, component)?;
        if cert_value != report_value {
            return Err(SnpVerifyError::VcekTcbMismatch {
                component,
                cert: cert_value,
                report: report_value,
            });
        }
    }
    let hwid = ext_hwid(&cert)?;
    if hwid.as_slice() != report.chip_id().as_slice() {
        return Err(SnpVerifyError::VcekChipIdMismatch);
    }
    Ok(())
}

fn vcek_key(vcek: &Certificate) -> Result<VerifyingKey, SnpVerifyError> {
    let cert: x509_cert::Certificate = vcek.clone().into();
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|_| SnpVerifyError::VcekKey)?;
    use p384::pkcs8::DecodePublicKey;
    VerifyingKey::from_public_key_der(&spki).map_err(|_| SnpVerifyError::VcekKey)
}

/// Looks a VCEK up in an offline store: `<dir>/<hex chip_id>.der`, then `<dir>/vcek.der`.
pub fn load_vcek_from_store(dir: &Path, chip_id: &[u8; 64]) -> Option<Vec<u8>> {
    let by_chip = dir.join(format!("{}.der", hex::encode(chip_id)));
    std::fs::read(by_chip)
        .or_else(|_| std::fs::read(dir.join("vcek.der")))
        .ok()
}

/// Where the verifier finds VCEKs that the evidence does not carry.
#[derive(Debug, Clone, Default)]
pub struct SnpTrust {
    /// Offline VCEK store directory.
    pub vcek_dir: Option<std::path::PathBuf>,
}

/// The outcome of a successful SNP verification.
#[derive(Debug, Clone)]
pub struct SnpVerified {
    /// The generation whose pinned root signed the VCEK.
    pub generation: Generation,
    /// REPORTED_TCB decoded for that generation.
    pub tcb: TcbVersion,
}

/// Full SNP verification of `evidence` against `expected_report_data`.
pub fn verify_snp(
    evidence: &SnpEvidence,
    expected_report_data: &[u8; 64],
    trust: &SnpTrust,
) -> Result<SnpVerified, SnpVerifyError> {
    let report = &evidence.report;
    if report.signing_key() != 0 {
        return Err(SnpVerifyError::NotVcekSigned(report.signing_key()));
    }
    let vcek_der = evidence
        .cert_table
        .as_ref()
        .and_then(|t| t.get(guid::VCEK).map(<[u8]>::to_vec))
        .or_else(|| {
            trust
                .vcek_dir
                .as_deref()
                .and_then(|d| load_vcek_from_store(d, &report.chip_id()))
        })
        .ok_or(SnpVerifyError::NoVcek)?;
    let vcek = Certificate::from_der(&vcek_der).map_err(SnpVerifyError::VcekParse)?;
    verify_snp_with_vcek(report, &vcek, expected_report_data)
}

/// SNP verification with an explicit VCEK (chain, signature, extensions, report fields).
pub fn verify_snp_with_vcek(
    report: &SnpReport,
    vcek: &Certificate,
    expected_report_data: &[u8; 64],
) -> Result<SnpVerified, SnpVerifyError> {
    let generation = verify_vcek_chain(vcek, report.generation())?;
    let key = vcek_key(vcek)?;
    verify_report_signature(report, &key)?;
    check_vcek_extensions(vcek, report, generation)?;
    check_report_fields(report, expected_report_data)?;
    Ok(SnpVerified {
        generation,
        tcb: TcbVersion::from_u64(report.reported_tcb_raw(), Some(generation)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds() {
        let io = || std::io::Error::other("x");
        for (e, k) in [
            (ReportCheckError::SignatureMalformed, Kind::InvalidArgument),
            (ReportCheckError::SignatureInvalid, Kind::PermissionDenied),
            (ReportCheckError::VmplNotZero(1), Kind::PermissionDenied),
            (ReportCheckError::DebugEnabled, Kind::PermissionDenied),
            (ReportCheckError::ReportDataMismatch, Kind::PermissionDenied),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
        for (e, k) in [
            (SnpVerifyError::NoVcek, Kind::FailedPrecondition),
            (SnpVerifyError::NotVcekSigned(1), Kind::Unimplemented),
            (SnpVerifyError::VcekParse(io()), Kind::InvalidArgument),
            (
                SnpVerifyError::ChainInvalid {
                    tried: "milan".into(),
                },
                Kind::PermissionDenied,
            ),
            (SnpVerifyError::PinnedRoots(io()), Kind::Internal),
            (SnpVerifyError::VcekKey, Kind::InvalidArgument),
            (
                SnpVerifyError::VcekTcbMismatch {
                    component: "snp",
                    cert: 1,
                    report: 2,
                },
                Kind::PermissionDenied,
            ),
            (SnpVerifyError::VcekExtension("snp"), Kind::InvalidArgument),
            (SnpVerifyError::VcekChipIdMismatch, Kind::PermissionDenied),
            (
                SnpVerifyError::Report(ReportCheckError::DebugEnabled),
                Kind::PermissionDenied,
            ),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }
}
