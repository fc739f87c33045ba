//! AMD's SEV-SNP key hierarchy, per processor generation: the ARK (root) signs the ASK, which
//! signs chip VCEKs, and the ASVK, which signs VLEKs (loaded by a cloud provider, shared by its
//! hosts). Owns the pinned roots, certificate signature checks (RSASSA-PSS/SHA-384 as AMD signs,
//! ECDSA P-384/SHA-384 for test hierarchies) and revocation lists.
//!
//! Pinned, never taken from the evidence: the ARK and ASK of Milan, Genoa and Turin are the ones
//! the `sev` crate carries; the ASVKs are AMD's `SEV-VLEK-<generation>` certificates kept next
//! to this file (`amd/*_asvk.pem`), each checked against its ARK by the tests. CRLs come from an
//! offline file (AMD's key distribution service publishes one per generation and key type);
//! nothing is fetched from the network.

use std::path::{Path, PathBuf};

use base64::Engine;
use der::{Decode, DecodePem, Encode};
use p384::pkcs8::DecodePublicKey;
use sev::certs::snp::builtin;
use thiserror::Error;
use veil_attestation::evidence::snp::Generation;
use veil_common::{Classify, Kind};
use x509_cert::crl::CertificateList;
use x509_cert::Certificate;

/// RSASSA-PSS (AMD's ARK, ASK, ASVK and the VCEK/VLEK signatures on them).
const OID_RSA_PSS: &str = "1.2.840.113549.1.1.10";
/// ECDSA with SHA-384 (test hierarchies).
const OID_ECDSA_SHA384: &str = "1.2.840.10045.4.3.3";

const MILAN_ASVK: &[u8] = include_bytes!("amd/milan_asvk.pem");
const GENOA_ASVK: &[u8] = include_bytes!("amd/genoa_asvk.pem");
const TURIN_ASVK: &[u8] = include_bytes!("amd/turin_asvk.pem");

/// Which endorsement key signed a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VekKind {
    /// The chip's Versioned Chip Endorsement Key, under the ASK.
    Vcek,
    /// A Versioned Loaded Endorsement Key, under the ASVK.
    Vlek,
}

impl VekKind {
    /// `VCEK` or `VLEK`.
    pub fn name(self) -> &'static str {
        match self {
            VekKind::Vcek => "VCEK",
            VekKind::Vlek => "VLEK",
        }
    }

    /// The intermediate that signs it: `ASK` or `ASVK`.
    pub fn intermediate_name(self) -> &'static str {
        match self {
            VekKind::Vcek => "ASK",
            VekKind::Vlek => "ASVK",
        }
    }
}

