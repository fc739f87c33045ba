//! VLEK-signed SEV-SNP reports and revocation, on a **synthetic** hierarchy: no genuine
//! VLEK-signed report is among veil's fixtures, so the test builds an ARK/ASK/ASVK-shaped
//! chain (ECDSA P-384 instead of AMD's RSA-PSS, which the verifier also checks) and a VLEK with
//! AMD's TCB extensions, signs a synthetic Milan report with it, and verifies that through the
//! same code as AMD's real chain. That the real AMD ASVKs are pinned and signed by their ARKs
//! is tested in `verify::amd`'s unit tests.

#![allow(
    clippy::unwrap_used,
    reason = "integration-test helpers panic on setup failures"
)]

use p384::pkcs8::DecodePrivateKey;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CustomExtension, DnType, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber, PKCS_ECDSA_P384_SHA384,
};
use veil_attestation::evidence::snp::{layout, SnpReport, REPORT_LEN};
use veil_attestation::evidence::{composite, snp_evidence_json, Evidence};
use veil_attestation::Tee;
use veil_verifier::sim_report::sign_report_bytes;
use veil_verifier::verify::amd::{AmdError, AmdRoots, SnpCrls, VekKind};
use veil_verifier::verify::snp::{verify_snp, SnpTrust, SnpVerifyError};
use veil_verifier::{verify_evidence, TrustAnchors};
use x509_cert::Certificate;

/// 2027-01-15, between the test CRLs' this and next updates.
const NOW: u64 = 1_800_000_000;
/// KEY_INFO (report offset 0x48): SIGNING_KEY in bits 2..4, 1 = VLEK.
const KEY_INFO: usize = 0x48;
/// CPUID family and model (report version 3 and later).
const CPUID_FAM: usize = 0x188;
const CPUID_MOD: usize = 0x189;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn dn(cn: &str) -> rcgen::DistinguishedName {
    let mut d = rcgen::DistinguishedName::new();
    d.push(DnType::OrganizationName, "veil test, not AMD");
    d.push(DnType::CommonName, cn);
    d
}

fn ca(cn: &str, serial: u8, issuer: Option<&Ca>) -> Ca {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = dn(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.serial_number = Some(SerialNumber::from(vec![serial]));
    let cert = match issuer {
        None => p.self_signed(&key).unwrap(),
        Some(i) => p.signed_by(&key, &i.cert, &i.key).unwrap(),
    };
    Ca { cert, key }
}

/// AMD's TCB extension OIDs (1.3.6.1.4.1.3704.1.3.x) with DER INTEGER values.
fn tcb_ext(component: u64, value: u8) -> CustomExtension {
    CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 3704, 1, 3, component],
        vec![2, 1, value],
    )
}

struct Vlek {
    der: Vec<u8>,
    key: p384::ecdsa::SigningKey,
}

/// A VLEK for TCB (bootloader 3, tee 0, snp 8, microcode 115).
fn vlek(issuer: &Ca, serial: u8, snp_spl: u8) -> Vlek {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = dn("SEV-VLEK");
    p.serial_number = Some(SerialNumber::from(vec![serial]));
    p.custom_extensions = vec![
        tcb_ext(1, 3),
        tcb_ext(2, 0),
        tcb_ext(3, snp_spl),
        tcb_ext(8, 115),
    ];
    let cert = p.signed_by(&key, &issuer.cert, &issuer.key).unwrap();
    Vlek {
        der: cert.der().to_vec(),
        key: p384::ecdsa::SigningKey::from_pkcs8_der(&key.serialize_der()).unwrap(),
    }
}

fn x509(c: &Ca) -> Certificate {
    <Certificate as der::Decode>::from_der(c.cert.der()).unwrap()
}

struct Hierarchy {
    ark: Ca,
    asvk: Ca,
    roots: AmdRoots,
}

fn hierarchy() -> Hierarchy {
    let ark = ca("ARK-Test", 1, None);
    let ask = ca("SEV-Test", 2, Some(&ark));
    let asvk = ca("SEV-VLEK-Test", 3, Some(&ark));
    let roots = AmdRoots {
        generation: veil_attestation::evidence::snp::Generation::Milan,
        ark: x509(&ark),
        ask: x509(&ask),
        asvk: x509(&asvk),
    };
    Hierarchy { ark, asvk, roots }
}

