//! SEV-SNP verification against a genuine AMD-signed Milan report and its VCEK
//! (`attestation/testdata/snp`, copied from the shared fixtures; see its README): accepted as
//! is, rejected after any one-bit flip in the signed part or the signature; and the Trustee
//! evidence shape of that report pinned to the `sev` crate's own serde form.

#![allow(
    clippy::unwrap_used,
    reason = "integration-test helpers panic on setup failures"
)]

use std::path::PathBuf;

use sev::parser::ByteParser;
use veil_attestation::evidence::snp::{
    guid, CertEntry, CertTable, Generation, SnpReport, SIGNED_LEN,
};
use veil_attestation::evidence::snp_json::SnpEvidenceJson;
use veil_attestation::evidence::{composite, snp_evidence_json, Evidence};
use veil_attestation::Tee;
use veil_verifier::verify::amd::{AmdError, AmdRoots, VekKind};
use veil_verifier::verify::snp::{
    verify_report_signature, verify_snp, verify_snp_with_key, ReportCheckError, SnpTrust,
    SnpVerifyError,
};

const NOW: u64 = 1_800_000_000;

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("VEIL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata"));
    assert!(
        dir.join("snp/report_milan.hex").exists(),
        "missing fixture {}/snp/report_milan.hex (set VEIL_FIXTURES to the shared fixtures dir)",
        dir.display()
    );
    dir
}

fn load() -> (Vec<u8>, Vec<u8>) {
    let dir = fixtures();
    let hex_text = std::fs::read_to_string(dir.join("snp/report_milan.hex")).unwrap();
    let clean: String = hex_text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let report = hex::decode(clean).unwrap();
    let vcek = std::fs::read(dir.join("snp/vcek_milan.der")).unwrap();
    (report, vcek)
}

fn trust() -> SnpTrust {
    SnpTrust::default()
}

#[test]
fn genuine_milan_report_verifies() {
    let (raw, vcek) = load();
    assert_eq!(raw.len(), 0x4A0);
    let report = SnpReport::parse(&raw).unwrap();
    // The fixture's report_data is whatever its producer bound; bind to it.
    let v = verify_snp_with_key(&report, &vcek, &report.report_data(), &trust(), NOW).unwrap();
    assert_eq!(v.generation, Generation::Milan);
    assert_eq!(v.signing_key, VekKind::Vcek);
}

#[test]
fn any_single_bit_flip_is_rejected() {
    let (raw, vcek) = load();
    let roots = Some(AmdRoots::all_pinned().unwrap());
    let trust = SnpTrust {
        roots,
        ..SnpTrust::default()
    };
    // Flip one bit in every 7th byte of the signed part and in every byte of r and s.
    let sig_bytes = (SIGNED_LEN..SIGNED_LEN + 48).chain(SIGNED_LEN + 72..SIGNED_LEN + 120);
    let positions: Vec<usize> = (0..SIGNED_LEN).step_by(7).chain(sig_bytes).collect();
    for (i, pos) in positions.into_iter().enumerate() {
        let mut flipped = raw.clone();
        flipped[pos] ^= 1 << (i % 8);
        let Ok(report) = SnpReport::parse(&flipped) else {
            continue; // version / algorithm fields: rejected by the parser already
        };
        let r = verify_snp_with_key(&report, &vcek, &report.report_data(), &trust, NOW);
        assert!(r.is_err(), "flip at byte {pos:#x} was accepted");
    }
}

#[test]
fn flipped_signature_bit_is_a_signature_error() {
    let (mut raw, vcek) = load();
    raw[SIGNED_LEN + 5] ^= 0x10;
    let report = SnpReport::parse(&raw).unwrap();
    let cert = <x509_cert::Certificate as der::Decode>::from_der(&vcek).unwrap();
    use der::Encode;
    use p384::pkcs8::DecodePublicKey;
    let key = p384::ecdsa::VerifyingKey::from_public_key_der(
        &cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        verify_report_signature(&report, &key),
        Err(ReportCheckError::SignatureInvalid)
    );
}