/// Why a certificate, a chain or a CRL was not accepted.
#[derive(Debug, Error)]
pub enum AmdError {
    /// A certificate or CRL does not parse.
    #[error("{what} does not parse")]
    Parse {
        /// What.
        what: &'static str,
        /// The DER/PEM error.
        #[source]
        source: der::Error,
    },
    /// A signature algorithm other than RSASSA-PSS or ECDSA P-384 with SHA-384.
    #[error(
        "{what} is signed with algorithm {oid}, not RSASSA-PSS/SHA-384 or ECDSA P-384/SHA-384"
    )]
    SignatureAlgorithm {
        /// What.
        what: &'static str,
        /// The algorithm OID.
        oid: String,
    },
    /// The issuer's key cannot check that algorithm.
    #[error("the key of {issuer} is not a key for the algorithm that signed {what}")]
    IssuerKey {
        /// What was signed.
        what: &'static str,
        /// Its issuer.
        issuer: &'static str,
    },
    /// A signature does not verify.
    #[error("{what} is not signed by the {issuer}")]
    Signature {
        /// What.
        what: &'static str,
        /// The expected issuer.
        issuer: &'static str,
    },
    /// The endorsement key chains to no root tried.
    #[error("{vek} does not chain to the pinned AMD ARK/{intermediate} of {tried}")]
    Chain {
        /// `VCEK` or `VLEK`.
        vek: &'static str,
        /// `ASK` or `ASVK`.
        intermediate: &'static str,
        /// Generations tried.
        tried: String,
        /// Why the last generation tried refused.
        #[source]
        last: Option<Box<AmdError>>,
    },
    /// A PEM CRL file has no well-formed `X509 CRL` block.
    #[error("SNP CRL file has no well-formed PEM X509 CRL block")]
    CrlPem,
    /// The CRL file could not be read.
    #[error("cannot read SNP CRL file {path}")]
    CrlRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// CRLs are configured but none is issued by this generation's ARK.
    #[error("no SNP CRL issued by the {0} ARK is configured")]
    NoCrl(&'static str),
    /// The CRL's next update has passed.
    #[error("the {0} SNP CRL is out of date (its next update has passed)")]
    CrlStale(&'static str),
    /// The certificate is revoked.
    #[error("the {what} (serial {serial}) is revoked by the {generation} CRL")]
    Revoked {
        /// `ASK`, `ASVK`, `VCEK` or `VLEK`.
        what: &'static str,
        /// Its serial number, hex.
        serial: String,
        /// The generation.
        generation: &'static str,
    },
}

impl Classify for AmdError {
    fn kind(&self) -> Kind {
        match self {
            AmdError::Parse { .. } | AmdError::SignatureAlgorithm { .. } | AmdError::CrlPem => {
                Kind::InvalidArgument
            }
            AmdError::IssuerKey { .. }
            | AmdError::Signature { .. }
            | AmdError::Chain { .. }
            | AmdError::Revoked { .. } => Kind::PermissionDenied,
            AmdError::CrlRead { .. } => Kind::Internal,
            AmdError::NoCrl(_) | AmdError::CrlStale(_) => Kind::FailedPrecondition,
        }
    }
}

/// One generation's roots: the ARK and its two intermediates.
#[derive(Debug, Clone)]
pub struct AmdRoots {
    /// The generation.
    pub generation: Generation,
    /// AMD Root Key (self-signed).
    pub ark: Certificate,
    /// AMD SEV Key: signs VCEKs.
    pub ask: Certificate,
    /// AMD SEV VLEK Key: signs VLEKs.
    pub asvk: Certificate,
}

fn pem(what: &'static str, bytes: &[u8]) -> Result<Certificate, AmdError> {
    Certificate::from_pem(bytes).map_err(|source| AmdError::Parse { what, source })
}

impl AmdRoots {
    /// The pinned roots of `generation`.
    pub fn pinned(generation: Generation) -> Result<Self, AmdError> {
        let (ark, ask, asvk) = match generation {
            Generation::Milan => (builtin::milan::ARK, builtin::milan::ASK, MILAN_ASVK),
            Generation::Genoa => (builtin::genoa::ARK, builtin::genoa::ASK, GENOA_ASVK),
            Generation::Turin => (builtin::turin::ARK, builtin::turin::ASK, TURIN_ASVK),
        };
        Ok(AmdRoots {
            generation,
            ark: pem("pinned ARK", ark)?,
            ask: pem("pinned ASK", ask)?,
            asvk: pem("pinned ASVK", asvk)?,
        })
    }

    /// The pinned roots of every generation veil knows.
    pub fn all_pinned() -> Result<Vec<Self>, AmdError> {
        [Generation::Milan, Generation::Genoa, Generation::Turin]
            .into_iter()
            .map(Self::pinned)
            .collect()
    }

    /// The intermediate that signs `kind`.
    pub fn intermediate(&self, kind: VekKind) -> &Certificate {
        match kind {
            VekKind::Vcek => &self.ask,
            VekKind::Vlek => &self.asvk,
        }
    }

    /// Checks ARK → intermediate → `vek`.
    pub fn verify_chain(&self, vek: &Certificate, kind: VekKind) -> Result<(), AmdError> {
        verify_signed_by(&self.ark, &self.ark, "ARK", "ARK")?;
        let inter = self.intermediate(kind);
        verify_signed_by(inter, &self.ark, kind.intermediate_name(), "ARK")?;
        verify_signed_by(vek, inter, kind.name(), kind.intermediate_name())
    }
}

/// Checks `signature` by `issuer`'s key over `tbs`, with the algorithm `oid`.
fn verify_signature(
    oid: &str,
    tbs: &[u8],
    signature: &[u8],
    issuer: &Certificate,
    what: &'static str,
    issuer_name: &'static str,
) -> Result<(), AmdError> {
    let spki = issuer
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|source| AmdError::Parse {
            what: issuer_name,
            source,
        })?;
    let key_err = || AmdError::IssuerKey {
        what,
        issuer: issuer_name,
    };
    let bad = || AmdError::Signature {
        what,
        issuer: issuer_name,
    };
    match oid {
        OID_RSA_PSS => {
            use rsa::signature::Verifier;
            let key = rsa::RsaPublicKey::from_public_key_der(&spki).map_err(|_| key_err())?;
            let sig = rsa::pss::Signature::try_from(signature).map_err(|_| bad())?;
            rsa::pss::VerifyingKey::<sha2::Sha384>::new(key)
                .verify(tbs, &sig)
                .map_err(|_| bad())
        }
        OID_ECDSA_SHA384 => {
            use p384::ecdsa::signature::Verifier;
            let key =
                p384::ecdsa::VerifyingKey::from_public_key_der(&spki).map_err(|_| key_err())?;
            let sig = p384::ecdsa::Signature::from_der(signature).map_err(|_| bad())?;
            key.verify(tbs, &sig).map_err(|_| bad())
        }
        other => Err(AmdError::SignatureAlgorithm {
            what,
            oid: other.to_string(),
        }),
    }
}

