//! SEV-SNP verification: the report's endorsement key — the chip's VCEK, or a cloud provider's
//! VLEK — chains to a pinned AMD root (ARK → ASK → VCEK, ARK → ASVK → VLEK; [`super::amd`]), is
//! not revoked when CRLs are configured, signed the report, and its TCB extensions (and, for a
//! VCEK, its hardware ID) equal the report's; then the report's own fields: debug off and
//! `report_data` bound to this session.
//!
//! The endorsement key comes from the evidence's certificate table or from an offline store
//! directory; nothing is fetched from the network. VMPL, measurement, TCB minimum and host data
//! are policy decisions (the broker's policy): an SVSM guest's report says VMPL 1 or more.

use std::path::{Path, PathBuf};

use der::{Decode, Encode};
use p384::ecdsa::{signature::Verifier, Signature, VerifyingKey};
use subtle::ConstantTimeEq;
use thiserror::Error;
use veil_attestation::evidence::snp::{guid, Generation, SnpReport, TcbVersion};
use veil_attestation::evidence::SnpEvidence;
use veil_common::{Classify, Kind};
use x509_cert::Certificate;

use super::amd::{find_chain, AmdError, AmdRoots, SnpCrls, VekKind};

const OID_BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";
const OID_HW_ID: &str = "1.3.6.1.4.1.3704.1.4";

/// Checks of an SNP-layout report's own fields. Shared with the simulated TEE.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReportCheckError {
    /// The report signature does not verify under the endorsement key.
    #[error("report signature does not verify under the endorsement key")]
    SignatureInvalid,
    /// The signature bytes are not a valid P-384 (r, s).
    #[error("report signature is not a valid ECDSA P-384 signature")]
    SignatureMalformed,
    /// The guest policy allows debugging: the host could read guest memory.
    #[error("guest policy has the debug bit set")]
    DebugEnabled,
    /// `report_data` is not the digest of this session's runtime data.
    #[error("report_data is not bound to this session's nonce and key")]
    ReportDataMismatch,
}