#[test]
fn a_vcek_presented_as_signed_by_the_asvk_is_refused_with_the_reason() {
    let (raw, vcek) = load();
    let mut flags = raw.clone();
    // KEY_INFO SIGNING_KEY = 1 (VLEK): the VCEK does not chain to the ASVK.
    flags[0x48] |= 1 << 2;
    let report = SnpReport::parse(&flags).unwrap();
    let e = verify_snp_with_key(&report, &vcek, &report.report_data(), &trust(), NOW).unwrap_err();
    assert!(
        matches!(
            &e,
            SnpVerifyError::Chain(AmdError::Chain { vek: "VLEK", .. })
        ),
        "{e:?}"
    );
    assert_eq!(
        veil_common::error_chain(&e),
        "endorsement key chain refused: VLEK does not chain to the pinned AMD ARK/ASVK of \
         milan/genoa/turin: VLEK is not signed by the ASVK"
    );
}

/// The genuine report as Trustee's SNP attester sends it, built with the `sev` crate itself.
fn sev_form(raw: &[u8], vcek: &[u8]) -> serde_json::Value {
    let report = sev::firmware::guest::AttestationReport::from_bytes(raw).unwrap();
    let chain = vec![sev::firmware::host::CertTableEntry::new(
        sev::firmware::host::CertType::VCEK,
        vcek.to_vec(),
    )];
    serde_json::json!({ "attestation_report": report, "cert_chain": chain })
}

#[test]
fn trustee_shaped_snp_evidence_is_sevs_serde_form_both_ways() {
    let (raw, vcek) = load();
    let theirs = sev_form(&raw, &vcek);
    // Ours, as the guest builds it, is exactly what sev serialises.
    let table = CertTable {
        entries: vec![CertEntry {
            guid: guid::VCEK.into(),
            data: vcek.clone(),
        }],
    }
    .encode();
    let ours = snp_evidence_json(&raw, Some(&table)).unwrap();
    assert_eq!(ours, theirs);
    // And sev's form parses back to the very bytes the AMD signature covers.
    let parsed: SnpEvidenceJson = serde_json::from_value(theirs.clone()).unwrap();
    assert_eq!(
        parsed.attestation_report.to_report().unwrap().as_bytes()[..],
        raw[..]
    );
    // sev reads ours too.
    let back: sev::firmware::guest::AttestationReport =
        serde_json::from_value(ours["attestation_report"].clone()).unwrap();
    assert_eq!(back.to_bytes().unwrap()[..], raw[..]);
}

#[test]
fn the_broker_path_verifies_trustee_shaped_evidence_wrapped_as_composite() {
    let (raw, vcek) = load();
    let composite = composite(sev_form(&raw, &vcek));
    // Through JSON, the way it arrives in `tee-evidence`.
    let wire = serde_json::to_string(&composite).unwrap();
    let composite: veil_attestation::protocol::CompositeEvidence =
        serde_json::from_str(&wire).unwrap();
    let Evidence::Snp(ev) = Evidence::from_composite(Tee::Snp, &composite).unwrap() else {
        panic!("not SNP evidence")
    };
    let rd = ev.report.report_data();
    verify_snp(&ev, &rd, &trust(), NOW).unwrap();
    let mut other = rd;
    other[63] ^= 1;
    assert!(matches!(
        verify_snp(&ev, &other, &trust(), NOW),
        Err(SnpVerifyError::Report(ReportCheckError::ReportDataMismatch))
    ));
}

#[test]
fn vcek_from_the_offline_store_when_the_evidence_has_no_chain() {
    let (raw, vcek) = load();
    let bare = snp_evidence_json(&raw, None).unwrap();
    assert!(bare["cert_chain"].is_null());
    let Evidence::Snp(ev) = Evidence::from_primary(Tee::Snp, &bare).unwrap() else {
        panic!("not SNP evidence")
    };
    let rd = ev.report.report_data();
    assert!(matches!(
        verify_snp(&ev, &rd, &trust(), NOW),
        Err(SnpVerifyError::NoEndorsementKey("VCEK"))
    ));
    let store = tempfile::tempdir().unwrap();
    std::fs::write(
        store
            .path()
            .join(format!("{}.der", hex::encode(ev.report.chip_id()))),
        &vcek,
    )
    .unwrap();
    let trust = SnpTrust {
        vek_dir: Some(store.path().to_path_buf()),
        ..SnpTrust::default()
    };
    verify_snp(&ev, &rd, &trust, NOW).unwrap();
}