/// Checks that `cert` is signed by `issuer`'s key.
pub fn verify_signed_by(
    cert: &Certificate,
    issuer: &Certificate,
    what: &'static str,
    issuer_name: &'static str,
) -> Result<(), AmdError> {
    let tbs = cert
        .tbs_certificate
        .to_der()
        .map_err(|source| AmdError::Parse { what, source })?;
    let sig = cert.signature.as_bytes().ok_or(AmdError::Signature {
        what,
        issuer: issuer_name,
    })?;
    verify_signature(
        &cert.signature_algorithm.oid.to_string(),
        &tbs,
        sig,
        issuer,
        what,
        issuer_name,
    )
}

/// Finds the roots under which `vek` verifies: the report's generation when it names one,
/// otherwise every one given.
pub fn find_chain<'a>(
    vek: &Certificate,
    kind: VekKind,
    roots: &'a [AmdRoots],
    hint: Option<Generation>,
) -> Result<&'a AmdRoots, AmdError> {
    let candidates: Vec<&AmdRoots> = roots
        .iter()
        .filter(|r| hint.is_none_or(|g| g == r.generation))
        .collect();
    let mut last = None;
    for r in &candidates {
        match r.verify_chain(vek, kind) {
            Ok(()) => return Ok(r),
            Err(e) => last = Some(e),
        }
    }
    Err(AmdError::Chain {
        vek: kind.name(),
        intermediate: kind.intermediate_name(),
        tried: if candidates.is_empty() {
            "no generation".to_string()
        } else {
            candidates
                .iter()
                .map(|r| r.generation.name())
                .collect::<Vec<_>>()
                .join("/")
        },
        last: last.map(Box::new),
    })
}

/// AMD's certificate revocation lists, loaded from an offline file (PEM `X509 CRL` blocks or
/// one DER CRL). Signatures are checked against the ARK at use, when the chain is known.
#[derive(Debug, Clone, Default)]
pub struct SnpCrls {
    lists: Vec<CertificateList>,
}