/// Why an SNP report was not accepted.
#[derive(Debug, Error)]
pub enum SnpVerifyError {
    /// Neither the certificate table nor the store had the endorsement key.
    #[error(
        "no {0} for this report: none in the evidence's certificate chain or the offline store"
    )]
    NoEndorsementKey(&'static str),
    /// The report says it is signed by no key, or by one veil does not know.
    #[error("report signing key {0} is neither the VCEK (0) nor a VLEK (1)")]
    SigningKey(u32),
    /// The endorsement key is not a parsable X.509 certificate.
    #[error("{kind} certificate does not parse")]
    KeyParse {
        /// `VCEK` or `VLEK`.
        kind: &'static str,
        /// The DER error.
        #[source]
        source: der::Error,
    },
    /// The pinned roots could not be loaded (a build problem, not an attack).
    #[error("pinned AMD roots could not be loaded")]
    PinnedRoots(#[source] AmdError),
    /// The endorsement key does not chain to a pinned root.
    #[error("endorsement key chain refused")]
    Chain(#[source] AmdError),
    /// The revocation check refused (revoked, no CRL for the generation, or out of date).
    #[error("revocation check refused")]
    Revocation(#[source] AmdError),
    /// The endorsement key is not an EC P-384 key.
    #[error("{0} public key is not EC P-384")]
    VekKey(&'static str),
    /// A TCB extension of the endorsement key differs from the report's REPORTED_TCB.
    #[error("{kind} {component} SPL {cert} differs from the report's reported TCB {report}")]
    VekTcbMismatch {
        /// `VCEK` or `VLEK`.
        kind: &'static str,
        /// The component.
        component: &'static str,
        /// Value in the certificate.
        cert: u8,
        /// Value in the report.
        report: u8,
    },
    /// A required extension is missing or malformed.
    #[error("{kind} extension {name} is missing or malformed")]
    VekExtension {
        /// `VCEK` or `VLEK`.
        kind: &'static str,
        /// Which extension.
        name: &'static str,
    },
    /// The VCEK's hardware ID differs from the report's CHIP_ID.
    #[error("VCEK hardware ID differs from the report's chip ID")]
    VcekChipIdMismatch,
    /// A check on the report itself failed.
    #[error("report check failed")]
    Report(#[source] ReportCheckError),
}

impl Classify for ReportCheckError {
    fn kind(&self) -> Kind {
        match self {
            ReportCheckError::SignatureMalformed => Kind::InvalidArgument,
            ReportCheckError::SignatureInvalid
            | ReportCheckError::DebugEnabled
            | ReportCheckError::ReportDataMismatch => Kind::PermissionDenied,
        }
    }
}

impl Classify for SnpVerifyError {
    fn kind(&self) -> Kind {
        match self {
            SnpVerifyError::NoEndorsementKey(_) => Kind::FailedPrecondition,
            SnpVerifyError::SigningKey(_) => Kind::Unimplemented,
            SnpVerifyError::KeyParse { .. }
            | SnpVerifyError::VekKey(_)
            | SnpVerifyError::VekExtension { .. } => Kind::InvalidArgument,
            SnpVerifyError::PinnedRoots(_) => Kind::Internal,
            SnpVerifyError::Chain(e) | SnpVerifyError::Revocation(e) => e.kind(),
            SnpVerifyError::VekTcbMismatch { .. } | SnpVerifyError::VcekChipIdMismatch => {
                Kind::PermissionDenied
            }
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

/// Checks debug off and `report_data` equal to `expected_report_data`.
pub fn check_report_fields(
    report: &SnpReport,
    expected_report_data: &[u8; 64],
) -> Result<(), ReportCheckError> {
    if report.debug_allowed() {
        return Err(ReportCheckError::DebugEnabled);
    }
    if !bool::from(report.report_data().ct_eq(expected_report_data)) {
        return Err(ReportCheckError::ReportDataMismatch);
    }
    Ok(())
}

fn ext_value<'a>(cert: &'a Certificate, oid: &str) -> Option<&'a [u8]> {
    let exts = cert.tbs_certificate.extensions.as_ref()?;
    exts.iter()
        .find(|e| e.extn_id.to_string() == oid)
        .map(|e| e.extn_value.as_bytes())
}

fn ext_u8(
    cert: &Certificate,
    oid: &str,
    kind: VekKind,
    name: &'static str,
) -> Result<u8, SnpVerifyError> {
    let missing = || SnpVerifyError::VekExtension {
        kind: kind.name(),
        name,
    };
    let raw = ext_value(cert, oid).ok_or_else(missing)?;
    u8::from_der(raw).map_err(|_| missing())
}

fn ext_hwid(cert: &Certificate) -> Result<Vec<u8>, SnpVerifyError> {
    let missing = || SnpVerifyError::VekExtension {
        kind: "VCEK",
        name: "hwID",
    };
    let raw = ext_value(cert, OID_HW_ID).ok_or_else(missing)?;
    if raw.len() == 64 {
        return Ok(raw.to_vec());
    }
    let os = der::asn1::OctetString::from_der(raw).map_err(|_| missing())?;
    Ok(os.as_bytes().to_vec())
}

/// Checks the endorsement key's TCB (and, for a VCEK, hardware-ID) extensions against the
/// report.
pub fn check_vek_extensions(
    vek: &Certificate,
    kind: VekKind,
    report: &SnpReport,
    generation: Generation,
) -> Result<(), SnpVerifyError> {
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
        let cert_value = ext_u8(vek, oid, kind, component)?;
        if cert_value != report_value {
            return Err(SnpVerifyError::VekTcbMismatch {
                kind: kind.name(),
                component,
                cert: cert_value,
                report: report_value,
            });
        }
    }
    // A VLEK is shared by a provider's hosts: it names no chip.
    if kind == VekKind::Vcek && ext_hwid(vek)?.as_slice() != report.chip_id().as_slice() {
        return Err(SnpVerifyError::VcekChipIdMismatch);
    }
    Ok(())
}

fn vek_key(vek: &Certificate, kind: VekKind) -> Result<VerifyingKey, SnpVerifyError> {
    use p384::pkcs8::DecodePublicKey;
    let spki = vek
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|_| SnpVerifyError::VekKey(kind.name()))?;
    VerifyingKey::from_public_key_der(&spki).map_err(|_| SnpVerifyError::VekKey(kind.name()))
}

/// Looks an endorsement key up in an offline store: for a VCEK `<dir>/<hex chip_id>.der`, then
/// `<dir>/vcek.der`; for a VLEK `<dir>/vlek.der`.
pub fn load_vek_from_store(dir: &Path, kind: VekKind, chip_id: &[u8; 64]) -> Option<Vec<u8>> {
    match kind {
        VekKind::Vcek => std::fs::read(dir.join(format!("{}.der", hex::encode(chip_id))))
            .or_else(|_| std::fs::read(dir.join("vcek.der")))
            .ok(),
        VekKind::Vlek => std::fs::read(dir.join("vlek.der")).ok(),
    }
}

/// What an SNP verifier trusts besides the report.
#[derive(Debug, Clone, Default)]
pub struct SnpTrust {
    /// Offline store of VCEKs / VLEKs the evidence does not carry.
    pub vek_dir: Option<PathBuf>,
    /// The roots; `None`: AMD's pinned roots of every generation.
    pub roots: Option<Vec<AmdRoots>>,
    /// CRLs; when set, every chain must be covered by a current one.
    pub crls: Option<SnpCrls>,
}

/// The outcome of a successful SNP verification.
#[derive(Debug, Clone)]
pub struct SnpVerified {
    /// The generation whose root signed the endorsement key.
    pub generation: Generation,
    /// REPORTED_TCB decoded for that generation.
    pub tcb: TcbVersion,
    /// Which key signed the report.
    pub signing_key: VekKind,
}

/// The endorsement key a report says signed it.
pub fn signing_key_kind(report: &SnpReport) -> Result<VekKind, SnpVerifyError> {
    match report.signing_key() {
        0 => Ok(VekKind::Vcek),
        1 => Ok(VekKind::Vlek),
        other => Err(SnpVerifyError::SigningKey(other)),
    }
}

/// Full SNP verification of `evidence` against `expected_report_data` at `now_secs`.
pub fn verify_snp(
    evidence: &SnpEvidence,
    expected_report_data: &[u8; 64],
    trust: &SnpTrust,
    now_secs: u64,
) -> Result<SnpVerified, SnpVerifyError> {
    let report = &evidence.report;
    let kind = signing_key_kind(report)?;
    let table_guid = match kind {
        VekKind::Vcek => guid::VCEK,
        VekKind::Vlek => guid::VLEK,
    };
    let vek_der = evidence
        .cert_table
        .as_ref()
        .and_then(|t| t.get(table_guid).map(<[u8]>::to_vec))
        .or_else(|| {
            trust
                .vek_dir
                .as_deref()
                .and_then(|d| load_vek_from_store(d, kind, &report.chip_id()))
        })
        .ok_or(SnpVerifyError::NoEndorsementKey(kind.name()))?;
    verify_snp_with_key(report, &vek_der, expected_report_data, trust, now_secs)
}

/// SNP verification with an explicit endorsement key (DER): chain, revocation, signature,
/// extensions, report fields.
pub fn verify_snp_with_key(
    report: &SnpReport,
    vek_der: &[u8],
    expected_report_data: &[u8; 64],
    trust: &SnpTrust,
    now_secs: u64,
) -> Result<SnpVerified, SnpVerifyError> {
    let kind = signing_key_kind(report)?;
    let vek = Certificate::from_der(vek_der).map_err(|source| SnpVerifyError::KeyParse {
        kind: kind.name(),
        source,
    })?;
    let pinned;
    let roots = match &trust.roots {
        Some(r) => r.as_slice(),
        None => {
            pinned = AmdRoots::all_pinned().map_err(SnpVerifyError::PinnedRoots)?;
            pinned.as_slice()
        }
    };
    let chain =
        find_chain(&vek, kind, roots, report.generation()).map_err(SnpVerifyError::Chain)?;
    if let Some(crls) = &trust.crls {
        crls.check(chain, kind, &vek, now_secs)
            .map_err(SnpVerifyError::Revocation)?;
    }
    let key = vek_key(&vek, kind)?;
    verify_report_signature(report, &key).map_err(SnpVerifyError::Report)?;
    check_vek_extensions(&vek, kind, report, chain.generation)?;
    check_report_fields(report, expected_report_data).map_err(SnpVerifyError::Report)?;
    Ok(SnpVerified {
        generation: chain.generation,
        tcb: TcbVersion::from_u64(report.reported_tcb_raw(), Some(chain.generation)),
        signing_key: kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds() {
        let der = Certificate::from_der(b"").unwrap_err();
        for (e, k) in [
            (ReportCheckError::SignatureMalformed, Kind::InvalidArgument),
            (ReportCheckError::SignatureInvalid, Kind::PermissionDenied),
            (ReportCheckError::DebugEnabled, Kind::PermissionDenied),
            (ReportCheckError::ReportDataMismatch, Kind::PermissionDenied),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
        for (e, k) in [
            (
                SnpVerifyError::NoEndorsementKey("VCEK"),
                Kind::FailedPrecondition,
            ),
            (SnpVerifyError::SigningKey(7), Kind::Unimplemented),
            (
                SnpVerifyError::KeyParse {
                    kind: "VLEK",
                    source: der,
                },
                Kind::InvalidArgument,
            ),
            (
                SnpVerifyError::PinnedRoots(AmdError::NoCrl("milan")),
                Kind::Internal,
            ),
            (
                SnpVerifyError::Chain(AmdError::Signature {
                    what: "VLEK",
                    issuer: "ASVK",
                }),
                Kind::PermissionDenied,
            ),
            (
                SnpVerifyError::Revocation(AmdError::NoCrl("milan")),
                Kind::FailedPrecondition,
            ),
            (SnpVerifyError::VekKey("VCEK"), Kind::InvalidArgument),
            (
                SnpVerifyError::VekTcbMismatch {
                    kind: "VCEK",
                    component: "snp",
                    cert: 1,
                    report: 2,
                },
                Kind::PermissionDenied,
            ),
            (
                SnpVerifyError::VekExtension {
                    kind: "VLEK",
                    name: "snp",
                },
                Kind::InvalidArgument,
            ),
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
