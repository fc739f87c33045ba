//! The simulated TEE's signing side: the root issues chip certificates, the chip signs
//! SEV-SNP-layout reports. The format is `veil_attestation::evidence::sim`'s; the shim's
//! simulated firmware calls [`sign_sim_report`] through [`crate::sim_ca::SimChip`].

use p384::ecdsa::{signature::Signer, Signature, SigningKey, VerifyingKey};
use sha2::{Digest, Sha512};
use veil_attestation::evidence::sim::{
    SimChipCert, SimEvidenceError, CHIP_CERT_DOMAIN, CHIP_CERT_FORMAT, DEFAULT_SIM_POLICY,
};
use veil_attestation::evidence::snp::{
    layout, SnpReport, TcbVersion, REPORT_LEN, SIGNATURE_OFFSET, SIGNED_LEN,
};

/// Issues a chip certificate: the root signs the chip's public key.
pub fn issue_chip_cert(root: &SigningKey, chip_public: &VerifyingKey) -> SimChipCert {
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

/// The chip public key a certificate names.
pub fn chip_public_key(cert: &SimChipCert) -> Result<VerifyingKey, SimEvidenceError> {
    VerifyingKey::from_sec1_bytes(&cert.public_key_sec1()?)
        .map_err(|_| SimEvidenceError::ChipCert("public key is not a P-384 point"))
}

/// The root's signature in a certificate.
pub fn chip_cert_signature(cert: &SimChipCert) -> Result<Signature, SimEvidenceError> {
    Signature::from_der(&cert.signature_der()?)
        .map_err(|_| SimEvidenceError::ChipCert("signature is not DER"))
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

/// The raw bytes of a simulated report (SEV-SNP layout, version 2) signed with the chip key.
pub fn build_sim_report_bytes(chip: &SigningKey, p: &SimReportParams) -> [u8; REPORT_LEN] {
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
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut report_id);
    r[layout::REPORT_ID..layout::REPORT_ID + 32].copy_from_slice(&report_id);
    r[layout::CHIP_ID..layout::CHIP_ID + 64].copy_from_slice(&sim_chip_id(chip.verifying_key()));
    sign_report_bytes(chip, &mut r);
    r
}

/// Signs the signed part of an SNP-layout report with `key` and writes the signature (r and s
/// little-endian, as the firmware does).
pub fn sign_report_bytes(key: &SigningKey, r: &mut [u8; REPORT_LEN]) {
    let sig: Signature = key.sign(&r[..SIGNED_LEN]);
    let (rb, sb) = sig.split_bytes();
    let mut r_le: Vec<u8> = rb.to_vec();
    r_le.reverse();
    let mut s_le: Vec<u8> = sb.to_vec();
    s_le.reverse();
    r[SIGNATURE_OFFSET..SIGNATURE_OFFSET + 48].copy_from_slice(&r_le);
    r[SIGNATURE_OFFSET + 72..SIGNATURE_OFFSET + 120].copy_from_slice(&s_le);
}

/// Builds and signs a simulated report, parsed.
pub fn build_sim_report(chip: &SigningKey, p: &SimReportParams) -> SnpReport {
    let raw = build_sim_report_bytes(chip, p);
    // The builder writes version 2, ECDSA P-384 and a 48-byte (r, s): the parse cannot fail.
    match SnpReport::parse(&raw) {
        Ok(r) => r,
        Err(e) => unreachable!("simulated report does not parse: {e}"),
    }
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
    build_sim_report_bytes(chip, &p).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_parse_and_name_their_chip() {
        let root = SigningKey::random(&mut rand_core::OsRng);
        let chip = SigningKey::random(&mut rand_core::OsRng);
        let cert = issue_chip_cert(&root, chip.verifying_key());
        assert_eq!(&chip_public_key(&cert).unwrap(), chip.verifying_key());
        assert!(chip_cert_signature(&cert).is_ok());
        let raw = sign_sim_report(&chip, &[3; 64], &[4; 48], Some(&[5; 32]));
        let r = SnpReport::parse(&raw).unwrap();
        assert_eq!(r.report_data(), [3; 64]);
        assert_eq!(r.measurement(), [4; 48]);
        assert_eq!(r.host_data(), [5; 32]);
        assert_eq!(r.chip_id(), sim_chip_id(chip.verifying_key()));
        let mut bad = cert.clone();
        bad.chip_public_key = "04".into();
        assert!(matches!(
            chip_public_key(&bad),
            Err(SimEvidenceError::ChipCert(_))
        ));
    }
}