/// A synthetic version-3 Milan report signed by `key`, VLEK-signed per KEY_INFO.
fn report(key: &p384::ecdsa::SigningKey, report_data: [u8; 64], vmpl: u32) -> Vec<u8> {
    let mut r = [0u8; REPORT_LEN];
    r[layout::VERSION..layout::VERSION + 4].copy_from_slice(&3u32.to_le_bytes());
    r[layout::POLICY..layout::POLICY + 8].copy_from_slice(&0x3_0000u64.to_le_bytes());
    r[layout::VMPL..layout::VMPL + 4].copy_from_slice(&vmpl.to_le_bytes());
    r[layout::SIG_ALGO..layout::SIG_ALGO + 4].copy_from_slice(&1u32.to_le_bytes());
    r[KEY_INFO..KEY_INFO + 4].copy_from_slice(&(1u32 << 2).to_le_bytes());
    let tcb = [3u8, 0, 0, 0, 0, 0, 8, 115];
    for off in [
        layout::CURRENT_TCB,
        layout::REPORTED_TCB,
        layout::COMMITTED_TCB,
        layout::LAUNCH_TCB,
    ] {
        r[off..off + 8].copy_from_slice(&tcb);
    }
    r[layout::REPORT_DATA..layout::REPORT_DATA + 64].copy_from_slice(&report_data);
    r[layout::MEASUREMENT..layout::MEASUREMENT + 48].copy_from_slice(&[0x11; 48]);
    r[CPUID_FAM] = 0x19;
    r[CPUID_MOD] = 0x01;
    // A VLEK-signed report may mask its chip ID; this one does not, it has none to match.
    r[layout::CHIP_ID..layout::CHIP_ID + 64].copy_from_slice(&[0x5a; 64]);
    sign_report_bytes(key, &mut r);
    r.to_vec()
}

/// Trustee-shaped evidence carrying the VLEK in its cert_chain, parsed as the broker does.
fn evidence(report: &[u8], vlek_der: &[u8]) -> veil_attestation::evidence::SnpEvidence {
    use veil_attestation::evidence::snp::{guid, CertEntry, CertTable};
    let table = CertTable {
        entries: vec![CertEntry {
            guid: guid::VLEK.into(),
            data: vlek_der.to_vec(),
        }],
    }
    .encode();
    let primary = snp_evidence_json(report, Some(&table)).unwrap();
    assert_eq!(primary["cert_chain"][0]["cert_type"], "VLEK");
    match Evidence::from_composite(Tee::Snp, &composite(primary)).unwrap() {
        Evidence::Snp(e) => e,
        other => panic!("not SNP evidence: {:?}", other.tee()),
    }
}

fn trust(h: &Hierarchy) -> SnpTrust {
    SnpTrust {
        roots: Some(vec![h.roots.clone()]),
        ..SnpTrust::default()
    }
}

#[test]
fn a_vlek_signed_report_with_its_asvk_chain_verifies() {
    let h = hierarchy();
    let v = vlek(&h.asvk, 9, 8);
    let rd = [0x42; 64];
    let ev = evidence(&report(&v.key, rd, 0), &v.der);
    let ok = verify_snp(&ev, &rd, &trust(&h), NOW).unwrap();
    assert_eq!(ok.signing_key, VekKind::Vlek);
    assert_eq!(ok.tcb.snp, 8);
    // The same through verify_evidence: the claims say VLEK and VMPL.
    let anchors = TrustAnchors {
        snp: trust(&h),
        ..TrustAnchors::default()
    };
    let claims = verify_evidence(&Evidence::Snp(ev), &rd, &anchors, NOW).unwrap();
    assert_eq!(claims.signing_key.as_deref(), Some("VLEK"));
    assert_eq!(claims.vmpl, Some(0));
}

#[test]
fn a_vlek_under_another_asvk_is_refused_with_the_reason() {
    let h = hierarchy();
    let stranger = ca("SEV-VLEK-Elsewhere", 4, Some(&h.ark));
    let v = vlek(&stranger, 9, 8);
    let rd = [0x42; 64];
    let ev = evidence(&report(&v.key, rd, 0), &v.der);
    let e = verify_snp(&ev, &rd, &trust(&h), NOW).unwrap_err();
    assert!(matches!(e, SnpVerifyError::Chain(_)), "{e:?}");
    assert_eq!(
        veil_common::error_chain(&e),
        "endorsement key chain refused: VLEK does not chain to the pinned AMD ARK/ASVK of \
         milan: VLEK is not signed by the ASVK"
    );
    // And AMD's real roots refuse the synthetic VLEK outright.
    let v = vlek(&h.asvk, 9, 8);
    let ev = evidence(&report(&v.key, rd, 0), &v.der);
    let e = verify_snp(&ev, &rd, &SnpTrust::default(), NOW).unwrap_err();
    assert!(
        veil_common::error_chain(&e)
            .contains("VLEK does not chain to the pinned AMD ARK/ASVK of milan"),
        "{}",
        veil_common::error_chain(&e)
    );
}