impl SnpCrls {
    /// Parses CRL bytes: one DER CRL, or PEM with one or more `X509 CRL` blocks.
    pub fn parse(bytes: &[u8]) -> Result<Self, AmdError> {
        let parse = |source| AmdError::Parse {
            what: "SNP CRL",
            source,
        };
        let text = std::str::from_utf8(bytes)
            .ok()
            .filter(|t| t.contains("-----BEGIN"));
        let Some(text) = text else {
            return Ok(SnpCrls {
                lists: vec![CertificateList::from_der(bytes).map_err(parse)?],
            });
        };
        const BEGIN: &str = "-----BEGIN X509 CRL-----";
        const END: &str = "-----END X509 CRL-----";
        let mut lists = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find(BEGIN) {
            let body = &rest[start + BEGIN.len()..];
            let end = body.find(END).ok_or(AmdError::CrlPem)?;
            let b64: String = body[..end].split_whitespace().collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| AmdError::CrlPem)?;
            lists.push(CertificateList::from_der(&der).map_err(parse)?);
            rest = &body[end + END.len()..];
        }
        if lists.is_empty() {
            return Err(AmdError::CrlPem);
        }
        Ok(SnpCrls { lists })
    }

    /// Loads a CRL file.
    pub fn load(path: &Path) -> Result<Self, AmdError> {
        let bytes = std::fs::read(path).map_err(|source| AmdError::CrlRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes)
    }

    /// How many CRLs were loaded.
    pub fn len(&self) -> usize {
        self.lists.len()
    }

    /// True when none were.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    /// The CRLs `issuer` issued, their signatures checked, none out of date at `now_secs`.
    fn issued_by<'a>(
        &'a self,
        issuer: &Certificate,
        issuer_name: &'static str,
        generation: &'static str,
        now_secs: u64,
    ) -> Result<Vec<&'a CertificateList>, AmdError> {
        let mut out = Vec::new();
        for crl in self
            .lists
            .iter()
            .filter(|c| c.tbs_cert_list.issuer == issuer.tbs_certificate.subject)
        {
            let tbs = crl
                .tbs_cert_list
                .to_der()
                .map_err(|source| AmdError::Parse {
                    what: "SNP CRL",
                    source,
                })?;
            let sig = crl.signature.as_bytes().ok_or(AmdError::Signature {
                what: "SNP CRL",
                issuer: issuer_name,
            })?;
            verify_signature(
                &crl.signature_algorithm.oid.to_string(),
                &tbs,
                sig,
                issuer,
                "SNP CRL",
                issuer_name,
            )?;
            if let Some(next) = &crl.tbs_cert_list.next_update {
                if next.to_unix_duration().as_secs() <= now_secs {
                    return Err(AmdError::CrlStale(generation));
                }
            }
            out.push(crl);
        }
        Ok(out)
    }

    /// Checks that neither the intermediate nor `vek` is revoked by the CRLs of `roots`: there
    /// must be at least one current CRL signed by the ARK (AMD's, which revokes ASKs and
    /// ASVKs); a CRL the intermediate signed, if given, may revoke the endorsement key itself.
    pub fn check(
        &self,
        roots: &AmdRoots,
        kind: VekKind,
        vek: &Certificate,
        now_secs: u64,
    ) -> Result<(), AmdError> {
        let generation = roots.generation.name();
        let inter = roots.intermediate(kind);
        let by_ark = self.issued_by(&roots.ark, "ARK", generation, now_secs)?;
        if by_ark.is_empty() {
            return Err(AmdError::NoCrl(generation));
        }
        let by_inter = self.issued_by(inter, kind.intermediate_name(), generation, now_secs)?;
        let checks = [
            (&by_ark, kind.intermediate_name(), inter),
            (&by_inter, kind.name(), vek),
        ];
        for (crls, what, cert) in checks {
            let serial = &cert.tbs_certificate.serial_number;
            let revoked = crls.iter().any(|c| {
                c.tbs_cert_list
                    .revoked_certificates
                    .as_deref()
                    .unwrap_or(&[])
                    .iter()
                    .any(|r| &r.serial_number == serial)
            });
            if revoked {
                return Err(AmdError::Revoked {
                    what,
                    serial: hex::encode(serial.as_bytes()),
                    generation,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_asvks_are_amds_and_signed_by_their_ark() {
        for g in [Generation::Milan, Generation::Genoa, Generation::Turin] {
            let r = AmdRoots::pinned(g).unwrap();
            let cn = |c: &Certificate| c.tbs_certificate.subject.to_string();
            let gen = match g {
                Generation::Milan => "Milan",
                Generation::Genoa => "Genoa",
                Generation::Turin => "Turin",
            };
            assert!(
                cn(&r.ark).contains(&format!("CN=ARK-{gen}")),
                "{}",
                cn(&r.ark)
            );
            assert!(
                cn(&r.ask).contains(&format!("CN=SEV-{gen}")),
                "{}",
                cn(&r.ask)
            );
            assert!(
                cn(&r.asvk).contains(&format!("CN=SEV-VLEK-{gen}")),
                "{}",
                cn(&r.asvk)
            );
            verify_signed_by(&r.ark, &r.ark, "ARK", "ARK").unwrap();
            verify_signed_by(&r.ask, &r.ark, "ASK", "ARK").unwrap();
            verify_signed_by(&r.asvk, &r.ark, "ASVK", "ARK").unwrap();
        }
        // Cross-generation: Genoa's ASVK is not signed by Milan's ARK.
        let milan = AmdRoots::pinned(Generation::Milan).unwrap();
        let genoa = AmdRoots::pinned(Generation::Genoa).unwrap();
        assert!(matches!(
            verify_signed_by(&genoa.asvk, &milan.ark, "ASVK", "ARK"),
            Err(AmdError::Signature { .. })
        ));
    }

    #[test]
    fn error_kinds() {
        let der = Certificate::from_der(b"").unwrap_err();
        let sig = || AmdError::Signature {
            what: "VLEK",
            issuer: "ASVK",
        };
        for (e, k) in [
            (
                AmdError::Parse {
                    what: "x",
                    source: der,
                },
                Kind::InvalidArgument,
            ),
            (
                AmdError::SignatureAlgorithm {
                    what: "x",
                    oid: "1.2".into(),
                },
                Kind::InvalidArgument,
            ),
            (
                AmdError::IssuerKey {
                    what: "x",
                    issuer: "y",
                },
                Kind::PermissionDenied,
            ),
            (sig(), Kind::PermissionDenied),
            (
                AmdError::Chain {
                    vek: "VLEK",
                    intermediate: "ASVK",
                    tried: "milan".into(),
                    last: Some(Box::new(sig())),
                },
                Kind::PermissionDenied,
            ),
            (AmdError::CrlPem, Kind::InvalidArgument),
            (
                AmdError::CrlRead {
                    path: "x".into(),
                    source: std::io::Error::other("x"),
                },
                Kind::Internal,
            ),
            (AmdError::NoCrl("milan"), Kind::FailedPrecondition),
            (AmdError::CrlStale("milan"), Kind::FailedPrecondition),
            (
                AmdError::Revoked {
                    what: "VLEK",
                    serial: "01".into(),
                    generation: "milan",
                },
                Kind::PermissionDenied,
            ),
        ] {
            assert_eq!(e.kind(), k, "{e}");
        }
    }
}