#[test]
fn vlek_tcb_extensions_must_match_the_report_and_vmpl_is_left_to_policy() {
    let h = hierarchy();
    let v = vlek(&h.asvk, 9, 7);
    let rd = [1; 64];
    let ev = evidence(&report(&v.key, rd, 0), &v.der);
    let e = verify_snp(&ev, &rd, &trust(&h), NOW).unwrap_err();
    assert!(
        matches!(
            e,
            SnpVerifyError::VekTcbMismatch {
                kind: "VLEK",
                component: "snp",
                cert: 7,
                report: 8
            }
        ),
        "{e:?}"
    );
    // An SVSM guest asks at VMPL 1: the signature and chain verify; policy decides.
    let v = vlek(&h.asvk, 9, 8);
    let ev = evidence(&report(&v.key, rd, 1), &v.der);
    let anchors = TrustAnchors {
        snp: trust(&h),
        ..TrustAnchors::default()
    };
    let claims = verify_evidence(&Evidence::Snp(ev), &rd, &anchors, NOW).unwrap();
    assert_eq!(claims.vmpl, Some(1));
}

fn crl(issuer: &Ca, revoked: &[u8], next_update_year: i32) -> String {
    CertificateRevocationListParams {
        this_update: date_time_ymd(2024, 1, 1),
        next_update: date_time_ymd(next_update_year, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from(vec![*s]),
                revocation_time: date_time_ymd(2024, 6, 1),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer.cert, &issuer.key)
    .unwrap()
    .pem()
    .unwrap()
}

#[test]
fn crls_from_a_file_revoke_intermediates_and_vleks() {
    let h = hierarchy();
    let v = vlek(&h.asvk, 9, 8);
    let rd = [2; 64];
    let ev = evidence(&report(&v.key, rd, 0), &v.der);
    let check = |pem: String| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snp.crl.pem");
        std::fs::write(&path, pem).unwrap();
        let t = SnpTrust {
            crls: Some(SnpCrls::load(&path).unwrap()),
            ..trust(&h)
        };
        verify_snp(&ev, &rd, &t, NOW)
    };
    // A current ARK CRL revoking nothing: accepted.
    check(crl(&h.ark, &[], 2030)).unwrap();
    // The ARK revoked the ASVK.
    let e = check(crl(&h.ark, &[3], 2030)).unwrap_err();
    assert_eq!(
        veil_common::error_chain(&e),
        "revocation check refused: the ASVK (serial 03) is revoked by the milan CRL"
    );
    // The ASVK revoked the VLEK (next to a clean ARK CRL, in one PEM file).
    let both = format!("{}{}", crl(&h.ark, &[], 2030), crl(&h.asvk, &[9], 2030));
    let e = check(both).unwrap_err();
    assert!(
        matches!(
            e,
            SnpVerifyError::Revocation(AmdError::Revoked { what: "VLEK", .. })
        ),
        "{e:?}"
    );
    // Out of date.
    let e = check(crl(&h.ark, &[], 2025)).unwrap_err();
    assert!(
        matches!(e, SnpVerifyError::Revocation(AmdError::CrlStale(_))),
        "{e:?}"
    );
    // CRLs configured, but none by this ARK.
    let other = ca("ARK-Other", 1, None);
    let e = check(crl(&other, &[], 2030)).unwrap_err();
    assert!(
        matches!(e, SnpVerifyError::Revocation(AmdError::NoCrl("milan"))),
        "{e:?}"
    );
    // A CRL that claims this ARK as issuer but is signed by another key.
    let forged = ca("ARK-Test", 1, None);
    let e = check(crl(&forged, &[], 2030)).unwrap_err();
    assert!(
        matches!(e, SnpVerifyError::Revocation(AmdError::Signature { .. })),
        "{e:?}"
    );
}

#[test]
fn report_bytes_are_what_the_vlek_signed() {
    let h = hierarchy();
    let v = vlek(&h.asvk, 9, 8);
    let raw = report(&v.key, [3; 64], 0);
    assert_eq!(SnpReport::parse(&raw).unwrap().signing_key(), 1);
}
